"""Keys for what the application knows of its own life: its clock, when it started, and
whether it is shutting down. Every other key lives beside the type it holds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

# Set when SIGTERM/SIGINT starts the shutdown: streams cut after it are `shutdown`.
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
# The wall clock budget periods roll over by (time.time; tests set the day).
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
# When the app was made, by that clock (epoch seconds).
STARTED_AT = web.AppKey("started_at", float)
