"""Per-device memory of a training or generation job for a config and mesh, before running it.

Each row is labelled with how it was obtained:

* ``compiled``: XLA's ``memory_analysis()`` of the real program for the mesh (the train step with the
  trainer's shardings, or the generation loop and VAE decode). Needs as many devices as the mesh: the
  GPUs, a CPU with ``--xla_force_host_platform_device_count``, or ``--mock_gpus=N`` (one GPU posing as
  N, compile only).
* ``derived`` (training, for more devices than exist): the real train step of the same net cut to one
  block, compiled for one device at the per-device clip (one clip per data-parallel replica, latent
  frames / context), less its own state and gradients = the activations outside the blocks plus one
  block's working set and residuals; each further block adds what the forward saves for the backward
  under the remat policy (traced from the model at that shape, exact); the state (parameters, Adam
  moments, EMA; per precision) and the float32 gradients are added exactly as the mesh's shardings
  divide them. Nothing is allocated: every program is lowered from abstract shapes. Approximations:
  the one-device program has no collectives or gathered-weight buffers, and context parallelism is
  modelled by its per-device token count (Ulysses attention holds as many elements per device).

Usage (720p, the 14B, full fine-tune on 8 GPUs as FSDP 4 x context 2; on any machine)::

    python -m benchmarks.memory_plan --config=nemo_14b --fsdp=4 --context=2 --json=plan.json
    python -m benchmarks.memory_plan --config=nemo_14b --mode=generate --param_dtype=bfloat16
    python -m benchmarks.memory_plan --tiny      # CPU dry run of every path (configs/tiny.py)

On a CPU the compiled numbers are XLA:CPU's plan (no cuDNN attention: it materialises the attention
scores), not a GPU's; use them for the tiny config and the method, not for 720p.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.train_step import SHAPES
from v2w_jax.parallel import mesh as mesh_lib
from v2w_jax.parallel.rules import MESH_AXES
from v2w_jax.training import memory as memory_lib

GIB = 2**30


def memory_of(compiled) -> dict[str, int]:
  """Bytes per device from ``compiled.memory_analysis()`` (``training/memory.py``); peak = arguments +
  outputs - aliased + temporaries; ``xla_peak``: XLA's own figure, where the backend gives one."""
  m = memory_lib.ProgramMemory.from_compiled("", compiled)
  out = {"argument": m.arguments, "output": m.outputs, "alias": m.aliased, "temp": m.temporaries, "peak": m.peak}
  if m.compiler_peak:
    out["xla_peak"] = m.compiler_peak
  return out


def _tree_bytes(tree: Any) -> int:
  return sum(memory_lib.per_device_bytes(tree))


def _model_state(config, mesh):
  """(DiT config, optimizer, abstract train state with shardings, state shardings) as the trainer builds them."""
  from v2w_jax.training import optim as optim_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  dit_cfg = trainer.dit_config(config)
  tx = optim_lib.make_optimizer(config)
  abstract, shardings, _ = trainer.build_state(config, mesh, dit_cfg, tx)
  return dit_cfg, tx, abstract, shardings


def state_bytes(config, mesh) -> dict[str, int]:
  """Exact per-device bytes of the train state's parts and of the float32 gradients (sharded like the
  parameters, as the step's reduce-scatter leaves them). ``mesh`` may be an ``AbstractMesh``."""
  _, _, state, _ = _model_state(config, mesh)
  grads = sum(int(np.prod(p.sharding.shard_shape(p.shape))) * 4 for p in jax.tree.leaves(state.params))
  parts = {"params": _tree_bytes(state.params), "opt_state": _tree_bytes(state.opt_state),
           "ema": _tree_bytes(state.ema_params) if state.ema_params is not None else 0}
  parts["state"] = sum(parts.values())
  parts["grads_fp32"] = grads
  return parts


def _per_device_latent(latent_thw, sizes: dict[str, int]) -> tuple[int, int, int]:
  t, h, w = latent_thw
  if t % sizes["context"]:
    raise ValueError(f"context={sizes['context']} does not divide the {t} latent frames")
  return t // sizes["context"], h, w


def compile_train_step(config, mesh, latent_thw, clips: int):
  """The trainer's jitted step for ``mesh``, lowered from abstract state and batch, compiled."""
  from v2w_jax.models import dit  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel

  dit_cfg, tx, state, shardings = _model_state(config, mesh)
  step = step_lib.make_jitted_train_step(config, mesh, dit.apply_fn(dit_cfg), shardings, tx=tx)
  batch = {
      "latents": jax.ShapeDtypeStruct((clips, dit_cfg.in_channels, *latent_thw), jnp.float32),
      "text_embeddings": jax.ShapeDtypeStruct((clips, int(config.data.text_tokens), dit_cfg.text_in_channels),
                                              jnp.bfloat16),
  }
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return step.lower(state, batch, rng).compile()


