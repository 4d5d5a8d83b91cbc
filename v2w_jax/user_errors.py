"""Mistakes a user can fix end a command with one ``error: ...`` line on stderr, not a traceback.

Library code raises :class:`UserError` (or a subclass) whose message names the file, config field or
flag and says what to do; each entry point wraps its ``main`` in :func:`main_guard`, which prints the
message and returns :data:`EXIT_USAGE`. ``V2W_TRACEBACK=1`` re-raises instead, for debugging.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

EXIT_USAGE = 2  # bad flag, config, data or checkpoint: the message says what to change


class UserError(Exception):
  """A mistake in the input (flag, config field, file); the message says what is wrong and what to do."""


def report(err: BaseException | str, status: int = EXIT_USAGE) -> int:
  """Prints ``error: <err>`` to stderr and returns ``status`` (the exit status to use)."""
  print(f"error: {err}", file=sys.stderr, flush=True)
  return status


def show_traceback() -> bool:
  """Whether to re-raise user errors with their traceback (``V2W_TRACEBACK=1``)."""
  return os.environ.get("V2W_TRACEBACK") == "1"


def main_guard(fn: Callable[..., Any] | None = None, *, errors: tuple[type[BaseException], ...] = (UserError,),
               status: int = EXIT_USAGE):
  """Decorates ``main``: an exception of ``errors`` becomes one ``error:`` line and exit ``status``.

  Usable as ``@main_guard`` or ``@main_guard(errors=(UserError, ValueError))``.
  """

  def decorate(main):
    @functools.wraps(main)
    def guarded(*args, **kwargs):
      try:
        return main(*args, **kwargs)
      except errors as err:
        if show_traceback():
          raise
        return report(err, status)

    return guarded

  return decorate(fn) if fn is not None else decorate
