"""Computes the Cosmos-Reason1.1 FULL_CONCAT text embedding of every distinct caption of a dataset.

The encoder and its recipe live in ``v2w_jax/data/text_encoder.py``; this tool runs it over a
dataset's captions (``metas/*.txt``) and any ``--caption`` given, and writes the embedding store the
loader memory-maps (``v2w_jax.data.text``).

The store also gets the reference inference script's default negative prompt
(``v2w_jax.inference.spec.DEFAULT_NEGATIVE_PROMPT``, stored under its own text as the key), which
``python -m v2w_jax.generate`` uses for the unconditional CFG branch of samples without their own
negative prompt; ``--no_negative_prompt`` leaves it out.

torch and transformers (the ``[text]`` extra) are imported lazily: the base package never needs them.

    python tools/compute_text_embeddings.py DATASET --model_dir=/path/to/Cosmos-Reason1-7B \\
        [--out_dir=DATASET/text_embeddings] [--batch_size=8] [--device=cuda] [--caption="..."] \\
        [--no_negative_prompt]
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import Sequence

if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from v2w_jax.data.text_encoder import NUM_TOKENS, ReasonTextEncoder, compute_store  # noqa: E402
from v2w_jax.data import text as text_lib  # noqa: E402
from v2w_jax.user_errors import main_guard  # noqa: E402

_log = logging.getLogger("compute_text_embeddings")


def dataset_captions(dataset_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
  """Distinct captions of the dataset's videos (sorted), and the problems met reading them."""
  from v2w_jax.data import dataset as dataset_lib  # pylint: disable=import-outside-toplevel

  captions, problems = set(), []
  for video in dataset_lib.list_videos(dataset_dir):
    try:
      captions.add(dataset_lib.read_caption(video))
    except dataset_lib.DataError as e:
      problems.append(str(e))
  return sorted(captions), problems


def captions_to_embed(dataset_dir: str | os.PathLike | None, extra: Sequence[str] = (), *,
                      negative_prompt: bool = True) -> list[str]:
  """Distinct, sorted captions for the store: ``extra``, the dataset's captions (problems are logged and
  skipped) and, with ``negative_prompt``, the reference's default negative prompt."""
  from v2w_jax.inference.spec import DEFAULT_NEGATIVE_PROMPT  # pylint: disable=import-outside-toplevel

  captions = set(extra)
  if dataset_dir:
    found, problems = dataset_captions(dataset_dir)
    for p in problems:
      _log.warning("skipping: %s", p)
    captions.update(found)
  if negative_prompt:
    captions.add(DEFAULT_NEGATIVE_PROMPT)
  return sorted(captions)


@main_guard
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dataset_dir", nargs="?", help="DATASET with videos/ and metas/")
  parser.add_argument("--model_dir", required=True, help="Hugging Face folder of Cosmos-Reason1.1-7B")
  parser.add_argument("--out_dir", default="", help="store folder (default DATASET/text_embeddings)")
  parser.add_argument("--caption", action="append", default=[], help="embed this caption too (repeatable)")
  parser.add_argument("--num_tokens", type=int, default=NUM_TOKENS)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--no_negative_prompt", action="store_true",
                      help="do not add the reference's default negative prompt to the store")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  captions = captions_to_embed(args.dataset_dir, args.caption, negative_prompt=not args.no_negative_prompt)
  if not captions:
    parser.error("no captions: give DATASET (with metas/*.txt) and/or --caption, or drop --no_negative_prompt")
  if not args.out_dir and not args.dataset_dir:
    parser.error("--out_dir is required without DATASET")
  out_dir = text_lib.default_store_dir(args.dataset_dir or ".", args.out_dir or None)
  encoder = ReasonTextEncoder(args.model_dir, dtype=args.dtype, device=args.device, num_tokens=args.num_tokens)
  done = compute_store(captions, out_dir, encoder, batch_size=args.batch_size, overwrite=args.overwrite)
  print(f"{out_dir}: wrote {len(done)} embeddings [{encoder.num_tokens}, {encoder.width}] bf16")
  return 0


if __name__ == "__main__":
  sys.exit(main())
