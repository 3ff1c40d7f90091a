"""MwT Hub service: REST API, registry DB and job plumbing around ``mwt_core``."""
