"""Logging on stderr: one line per request, naming the route pattern, never paths or bodies."""

from __future__ import annotations

import asyncio
import logging
import sys
import time as _time
from collections.abc import Callable

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from qp.timestamps import format_epoch

# The request key under which the middleware's rate limiting leaves the client's address hash,
# for the access log.
CLIENT_HASH = web.RequestKey("client_hash", str)
# When the request reached the middleware (time.monotonic()), and the relay's own
# share of a streamed completion's time (seconds, upstream's waits left out), for the log.
ARRIVED = web.RequestKey("arrived", float)
RELAY_OVERHEAD = web.RequestKey("relay_overhead", float)
# Set on a request the HTTP parser refused (it has no route and no headers).
MALFORMED = web.RequestKey("malformed", bool)
# Methods logged as they are; any other is logged as OTHER (a method can be 8 KB long).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


LOG_FORMATS = ("text", "json")
# The logger of the access log's lines (one per request; see AccessLogger).
ACCESS_LOGGER = "qp.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": format_epoch(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class OncePerSecond(logging.Filter):
    """Lets one line of each kind through per second, and says how many it held back.

    A line is of the kind its logger and message template make, so a warning a client can
    trigger on every request costs the log one line a second, not one per request. Lines
    of other libraries lose their traceback and message (they may quote request bytes:
    keys, paths) and keep the exception's type.
    """

    def __init__(self, clock: Callable[[], float] = _time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last: dict[tuple[str, object], float] = {}
        self._held: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("qp"):
            _strip_details(record)
        key = (record.name, record.msg)
        now = self._clock()
        if now - self._last.get(key, -1.0) < 1.0:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if len(self._last) > 10_000:  # kinds are few; this only bounds a flood of odd ones
            self._last.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it held back)"
            record.args = ()
        return True


def _strip_details(record: logging.LogRecord) -> None:
    kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
    record.msg = str(record.msg).split("%", 1)[0].strip() + (f" ({kind})" if kind else "")
    record.args = ()
    record.exc_info = None
    record.exc_text = None


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Log lines on stderr, text or JSON, at most one of a kind a second; the access log's
    lines through an AccessLines handler on `qp.access`."""
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(OncePerSecond())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [AccessLines(log_format == "json", formatter)]
    access.propagate = False
    # aiohttp's own access logger would log raw paths, which carry chat ids (bearer secrets).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for chatty in ("botocore", "aiobotocore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def route_name(request: web.BaseRequest) -> str:
    """The route's pattern, never the path itself: chat ids in paths are bearer secrets."""
    if request.get(MALFORMED):
        return "(malformed)"
    try:
        match_info = request.match_info  # type: ignore[attr-defined]
    except (AttributeError, AssertionError):  # it never reached the router
        return "(no route)"
    if match_info is None or match_info.http_exception is not None:
        return "(no route)"
    return match_info.route.resource.canonical if match_info.route.resource else "(no route)"


def method_name(request: web.BaseRequest) -> str:
    return request.method if request.method in KNOWN_METHODS else "OTHER"


class AccessLines(logging.Handler):
    """The access log's lines for the whole process (aiohttp makes an access logger per
    connection): batched writes, and the per-second limit with its count of held lines.

    A handler of the `qp.access` logger, so that logging's own shutdown at exit writes what
    is still pending, the count of held lines included.
    """

    FLUSH_SECONDS = 0.2
    MAX_PENDING = 256
    LINES_PER_SECOND = 1000
    LINES_PER_CLIENT = 20

    def __init__(self, json: bool = False, formatter: logging.Formatter | None = None):
        super().__init__()
        self.setFormatter(formatter or logging.Formatter(TEXT_FORMAT))
        self.json = json
        self.stream = sys.stderr
        self._pending: list[str] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._window = -1
        self._written = 0
        self._by_client: dict[str, int] = {}
        self._held = 0
        self._report_timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    @classmethod
    def of(cls, logger: logging.Logger) -> AccessLines:
        """The logger's AccessLines; one is added (text lines) when configure_logging did not."""
        for handler in logger.handlers:
            if isinstance(handler, AccessLines):
                return handler
        lines = cls()
        logger.addHandler(lines)
        logger.propagate = False
        return lines

    def admit(self, client: str) -> bool:
        """Whether a line for `client` may be written this second; if not, it is counted and
        the count said once the second is over."""
        window = int(_time.time())
        if window != self._window:
            self._window, self._written = window, 0
            self._by_client.clear()
        seen = self._by_client.get(client, 0)
        if self._written < self.LINES_PER_SECOND and seen < self.LINES_PER_CLIENT:
            self._by_client[client] = seen + 1
            self._written += 1
            return True
        self._held += 1
        if self._report_timer is None:
            self._report_timer = asyncio.get_running_loop().call_later(
                1.0 - _time.time() % 1, self.report_held
            )
        return False

    def report_held(self) -> None:
        self._report_timer = None
        held, self._held = self._held, 0
        if not held:
            return
        text = (
            f"{held} access lines held back in one second (over {self.LINES_PER_CLIENT}"
            f" for a client or {self.LINES_PER_SECOND} in all)"
        )
        record = logging.LogRecord(ACCESS_LOGGER, logging.WARNING, __file__, 0, text, (), None)
        self.add(self.format(record))

    def emit(self, record: logging.LogRecord) -> None:
        """A line logged through the logging module joins the batch."""
        self.add(self.format(record))

    def add(self, line: str) -> None:
        self._pending.append(line + "\n")
        if len(self._pending) >= self.MAX_PENDING:
            self.flush()
        elif self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # at exit
                self.flush()
                return
            self._flush_timer = loop.call_later(self.FLUSH_SECONDS, self.flush)

    def timestamp(self) -> str:
        now = _time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(second))
        return f"{self._stamp},{int(now % 1 * 1000):03d}"

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._pending:
            self.stream.write("".join(self._pending))
            self.stream.flush()
            self._pending.clear()

    def close(self) -> None:
        """What is still pending, the count of held lines included (logging.shutdown)."""
        if self._report_timer is not None:
            self._report_timer.cancel()
            self.report_held()
        self.flush()
        super().close()


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, route pattern, status, duration, bytes sent, and the
    client's address hash; JSON when the log format (QP_LOG_FORMAT) is `json`.

    Lines skip the logging module's records and go to the AccessLines handler of the
    logger aiohttp gives (`qp.access`), written in batches (at most 0.2 s late): a write
    per request cost a third of a cached GET's time. At most LINES_PER_CLIENT a second per
    client and LINES_PER_SECOND in all are written; how many were held back is said in one
    line a second, so a flood costs the log a bounded rate.
    """

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.lines = AccessLines.of(logger)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        client = request.get(CLIENT_HASH, "-")
        if not self.lines.admit(client):
            return
        overhead = request.get(RELAY_OVERHEAD)
        if self.lines.json:
            line = orjson.dumps(
                {
                    "time": format_epoch(_time.time()),
                    "level": "INFO",
                    "logger": ACCESS_LOGGER,
                    "method": method_name(request),
                    "route": route_name(request),
                    "status": response.status,
                    "duration_ms": round(time * 1000, 1),
                    "bytes": response.body_length,
                    "client": client,
                    **({} if overhead is None else {"overhead_ms": round(overhead * 1000, 3)}),
                }
            ).decode()
        else:
            line = (
                f"{self.lines.timestamp()} INFO qp.access {method_name(request)}"
                f" {route_name(request)} {response.status} {time * 1000:.1f}ms"
                f" {response.body_length}B client={client}"
            )
            if overhead is not None:
                line += f" overhead_ms={overhead * 1000:.3f}"
        self.lines.add(line)
