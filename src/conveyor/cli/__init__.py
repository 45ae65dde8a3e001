"""The `conveyor` command: a thin adapter over the application object (and, for the
commands that talk to a server, over the Python client).

Exit codes: 0 success; 1 an error (the request failed, bad input, not found); 2 a usage
error or, for `wait`, a time-out; 3 the database (or the server) cannot be reached.

Each module registers its commands on the root command: `requests` (submit, status,
wait, list, cancel, retry, logs), `service` (queues, pause, resume, workers, worker,
serve, up, db), `tokens`, `bench` (bench, bench-api) and `scan`.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from conveyor.app import UnknownPipeline
from conveyor.cli.common import EXIT_ERROR, EXIT_UNAVAILABLE, CliError, cli, err
from conveyor.client import ClientError, ServerUnavailable
from conveyor.config import ConfigError
from conveyor.executors.python import HandlerError
from conveyor.pipelines import ParamsError
from conveyor.store import Conflict, NotFound, StoreError, Unavailable
from conveyor.tasks import TransitionError
from conveyor.tokens import TokenNameError

# Commands are listed in the order they are registered: this order.
# isort: off
from conveyor.cli import requests, scan, service, tokens, bench
# isort: on

__all__ = ["bench", "cli", "main", "requests", "scan", "service", "tokens"]


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"conveyor: {message}", markup=False)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    # Typer answers usage errors itself (exit 2); the domain's errors become one line.
    try:
        cli(args=argv, prog_name="conveyor")
    except CliError as exc:
        _fail(str(exc), exc.code)
    except Unavailable as exc:
        _fail(f"database unavailable: {exc}", EXIT_UNAVAILABLE)
    except ServerUnavailable as exc:
        _fail(str(exc), EXIT_UNAVAILABLE)
    except ClientError as exc:
        _fail(str(exc), EXIT_ERROR)
    except (
        UnknownPipeline,
        ParamsError,
        ConfigError,
        NotFound,
        Conflict,
        TransitionError,
        HandlerError,
        StoreError,
        TokenNameError,
    ) as exc:
        message = str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)
        if isinstance(exc, ParamsError):
            message = f"params invalid at {exc.path}: {exc.message}"
        _fail(message, EXIT_ERROR)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
