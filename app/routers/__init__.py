"""One router per resource, all mounted under ``app.paths.API_PREFIX`` (health/ready/metrics also at
the root)."""
