"""The operators' command line, `python -m qp`: one module per command family."""
