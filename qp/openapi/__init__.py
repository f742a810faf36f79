"""The OpenAPI document of the API (document.py), in parts: the chat routes, the completion
and usage routes, the operators' routes, the admin routes, and the pieces all are written
with."""
