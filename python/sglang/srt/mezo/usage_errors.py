"""A user's mistake, told in one line.

Every check of a user's input (a flag, a file, the data, the output directory) raises a
`UsageError` subclass whose message says what is wrong and how to fix it. The Python API
lets it propagate (it is a ``ValueError``); the command-line tools print ``error: <message>``
on stderr and exit with status 2, argparse's convention, without a traceback (``--debug``
or ``MEZO_DEBUG=1`` shows it).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MEZO_DEBUG"
USAGE_EXIT_STATUS = 2

T = TypeVar("T")


class UsageError(ValueError):
    """A bad input: the message names it and says how to fix it."""


class ConfigError(UsageError):
    """A `MeZOConfig` field (a CLI flag) holds a value that cannot work; the message names both."""


class ParserErrorsAreUsageErrors:
    """A mixin for an argparse parser: its own errors (unknown flag, invalid choice, bad
    number) raise `UsageError`, reported like every other mistake, instead of printing the
    usage and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def exit_with_usage_error(message: str) -> None:
    """Prints ``error: message`` on stderr and exits with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT_STATUS)


def split_debug_flag(argv: list) -> tuple:
    """(argv without ``--debug``, whether tracebacks are wanted: the flag or MEZO_DEBUG=1)."""
    wanted = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [arg for arg in argv if arg != DEBUG_FLAG], wanted


def reporting_usage_errors(main: Callable[[], T], debug: bool) -> T:
    """Runs `main`; a `UsageError` becomes one line and exit status 2 (re-raised with `debug`)."""
    try:
        return main()
    except UsageError as error:
        if debug:
            raise
        exit_with_usage_error(str(error))
