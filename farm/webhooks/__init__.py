"""Per-account webhook endpoints: signed video events, delivered at least once."""
