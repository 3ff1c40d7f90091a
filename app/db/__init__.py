"""Registry database: ORM models (``models``), engine/session factories (``session``), migrations runner (``migrate``)."""
