"""Helpers shared by the GPU benchmarks: timing, memory, JSON output, and the trainer's step at a shape."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def load_config(name: str):
  """``configs/<name>.py``'s ``get_config()`` (e.g. ``nemo``, ``nemo_14b``, ``tiny``)."""
  return importlib.import_module(f"configs.{name}").get_config()


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, warmup: int, steps: int) -> dict[str, float]:
  """Median/min/max seconds of `fn()` (blocked until ready) after `warmup` untimed calls."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "all_s": times}


def peak_memory_gib(device=None) -> float | None:
  stats = (device or jax.devices()[0]).memory_stats()
  if not stats:
    return None
  return stats.get("peak_bytes_in_use", 0) / 2**30


def memory_in_use_gib(device=None) -> float | None:
  stats = (device or jax.devices()[0]).memory_stats()
  if not stats:
    return None
  return stats.get("bytes_in_use", 0) / 2**30


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": d.device_kind,
          "device_count": jax.device_count()}


def write_json(path: str | None, payload: dict) -> None:
  if path:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=float))


def count_in_hlo(compiled_text: str, needle: str) -> int:
  return compiled_text.count(needle)


# ---- The trainer's step at a benchmark shape (shared by train_step.py, memory_report.py) -------------

# Latent (T, H, W) of each benchmark shape; pixel frames = 4·(T − 1) + 1, pixel size = 8·(H, W).
SHAPES = {"720p": (24, 88, 160), "480p": (8, 60, 104), "tiny": (3, 4, 6)}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
  """``["ema.offload=True", "model.remat_policy=full"]`` → {dotted key: Python value (literal or str)}."""
  out = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set expects KEY=VALUE (e.g. ema.offload=True), got {item!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def bench_config(shape: str, *, config_name: str = "nemo", remat: str | None = None, precision: str = "fp32_master",
                 backend: str = "auto", mesh_sizes: dict[str, int] | None = None,
                 overrides: dict[str, Any] | None = None):
  """``configs/<config_name>.py`` (``tiny`` for shape 'tiny') at a benchmark shape, with the benchmark
  flags and then ``overrides`` (dotted keys) applied."""
  config = load_config("tiny" if shape == "tiny" else config_name)
  for axis, size in (mesh_sizes or {}).items():
    config.mesh[axis] = size
  if remat:
    config.model.remat_policy = remat
  config.model.attention_backend = backend
  config.optim.precision = precision
  config.model.param_dtype = "bfloat16" if precision == "reference_bf16" else "float32"
  t, h, w = SHAPES[shape]
  config.data.num_frames = 4 * (t - 1) + 1
  config.data.video_size = (8 * h, 8 * w)
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"--set {key}: no such config field")
    node[leaf] = value
  return config


@dataclasses.dataclass
class StepSetup:
  """The trainer's jitted step for a config, with its abstract state and batch (nothing allocated)."""

  config: Any
  mesh: Any
  dit_cfg: Any
  abstract_state: Any
  initial_state: Callable[[], Any]
  train_step: Any  # training.step.JittedTrainStep
  batch: dict[str, jax.ShapeDtypeStruct]
  clips: int


def build_step(config) -> StepSetup:
  """Mesh, state shardings and the jitted step exactly as the trainer builds them; the global batch
  is one clip per data-parallel replica (data x fsdp)."""
  from v2w_jax.models import dit  # pylint: disable=import-outside-toplevel
  from v2w_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import memory as memory_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import optim as optim_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  mesh = mesh_lib.make_mesh(config.mesh)
  clips = mesh.shape["data"] * mesh.shape["fsdp"]
  config.data.global_batch_size = clips
  dit_cfg = trainer.dit_config(config)
  tx = optim_lib.make_optimizer(config)
  abstract_state, state_sh, initial_state = trainer.build_state(config, mesh, dit_cfg, tx)
  train_step = step_lib.make_jitted_train_step(config, mesh, dit.apply_fn(dit_cfg), state_sh, tx=tx)
  batch = memory_lib.abstract_batch(config, mesh, dit_cfg)
  return StepSetup(config, mesh, dit_cfg, abstract_state, initial_state, train_step, batch, clips)


def random_batch(abstract_batch: dict[str, jax.ShapeDtypeStruct], seed: int = 0) -> dict[str, jax.Array]:
  """Random latents and text embeddings, a zero padding mask, placed with the abstract batch's shardings."""
  keys = iter(jax.random.split(jax.random.key(seed), len(abstract_batch)))
  out = {}
  for name, a in abstract_batch.items():
    value = (jnp.zeros(a.shape, a.dtype) if name == "padding_mask"
             else jax.random.normal(next(keys), a.shape, jnp.float32).astype(a.dtype))
    out[name] = jax.device_put(value, a.sharding)
  return out
