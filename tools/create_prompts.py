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

DEFAULT_PROMPT = "A video of sks teal robot."


class PromptError(RuntimeError):
  """The dataset folder cannot be given prompts; the message says why."""


def create_prompts(dataset_dir: str | pathlib.Path, prompt: str = DEFAULT_PROMPT) -> list[pathlib.Path]:
  """Writes the missing caption files; returns the files written (in video order)."""
  root = pathlib.Path(dataset_dir)
  if not root.is_dir():
    raise PromptError(f"{root}: dataset folder does not exist")
  videos_dir = root / "videos"
  if not videos_dir.is_dir():
    raise PromptError(f"{root}: no videos/ folder (expected DATASET/videos/*.mp4)")
  videos = sorted(p for p in videos_dir.glob("*.mp4") if p.is_file())
  if not videos:
    raise PromptError(f"{videos_dir}: no .mp4 files")
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
