"""One router per resource, all mounted under /api/v1 (health/ready/metrics also at the root)."""
