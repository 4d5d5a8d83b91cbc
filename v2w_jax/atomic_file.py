"""Atomic file writes with ordinary permissions.

A file is written under a hidden temporary name in its destination folder and renamed over the final
name when complete, so a crash never leaves a half-written file under the final name. The temporary
file is created with mode 0666 minus the process umask (0644 with the usual umask of 022) -- what
``open(path, "wb")`` gives -- not the 0600 of ``tempfile.mkstemp``: exported weights and embedding
stores are meant to be read by other users and jobs.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[BinaryIO]:
  """Yields a binary file whose contents replace ``path`` atomically when the block exits cleanly.

  On an exception the temporary file is removed and ``path`` is left untouched.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
