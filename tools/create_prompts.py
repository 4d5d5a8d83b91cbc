"""Writes ``metas/<stem>.txt`` with one prompt for every ``videos/*.mp4`` that has none.

Port of the reference's ``scripts/create_prompts_for_nemo_assets.py`` (whose error paths refer to
undefined names): existing caption files are never touched; problems are reported clearly.

    python tools/create_prompts.py DATASET [--prompt "A video of sks teal robot."]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from v2w_jax.data import dataset as dataset_lib

DEFAULT_PROMPT = "A video of sks teal robot."


class PromptError(RuntimeError):
  """The dataset folder cannot be given prompts; the message says why."""


def create_prompts(dataset_dir: str | pathlib.Path, prompt: str = DEFAULT_PROMPT) -> list[pathlib.Path]:
  """Writes the missing caption files; returns the files written (in video order)."""
  root = pathlib.Path(dataset_dir)
  try:
    videos = dataset_lib.list_videos(root)  # the loader's own view of the folder
  except dataset_lib.DataError as e:
    raise PromptError(str(e)) from e
  if not prompt.strip():
    raise PromptError("the prompt is empty")
  metas = root / "metas"
  if metas.exists() and not metas.is_dir():
    raise PromptError(f"{metas} exists and is not a folder")
  metas.mkdir(exist_ok=True)
  written = []
  for video in videos:
    path = metas / f"{video.stem}.txt"
    if path.exists():
      continue
    try:
      path.write_text(prompt, encoding="utf-8")
    except OSError as e:
      raise PromptError(f"{path}: cannot write ({e})") from e
    written.append(path)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Write metas/<stem>.txt for videos that lack one.")
  parser.add_argument("dataset_dir")
  parser.add_argument("--prompt", default=DEFAULT_PROMPT)
  args = parser.parse_args(argv)
  try:
    written = create_prompts(args.dataset_dir, args.prompt)
  except PromptError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {len(written)} prompt files under {pathlib.Path(args.dataset_dir) / 'metas'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
