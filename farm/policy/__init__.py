"""Content policy: prompt folding, the protected-name registry, and the moderation hook."""
