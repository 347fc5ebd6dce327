"""Invite-only accounts (tenants) and their API keys."""
