"""Pydantic request/response schemas of the REST API (separate from the ORM models)."""
