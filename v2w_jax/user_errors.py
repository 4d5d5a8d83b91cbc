"""User mistakes end in one ``error: ...`` line, not a traceback.

Every entry point (``python -m v2w_jax.train`` / ``generate``, the ``tools/`` scripts) runs its body
under :func:`main_guard`: a :class:`UserError` (a bad flag, file, field or checkpoint; the message
names it and says what to do) is printed as ``error: <message>`` on stderr and the process exits
with status 2. The module-specific errors (``WeightsError``, ``SpecError``, ``DataError``, ...)
derive from it, so library code keeps raising its own precise types. Anything else is a bug and
keeps its traceback; ``V2W_TRACEBACK=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A mistake the user can fix; the message names the file, field or flag and what to do."""


@contextlib.contextmanager
def main_guard() -> Iterator[None]:
  """Turns a :class:`UserError` into ``error: <message>`` on stderr and exit status 2.

  Usable as ``with main_guard(): ...`` or as a decorator ``@main_guard()``.
  """
  try:
    yield
  except UserError as err:
    if os.environ.get("V2W_TRACEBACK") == "1":
      raise
    sys.stdout.flush()
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR) from None