def _with_mesh(config, sizes: dict[str, int], num_blocks: int | None = None):
  c = copy.deepcopy(config)
  for axis in MESH_AXES:
    c.mesh[axis] = sizes[axis]
  if num_blocks is not None:
    c.model.num_blocks = num_blocks
  return c


def compiled_train_row(config, sizes: dict[str, int], latent_thw) -> dict[str, Any]:
  """XLA's plan of the real N-device step (N = the mesh's size; needs that many devices)."""
  n = int(np.prod([sizes[a] for a in MESH_AXES]))
  c = _with_mesh(config, sizes)
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:n])
  mem = memory_of(compile_train_step(c, mesh, latent_thw, clips=sizes["data"] * sizes["fsdp"]))
  state = state_bytes(c, mesh)
  return {"kind": "compiled", "peak": mem["peak"], "state": state["state"], "compiled": mem, "state_parts": state}


def residual_bytes_per_block(config, latent_thw, text_tokens: int) -> int:
  """Bytes one more block adds to what the forward saves for the backward under the config's remat policy
  (``full``: the block input), at one clip of ``latent_thw``: traced from the model, nothing compiled."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel

  from v2w_jax.models import dit  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  saved = {}
  for k in (1, 2):
    c = _with_mesh(config, {a: 1 for a in MESH_AXES}, num_blocks=k)
    dit_cfg = trainer.dit_config(c)
    t, h, w = latent_thw
    x, ts, text, cond, pad = dit.dummy_inputs(dit_cfg, frames=t, height=h, width=w, text_len=text_tokens)
    apply = dit.apply_fn(dit_cfg)
    residuals = saved_residuals(lambda p, x_: apply(p, x_, ts, text, cond, pad).sum(),
                                dit.abstract_params(dit_cfg), x)
    saved[k] = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s, why in residuals
                   if "from the argument" not in why)
  return saved[2] - saved[1]


def derived_train_row(config, sizes: dict[str, int], latent_thw) -> dict[str, Any]:
  """Per-device peak from a one-block one-device compile, the per-block residuals and the exact sharded
  state (module docstring)."""
  one = {"data": 1, "fsdp": 1, "context": 1}
  local = _per_device_latent(latent_thw, sizes)
  c = _with_mesh(config, one, num_blocks=1)
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  mem = memory_of(compile_train_step(c, mesh, local, clips=1))
  small = state_bytes(c, mesh)
  first_block = mem["peak"] - small["state"] - small["grads_fp32"]
  per_block = residual_bytes_per_block(config, local, int(config.data.text_tokens))
  acts = first_block + (int(config.model.num_blocks) - 1) * per_block
  state = state_bytes(config, jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES))
  return {"kind": "derived", "peak": state["state"] + state["grads_fp32"] + acts, "state": state["state"],
          "grads_fp32": state["grads_fp32"], "activations": acts, "activations_1_block": first_block,
          "residuals_per_block": per_block, "per_device_latent": list(local), "state_parts": state,
          "compiled_1_block": mem}


def compiled_generate_rows(config, sizes: dict[str, int], latent_shape, text_tokens: int, num_steps: int,
                           param_dtype: str | None) -> list[dict[str, Any]]:
  """XLA's plans of the guided sampling loop (both CFG branches) and the VAE decode."""
  from v2w_jax.inference.pipeline import Video2WorldPipeline  # pylint: disable=import-outside-toplevel
  from v2w_jax.models import dit  # pylint: disable=import-outside-toplevel
  from v2w_jax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.models.dit_config import DiTConfig  # pylint: disable=import-outside-toplevel

  overrides = {"param_dtype": param_dtype} if param_dtype else {}
  dit_cfg = DiTConfig.from_config(config.model, **overrides)
  vae_cfg = vae_lib.VAEConfig.from_config(config.vae)
  n = sizes["data"] * sizes["context"]
  mesh = None
  if n > 1:
    mesh = mesh_lib.make_mesh({"data": sizes["data"], "fsdp": 1, "context": sizes["context"]}, jax.devices()[:n])
  pipe = Video2WorldPipeline(dit_cfg, vae_cfg, None, None, mesh=mesh)
  sds = jax.ShapeDtypeStruct
  text = sds((1, text_tokens, dit_cfg.text_in_channels), jnp.bfloat16)
  args = (dit.abstract_params(dit_cfg), sds(latent_shape, jnp.float32), text, text,
          sds(latent_shape, jnp.float32), sds((1, 1, latent_shape[2], 1, 1), jnp.float32), sds((), jnp.float32))
  with pipe._mesh_scope():  # pylint: disable=protected-access
    loop = memory_of(pipe.sample_fn(num_steps, 5.0, True).lower(*args).compile())
    decode = memory_of(pipe._decode.lower(vae_lib.abstract_params(vae_cfg),  # pylint: disable=protected-access
                                          sds(latent_shape, jnp.float32)).compile())
  weights = _tree_bytes(args[0])
  return [
      {"kind": "compiled", "what": "generate: DiT sampling loop", "peak": loop["peak"], "dit_weights": weights,
       "compiled": loop},
      # The DiT weights stay resident while the VAE decodes.
      {"kind": "compiled", "what": "generate: VAE decode (+ resident DiT weights)", "peak": decode["peak"] + weights,
       "compiled": decode},
  ]


