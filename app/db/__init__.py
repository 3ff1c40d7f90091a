"""Registry database: ORM models (``models``), engine and session factories (``session``), the
migrations runner (``migrate``)."""
