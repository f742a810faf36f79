"""Plumbing: databases (SQLite, PostgreSQL), blob stores (folder, S3), batches, locks, leases,
disk space. It imports no feature."""
