"""The OpenAPI document of the API (document.py), in parts: the API's routes, the admin
routes, and the pieces both are written with."""
