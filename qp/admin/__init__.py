"""The operator's page (/admin) and the /api/admin/ routes it reads."""
