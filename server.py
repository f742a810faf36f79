"""qp-server: `python server.py [--host H] [--port P] [--unix-socket PATH]`.

Everything else comes from environment variables (see docs/configuration.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys

from qp.app import create_app
from qp.config import ConfigError, describe, load_config
from qp.http_server import run
from qp.logs import configure_logging
from qp.policy.loader import load_policy
from qp.startup import StartupError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="qp-server: the QP chat backend")
    parser.add_argument("--host", help="address to listen on (QP_HOST, default 127.0.0.1)")
    parser.add_argument("--port", help="port to listen on (QP_PORT, default 8787)")
    parser.add_argument("--unix-socket", help="listen on this unix socket instead (QP_UNIX_SOCKET)")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the environment and the QP_CONFIG file, print the effective settings"
        " (secrets masked) and exit 0, or 1 with the problem",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(host=args.host, port=args.port, unix_socket=args.unix_socket)
        policy = load_policy(os.environ, config.config_path)
    except ConfigError as err:
        print(f"qp-server: {err}", file=sys.stderr)
        return 1 if args.check_config else 2
    if args.check_config:
        print(describe(config, policy), end="")
        return 0
    configure_logging(config.log_format)
    _raise_open_file_limit()
    try:
        run(create_app(config, policy), config)
    except StartupError as err:
        print(f"qp-server: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        target = config.unix_socket or f"{config.host}:{config.port}"
        print(f"qp-server: cannot listen on {target}: {err.strerror or err}", file=sys.stderr)
        return 1
    except Exception as err:  # one line, never a traceback, whatever stopped it
        print(f"qp-server: stopped: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


def _raise_open_file_limit() -> None:
    """Each open stream holds two sockets; take the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    sys.exit(main())