def plan(config, sizes: dict[str, int], latent_thw, *, mode: str = "train", text_tokens: int | None = None,
         num_steps: int = 35, param_dtype: str | None = None, derive: bool | None = None) -> list[dict[str, Any]]:
  """Rows for one job. ``derive`` (training): also the derived row; default: when there are fewer devices
  than the mesh (then it is the only row)."""
  n = int(np.prod([sizes[a] for a in MESH_AXES]))
  enough = jax.device_count() >= n
  tokens = int(text_tokens or config.data.text_tokens)
  rows = []
  if mode == "generate":
    if sizes["fsdp"] != 1:
      raise ValueError("generation shards over data (CFG branches) and context only: use --fsdp=1")
    if not enough:
      raise ValueError(f"generation on {n} devices needs {n} devices to compile (or --mock_gpus={n})")
    c = copy.deepcopy(config)
    c.data.text_tokens = tokens
    rows = compiled_generate_rows(c, sizes, (1, int(config.vae.z_dim), *latent_thw), tokens, num_steps, param_dtype)
  else:
    if enough:
      rows.append({"what": "train step", **compiled_train_row(config, sizes, latent_thw)})
    if derive or (derive is None and not enough):
      rows.append({"what": "train step", **derived_train_row(config, sizes, latent_thw)})
  for r in rows:
    r.update(mesh=dict(sizes), devices=n, peak_gib=r["peak"] / GIB)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="nemo", help="a module of configs/ (nemo, nemo_14b, tiny)")
  ap.add_argument("--mode", default="train", choices=("train", "generate"))
  ap.add_argument("--shape", default="720p", choices=sorted(SHAPES))
  ap.add_argument("--latent", default=None, help="latent T,H,W instead of --shape (e.g. 4,8,12)")
  for axis in MESH_AXES:
    ap.add_argument(f"--{axis}", type=int, default=1, help=f"mesh {axis} axis size")
  ap.add_argument("--remat", default=None, help="model.remat_policy (default: the config's)")
  ap.add_argument("--precision", default=None, choices=("fp32_master", "reference_bf16"),
                  help="optim.precision (reference_bf16 also sets bf16 parameters)")
  ap.add_argument("--param_dtype", default=None, help="generate: DiT weight dtype (default: the config's)")
  ap.add_argument("--num_steps", type=int, default=35, help="generate: sampling steps")
  ap.add_argument("--derive", action="store_true", help="train: the derived row even when the devices exist")
  ap.add_argument("--mock_gpus", type=int, default=0,
                  help="one GPU poses as N (JAX mock GPU topology): compile the real N-GPU program")
  ap.add_argument("--tiny", action="store_true", help="CPU dry run: configs/tiny.py at the tiny shape")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  if args.mock_gpus:
    jax.config.update("jax_mock_gpu_topology", f"1x{args.mock_gpus}x1")
  config = common.load_config("tiny" if args.tiny else args.config)
  shape = "tiny" if args.tiny else args.shape
  if args.remat:
    config.model.remat_policy = args.remat
  if args.precision:
    config.optim.precision = args.precision
    config.model.param_dtype = "bfloat16" if args.precision == "reference_bf16" else "float32"
  sizes = {a: getattr(args, a) for a in MESH_AXES}
  latent = tuple(int(v) for v in args.latent.split(",")) if args.latent else SHAPES[shape]
  rows = plan(config, sizes, latent, mode=args.mode, num_steps=3 if args.tiny else args.num_steps,
              param_dtype=args.param_dtype, derive=args.derive or None)
  for r in rows:
    print(f"{r['kind']:9s} {r['what']:45s} mesh {r['mesh']}: {r['peak'] / GIB:8.2f} GiB "
          f"({r['peak'] / 2**20:.1f} MiB) per device", flush=True)
  result = {"device": common.device_info(), "config": "tiny" if args.tiny else args.config,
            "latent": list(latent), "remat": config.model.remat_policy, "precision": config.optim.precision,
            "rows": rows}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
