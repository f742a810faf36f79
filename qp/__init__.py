"""qp-server: the QP chat backend (see README.md)."""
