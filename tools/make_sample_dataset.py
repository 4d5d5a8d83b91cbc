"""Makes the synthetic sample dataset (videos/, metas/, text_embeddings/) in seconds.

Moving, rotating coloured shapes encoded as H.264 mp4 with PyAV, one caption per clip, and text
embeddings from a small deterministic STAND-IN encoder (hashed byte n-grams, randomly projected,
standardised per token) — not Cosmos-Reason1.1; see ``v2w_jax/data/sample_dataset.py``.
Defaults fit ``configs/tiny.py``; ``--config`` takes the sizes from a config instead. OUT_DIR must be
new, empty or an earlier sample dataset: a folder holding other files is refused (exit status 2).

    python tools/make_sample_dataset.py data/sample_dataset --num_videos 4 --frames 24 \
        --height 64 --width 96 --text_tokens 16 --text_width 48
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from v2w_jax.data import sample_dataset as sd  # pylint: disable=import-outside-toplevel

  d = sd.SampleSpec()
  parser = argparse.ArgumentParser(description="Write the synthetic sample dataset.")
  parser.add_argument("out_dir")
  parser.add_argument("--config", default="", help="take sizes from this config file (e.g. configs/tiny.py)")
  parser.add_argument("--num_videos", type=int, default=d.num_videos)
  parser.add_argument("--frames", type=int, default=None, help=f"frames per clip (default {d.frames})")
  parser.add_argument("--height", type=int, default=None, help=f"clip height (default {d.height})")
  parser.add_argument("--width", type=int, default=None, help=f"clip width (default {d.width})")
  parser.add_argument("--fps", type=int, default=d.fps)
  parser.add_argument("--caption", action="append", default=[], help="captions, cycled over the clips")
  parser.add_argument("--text_tokens", type=int, default=None, help=f"default {d.text_tokens}")
  parser.add_argument("--text_width", type=int, default=None, help=f"default {d.text_width}")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)

  if args.config:
    import importlib.util  # pylint: disable=import-outside-toplevel

    spec_ = importlib.util.spec_from_file_location("_cfg", args.config)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    spec = sd.spec_for_config(module.get_config())
  else:
    spec = d
  fields = dict(num_videos=args.num_videos, fps=args.fps, seed=args.seed)
  for name in ("frames", "height", "width", "text_tokens", "text_width"):
    if getattr(args, name) is not None:
      fields[name] = getattr(args, name)
  if args.caption:
    fields["captions"] = tuple(args.caption)
  import dataclasses  # pylint: disable=import-outside-toplevel

  spec = dataclasses.replace(spec, **fields)
  t0 = time.perf_counter()
  try:
    out = sd.make_sample_dataset(args.out_dir, spec, overwrite=args.overwrite)
  except sd.NotASampleDatasetFolder as err:  # a folder of other files: nothing was written
    from v2w_jax.user_errors import report  # pylint: disable=import-outside-toplevel

    return report(err)
  print(f"{out}: {spec.num_videos} clips of {spec.frames} frames at {spec.height}x{spec.width}, "
        f"embeddings [{spec.text_tokens}, {spec.text_width}] (stand-in encoder), {time.perf_counter() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
