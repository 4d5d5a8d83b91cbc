"""Latent cache on the GPU: cache build throughput, and the trainer's iterations with and without it.

Everything synthetic (no downloads, random weights):

1. ``dataset``: ``--clips`` H.264 clips of ``--src_frames`` frames at ``--src_height`` x ``--src_width``
   (default 5 x 121 x 720 x 1280, like the Cosmos-NeMo assets), one caption and a random
   [text_tokens, text_width] text embedding;
2. ``build``: ``tools/cache_latents.py`` on it with the config (nemo: a random-init, real-size Wan2.1
   VAE), ``--windows`` windows per clip; from its ``--json``: windows/s and clips/s per device after
   the first batch (compilation), and the whole run's time;
3. ``online`` / ``cached``: the trainer's own command (``python -m v2w_jax.train``, random weights,
   one metrics row per iteration), without and with ``--config.data.latent_cache.dir``. Once
   ``--iters`` iterations are logged the run is stopped (SIGKILL to its process group: the final
   checkpoint is not what is measured). For the iterations after the first (compilation) it reports
   the medians of the trainer's ``data_wait_s``, ``vae_s`` (online: the VAE encode; cached: moving the
   cached latents to the device and normalising them), ``step_s`` and ``iter_s`` (their sum), the
   ratio ``iter_s / step_s``, and ``loop_s``, the time between consecutive metrics rows (the whole
   loop, logging included).

The trainer runs share a persistent compilation cache, so the second one does not compile the step
again. On one H200::

    python3 -m benchmarks.latent_cache --json=latent_cache.json                 # all stages, ~5-6 min
    python3 -m benchmarks.latent_cache --stages=dataset,build,cached --workdir=carry/lcb   # ~3 min
    python3 -m benchmarks.latent_cache --stages=online --workdir=carry/lcb               # ~3 min

``--tiny`` runs every stage with ``configs/tiny.py`` on CPU in a few minutes (the CPU test's dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from v2w_jax.data import sample_dataset as sd  # noqa: E402  pylint: disable=wrong-import-position
from v2w_jax.data import text as text_lib  # noqa: E402  pylint: disable=wrong-import-position
from v2w_jax.data import video as video_lib  # noqa: E402  pylint: disable=wrong-import-position

STAGES = ("dataset", "build", "online", "cached")


def _parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="CPU dry run: configs/tiny.py, small clips")
  p.add_argument("--config", default="configs/nemo.py")
  p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
  p.add_argument("--workdir", default="", help="dataset, cache and job folders (default: a temp folder)")
  p.add_argument("--clips", type=int, default=5)
  p.add_argument("--src_frames", type=int, default=121)
  p.add_argument("--src_height", type=int, default=720)
  p.add_argument("--src_width", type=int, default=1280)
  p.add_argument("--text_tokens", type=int, default=512)
  p.add_argument("--text_width", type=int, default=100352)
  p.add_argument("--windows", type=int, default=2, help="data.latent_cache.windows_per_clip")
  p.add_argument("--iters", type=int, default=3, help="trainer iterations per run (the first one compiles)")
  p.add_argument("--run_timeout", type=int, default=420, help="seconds allowed for each tool/trainer run")
  p.add_argument("--json", default="", help="write the results here")
  args = p.parse_args(argv)
  if args.tiny:
    args.config = "configs/tiny.py"
    args.clips, args.src_frames, args.src_height, args.src_width = 3, 16, 64, 96
    args.text_tokens, args.text_width = 16, 48
  args.stages = [s for s in args.stages.split(",") if s]
  unknown = sorted(set(args.stages) - set(STAGES))
  if unknown:
    p.error(f"unknown stages {unknown}; choose from {STAGES}")
  return args


# ----------------------------------------------------------------------------------------------
# Stages.


def make_dataset(root: pathlib.Path, args) -> dict[str, Any]:
  """Synthetic clips (rendered at 1/4 size and upscaled: the content does not matter, the size does)."""
  t0 = time.perf_counter()
  if (root / "text_embeddings" / text_lib.INDEX_NAME).is_file():
    return {"seconds": 0.0, "reused": True}
  (root / "metas").mkdir(parents=True, exist_ok=True)
  for i in range(args.clips):
    small = sd.render_frames(args.src_frames, args.src_height // 4, args.src_width // 4, seed=i)
    frames = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)
    video_lib.write_mp4(root / "videos" / f"clip_{i:03d}.mp4", frames, fps=16, qp=20, threads=0)
    (root / "metas" / f"clip_{i:03d}.txt").write_text(sd.DEFAULT_CAPTION)
  emb = np.random.default_rng(0).standard_normal((args.text_tokens, args.text_width), np.float32)
  text_lib.TextEmbeddingStore(root / "text_embeddings").write([(sd.DEFAULT_CAPTION, emb)],
                                                              encoder="benchmark (random)")
  return {"seconds": time.perf_counter() - t0, "reused": False}


def _config_flags(args, dataset: pathlib.Path) -> list[str]:
  flags = [f"--config={args.config}", f"--config.data.dataset_dir={dataset}", "--config.data.val_dataset_dir=",
           f"--config.data.latent_cache.windows_per_clip={args.windows}"]
  if args.tiny:
    flags.append("--config.data.make_sample_dataset=False")
  return flags


def _env(workdir: pathlib.Path, **extra: str) -> dict[str, str]:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))
  env.update(extra)
  return env


def build(dataset: pathlib.Path, cache: pathlib.Path, workdir: pathlib.Path, args) -> dict[str, Any]:
  summary = workdir / "build.json"
  cmd = [sys.executable, "tools/cache_latents.py", str(dataset), *_config_flags(args, dataset), f"--out={cache}",
         f"--json={summary}", "--quiet"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=_env(workdir), capture_output=True, text=True, timeout=args.run_timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"cache build failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  out = json.loads(summary.read_text())
  out["command_s"] = time.perf_counter() - t0
  return out


def _rows(metrics: pathlib.Path | None) -> list[dict]:
  if metrics is None or not metrics.is_file():
    return []
  rows = []
  for line in metrics.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line being written
    if "train/step_s" in row:
      rows.append(row)
  return rows


def summarize_iterations(rows: list[dict]) -> dict[str, Any]:
  """Medians over the iterations after the first (one metrics row each); ``loop_s`` from their timestamps."""
  if len(rows) < 2:
    raise ValueError(f"need at least 2 logged iterations, got {len(rows)}")
  later = rows[1:]
  med = lambda key: statistics.median(r[f"train/{key}"] for r in later)  # noqa: E731
  out = {"iterations": len(rows), "data_wait_s": med("data_wait_s"), "vae_s": med("vae_s"), "step_s": med("step_s")}
  out["iter_s"] = statistics.median(r["train/data_wait_s"] + r["train/vae_s"] + r["train/step_s"] for r in later)
  out["iter_over_step"] = out["iter_s"] / out["step_s"]
  out["loop_s"] = statistics.median(b["time"] - a["time"] for a, b in zip(rows, rows[1:]))
  out["loss"] = [r["train/loss"] for r in rows]
  return out


def train(name: str, dataset: pathlib.Path, workdir: pathlib.Path, args, *extra: str) -> dict[str, Any]:
  """The trainer's command until ``args.iters`` iterations are logged; their summary."""
  out_root = workdir / f"jobs_{name}"
  cmd = [sys.executable, "-m", "v2w_jax.train", *_config_flags(args, dataset), "--config.trainer.max_iter=100000",
         "--config.trainer.logging_iter=1", "--config.trainer.save_iter=100000", "--config.trainer.sample_iter=0",
         "--config.trainer.run_validation=False", "--config.wandb.mode=disabled", *extra]
  log = workdir / f"train_{name}.log"
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(workdir, V2W_OUTPUT_ROOT=str(out_root)), stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)
  metrics = None  # <out_root>/<project>/<group>/<name>/metrics.jsonl, once the trainer made it
  try:
    while proc.poll() is None and time.perf_counter() - t0 < args.run_timeout:
      metrics = metrics or next(iter(out_root.glob("*/*/*/metrics.jsonl")), None)
      if len(_rows(metrics)) >= args.iters:
        break
      time.sleep(0.5)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers (its own session)
      proc.wait()
  rows = _rows(metrics)[: args.iters]
  if len(rows) < args.iters:
    raise RuntimeError(f"{name} run logged {len(rows)} of {args.iters} iterations in "
                       f"{time.perf_counter() - t0:.0f} s; log tail:\n{log.read_text()[-4000:]}")
  result = summarize_iterations(rows)
  result["command_s"] = time.perf_counter() - t0
  return result


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = _parse(argv)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(args.workdir or tmp).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dataset, cache = workdir / "dataset", workdir / "latent_cache"
    results: dict[str, Any] = {"config": args.config, "clips": args.clips, "windows_per_clip": args.windows,
                               "source": [args.src_frames, args.src_height, args.src_width]}
    if "dataset" in args.stages:
      results["dataset"] = make_dataset(dataset, args)
    if "build" in args.stages:
      results["build"] = build(dataset, cache, workdir, args)
    if "online" in args.stages:
      results["online"] = train("online", dataset, workdir, args)
    if "cached" in args.stages:
      results["cached"] = train("cached", dataset, workdir, args, f"--config.data.latent_cache.dir={cache}")
  _print(results)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return results


def _print(results: dict[str, Any]) -> None:
  if "build" in results:
    b = results["build"]
    print(f"cache build: {b['encoded_clips']} clips ({b['encoded_windows']} windows) in {b['seconds']:.1f} s "
          f"(first batch incl. compile {b['first_batch_s']:.1f} s); {b['windows_per_s']:.3g} windows/s = "
          f"{b['clips_per_s_per_device']:.3g} clips/s per device")
  for name in ("online", "cached"):
    if name in results:
      r = results[name]
      print(f"trainer {name:6s}: data wait {r['data_wait_s']:.4f} s, vae {r['vae_s']:.4f} s, step {r['step_s']:.3f} s, "
            f"iteration {r['iter_s']:.3f} s = {r['iter_over_step']:.3f}x the step (loop {r['loop_s']:.3f} s)")
  print(json.dumps(results, default=float))


if __name__ == "__main__":
  main()
