"""Input-pipeline throughput: decode + reference resize of T-frame windows, through the grain loader.

Generates synthetic source clips (default 720p H.264, like the Cosmos-NeMo assets) in a temp
folder with one caption and a full-size text embedding, then measures

* ``decode`` / ``resize``: one window decoded (decord) and resized (numpy) in this process;
* ``loader``: clips/s of ``make_loader`` batches with ``--workers`` grain worker processes
  (decode + resize + embedding load + batching + transfer to the main process).

Target (nemo: 93 frames, 720p → 704x1280): ≥ 2 clips/s with 4 workers on a 16-core host.

    python benchmarks/dataloader.py [--workers 4] [--num_frames 93 --height 704 --width 1280]
    python benchmarks/dataloader.py --tiny      # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import nemo  # noqa: E402  pylint: disable=wrong-import-position
from v2w_jax.data import dataset as dataset_lib  # noqa: E402  pylint: disable=wrong-import-position
from v2w_jax.data import sample_dataset as sd  # noqa: E402  pylint: disable=wrong-import-position
from v2w_jax.data import text as text_lib  # noqa: E402  pylint: disable=wrong-import-position
from v2w_jax.data import video as video_lib  # noqa: E402  pylint: disable=wrong-import-position


def make_clips(root: pathlib.Path, args) -> None:
  """Synthetic source clips + one caption + a [tokens, width] embedding (random, right shape)."""
  (root / "metas").mkdir(parents=True, exist_ok=True)
  for i in range(args.num_videos):
    frames = sd.render_frames(args.src_frames, args.src_height, args.src_width, seed=i)
    video_lib.write_mp4(root / "videos" / f"clip_{i:03d}.mp4", frames, fps=16, qp=20, threads=0)
    (root / "metas" / f"clip_{i:03d}.txt").write_text(sd.DEFAULT_CAPTION)
  emb = np.random.default_rng(0).standard_normal((args.text_tokens, args.text_width), np.float32)
  text_lib.TextEmbeddingStore(root / "text_embeddings").write([(sd.DEFAULT_CAPTION, emb)], encoder="benchmark (random)")


def time_single(root: pathlib.Path, args) -> dict:
  """Decode and resize timings of one window in this process (median of a few)."""
  videos = sorted((root / "videos").glob("*.mp4"))
  dec, res = [], []
  for k in range(args.single_reps):
    path = videos[k % len(videos)]
    t0 = time.perf_counter()
    reader = video_lib.open_reader(path, backend="auto", num_threads=args.decode_threads)
    frames = reader.read(0, args.num_frames)
    t1 = time.perf_counter()
    video_lib.resize_frames(frames, (args.height, args.width))
    t2 = time.perf_counter()
    dec.append(t1 - t0)
    res.append(t2 - t1)
  return {"decode_s": float(np.median(dec)), "resize_s": float(np.median(res))}


def time_loader(root: pathlib.Path, args) -> dict:
  c = nemo.get_config()
  c.data.update(
      dict(
          dataset_dir=str(root),
          num_frames=args.num_frames,
          video_size=(args.height, args.width),
          global_batch_size=args.batch,
          num_workers=args.workers,
          prefetch_buffer_size=2,
          text_tokens=args.text_tokens,
          decode_threads=args.decode_threads,
      )
  )
  c.model.crossattn_proj_in_channels = args.text_width
  t0 = time.perf_counter()
  it = dataset_lib.make_loader(c, process_index=0, process_count=1)
  try:
    for _ in range(args.warmup):
      next(it)
    t1 = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    t2 = time.perf_counter()
  finally:
    it.close()
  assert batch["video"].shape == (args.batch, 3, args.num_frames, args.height, args.width)
  clips = args.batches * args.batch
  return {"startup_s": t1 - t0, "loader_clips_per_s": clips / (t2 - t1), "loader_s_per_clip": (t2 - t1) / clips}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="small CPU smoke run")
  p.add_argument("--workers", type=int, default=4)
  p.add_argument("--num_frames", type=int, default=93)
  p.add_argument("--height", type=int, default=704)
  p.add_argument("--width", type=int, default=1280)
  p.add_argument("--src_height", type=int, default=720)
  p.add_argument("--src_width", type=int, default=1280)
  p.add_argument("--src_frames", type=int, default=0, help="default num_frames + 24")
  p.add_argument("--num_videos", type=int, default=4)
  p.add_argument("--text_tokens", type=int, default=512)
  p.add_argument("--text_width", type=int, default=100352)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--batches", type=int, default=16)
  p.add_argument("--warmup", type=int, default=4)
  p.add_argument("--decode_threads", type=int, default=2)
  p.add_argument("--single_reps", type=int, default=3)
  p.add_argument("--workdir", default="", help="keep the clips here (default: a temp folder)")
  args = p.parse_args(argv)
  if args.tiny:
    args.num_frames, args.height, args.width = 9, 32, 48
    args.src_height, args.src_width, args.num_videos = 72, 128, 3
    args.text_tokens, args.text_width = 16, 48
    args.workers, args.batches, args.warmup, args.single_reps = min(args.workers, 2), 6, 2, 2
  args.src_frames = args.src_frames or args.num_frames + 24

  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(args.workdir or tmp) / "bench_dataset"
    t0 = time.perf_counter()
    if not (root / "text_embeddings" / "index.json").exists():
      make_clips(root, args)
    result = {"make_clips_s": time.perf_counter() - t0}
    result.update(time_single(root, args))
    result.update(time_loader(root, args))
  result.update(
      workers=args.workers,
      num_frames=args.num_frames,
      size=[args.height, args.width],
      src=[args.src_height, args.src_width],
      cpus=os.cpu_count(),
  )
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
