"""The HTTP server around the app, hardened for the public internet.

aiohttp's own connection handling, with what a public server needs on top:

- a request's headers must arrive within `header_timeout` of its first byte, and an idle
  connection is closed after `keepalive_timeout` (both from the policy in force when the
  connection opens), so slow-header clients cannot hold connections;
- at most `max_connections` connections: past that, new ones get a short 503 and are
  closed at once, so descriptors never run out (no accept() error loop);
- a request aiohttp's parser rejects is answered with JSON, counted against its client's
  rate limit like any request, and logged as one line without any of its bytes (header
  values may be keys, paths hold chat ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from importlib import metadata
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from qp.config import Config
from qp.errors import BAD_REQUEST, StorageUnavailable, json_response, too_many_requests
from qp.logs import ACCESS_LOGGER, CLIENT_HASH, MALFORMED, AccessLogger
from qp.metrics import METRICS
from qp.middlewares import storage_unavailable
from qp.policy.policy import POLICY
from qp.protection.client_address import IP_SALT, hash_client, peer_address
from qp.protection.rate_limits import RATE_LIMITER

log = logging.getLogger("qp.http")

MALFORMED_RATE_CLASS = "chats"
# After an answer to a request whose body was not all read (408, 413), how long the rest
# is read and dropped so the client sees the answer before the connection closes.
LINGERING_SECONDS = 1.0
# Descriptors kept for the database, S3, logs and the listening socket.
RESERVED_DESCRIPTORS = 64
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 33\r\n"
    b"Retry-After: 5\r\n"
    b"Connection: close\r\n\r\n"
    b'{"error": "Service unavailable"}\n'
)


class GuardedRequestHandler(RequestHandler):
    """One connection: aiohttp's handler with a header deadline and JSON parse errors."""

    def __init__(self, manager: GuardedServer, *, header_timeout: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard_app = manager.app
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._requests_seen = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_count != self._requests_seen:
            # A request's headers are complete: its deadline is met.
            self._requests_seen = self._request_count
            self._cancel_header_deadline()
        elif self._header_deadline is None and not self._request_in_progress and data:
            # The first bytes of a request whose headers are not complete yet.
            self._header_deadline = self._loop.call_later(
                self._header_timeout, self._headers_too_slow
            )

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._request_count == self._requests_seen and not self._request_in_progress:
            self._guard_app[METRICS].connections_closed.labels("header_timeout").inc()
            self.force_close()

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _make_error_handler(self, err_info: Any) -> Any:
        """A request the parser refused: counted, answered with JSON, logged in one line."""

        async def refuse(request: web.BaseRequest) -> web.StreamResponse:
            request[MALFORMED] = True
            app = self._guard_app
            policy = app[POLICY].current
            client = hash_client(peer_address(request, policy.trusted), app[IP_SALT])
            request[CLIENT_HASH] = client
            limit = policy.rate_limit(MALFORMED_RATE_CLASS)
            log.warning("refused a request the HTTP parser could not read (%d)", err_info.status)
            try:
                refusal = await app[RATE_LIMITER].check(client, MALFORMED_RATE_CLASS, limit)
            except StorageUnavailable as err:
                # The shared counts are out of reach: a 503, as for any request then.
                response = storage_unavailable(request, err)
            else:
                if refusal is not None:
                    app[METRICS].rate_limit_refusals.labels("malformed", refusal.reason).inc()
                    error = too_many_requests(refusal.retry_after, refusal.message)
                    response = json_response(error.body, error.status, error.headers)
                else:
                    response = json_response({"error": BAD_REQUEST}, err_info.status)
            response.force_close()
            return response

        return refuse

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """An error the app's own middleware did not turn into an answer: JSON, one line."""
        log.error("%d answering a request: %s", status, type(exc).__name__ if exc else "-")
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already under way")
        response = json_response({"error": "Internal server error"}, status)
        if status == 504:
            response = json_response({"error": "Gateway Timeout"}, status)
        response.force_close()
        return response


class _TooManyConnections(asyncio.Protocol):
    """A connection over the limit: a 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is one without subclassing asyncio.Transport).
        stream = cast(asyncio.Transport, transport)
        stream.write(TOO_MANY_CONNECTIONS)
        stream.close()


class GuardedServer(web.Server):
    """aiohttp's protocol factory, making guarded handlers and refusing connections over
    the limit."""

    def __init__(self, inner: web.Server, app: web.Application, max_connections: int):
        super().__init__(
            inner.request_handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **inner._kwargs,
        )
        self.app = app
        self.max_connections = max_connections

    def __call__(self) -> Any:
        if len(self._connections) >= self.max_connections:
            self.app[METRICS].connections_closed.labels("too_many").inc()
            log.warning("%d connections open: refusing new ones", self.max_connections)
            return _TooManyConnections()
        policy = self.app[POLICY].current
        kwargs = {
            **self._kwargs,
            "keepalive_timeout": policy.keepalive_timeout,
            "lingering_time": LINGERING_SECONDS,
        }
        return GuardedRequestHandler(
            self, loop=self._loop, header_timeout=policy.header_timeout, **kwargs
        )


class GuardedAppRunner(web.AppRunner):
    """web.AppRunner whose server is a GuardedServer."""

    def __init__(self, app: web.Application, *, max_connections: int, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        inner = await super()._make_server()
        return GuardedServer(inner, self.app, self._max_connections)


def run(app: web.Application, config: Config) -> None:
    """Serve `app` until SIGTERM or SIGINT, then shut down gracefully (in-flight requests
    and streams get QP_SHUTDOWN_TIMEOUT). Start-up failures (StartupError, OSError for the
    listening socket) propagate."""
    loop, named = new_event_loop(config.event_loop)
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, config, named))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        finally:
            _cancel_the_rest(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def new_event_loop(asked: str | None) -> tuple[asyncio.AbstractEventLoop, str]:
    """uvloop's loop where it imports (unless QP_EVENT_LOOP=asyncio), else asyncio's; and
    the line naming it for the start-up log."""
    if asked != "asyncio":
        try:
            import uvloop
        except ImportError:
            why = "uvloop is not installed"
        else:
            return uvloop.new_event_loop(), f"uvloop {metadata.version('uvloop')}"
    else:
        why = "QP_EVENT_LOOP=asyncio"
    return asyncio.new_event_loop(), f"asyncio ({why})"


async def _serve(app: web.Application, config: Config, loop_named: str) -> None:
    runner = GuardedAppRunner(
        app,
        max_connections=connection_limit(config.max_connections),
        handle_signals=True,
        access_log_class=AccessLogger,
        # Its lines' format (QP_LOG_FORMAT) is the one configure_logging set.
        access_log=logging.getLogger(ACCESS_LOGGER),
        # SIGTERM/SIGINT: stop accepting, let requests and streams in flight finish.
        shutdown_timeout=config.shutdown_timeout,
        # A client that leaves cancels its handler: the completion relay relies on it to
        # abort upstream at once. Chat writes are shielded (see ChatStore).
        handler_cancellation=True,
    )
    try:
        # A resource that fails to open closes those opened before it (runner.cleanup).
        await runner.setup()
        site: web.BaseSite
        if config.unix_socket:
            site = web.UnixSite(runner, config.unix_socket)
        else:
            site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        logging.getLogger("qp.server").info("Running on %s (event loop: %s)", site.name, loop_named)
        await asyncio.Event().wait()  # until SIGTERM/SIGINT raises GracefulExit
    finally:
        await runner.cleanup()


def connection_limit(configured: int) -> int:
    """QP_MAX_CONNECTIONS, lowered to fit the open-file limit: a client connection may need
    an upstream one too, and the database and S3 need some descriptors of their own."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, (soft - RESERVED_DESCRIPTORS) // 2))


def _cancel_the_rest(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
