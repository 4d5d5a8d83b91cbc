"""Times the full jitted train step of the 2B DiT on one GPU (issue 9).

The step is the trainer's own (``training/step.py``): DiT forward+backward with the configured remat
policy, rectified-flow loss, nan-guard + global-norm clipping, AdamW with the LambdaLinear schedule,
power EMA. Data loading and the VAE are excluded (latents are random; ``benchmarks/vae.py`` times the
VAE). Reports compile time, median step time over several steps after warm-up, peak device memory,
model TFLOP/s (the reference anchor's formula, ``training/flops.py``) and MFU.

    python -m benchmarks.train_step --shape=720p --json=out.json [--remat=save_attention]
        [--precision=fp32_master|reference_bf16] [--steps=3] [--tiny] [--config=nemo_14b]
        [--data=1 --fsdp=1 --context=1] [--profile=DIR] [--lora]

With several GPUs the mesh flags spread the step: the global batch is one clip per data-parallel
replica (``data x fsdp``), and ``--context`` splits each clip's tokens (Ulysses). The result then also
gives the time per clip and the per-GPU throughput, for scaling against one GPU. ``--profile`` records
one extra step with the JAX profiler and writes a per-kernel-category summary
(``benchmarks/profile_summary.py``).

``--lora`` times LoRA post-training with ``configs/nemo_lora.py``'s settings (rank 32, alpha 32 on the
attention projections and MLP layers; frozen bf16 base, float32 adapters; remat
``save_self_attention`` unless ``--remat`` says otherwise): the same step with gradients, AdamW and
EMA on the adapters only. ``model_tflop`` still counts a full fine-tune's work (the formula of the
reference anchor), so compare LoRA by step time and memory.
"""

from __future__ import annotations

import argparse
import time
import types

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import profile_summary as profile_lib
from configs import nemo_lora
from v2w_jax.models import dit
from v2w_jax.parallel import mesh as mesh_lib
from v2w_jax.parallel import sharding as sharding_lib
from v2w_jax.training import flops as flops_lib
from v2w_jax.training import optim as optim_lib
from v2w_jax.training import step as step_lib
from v2w_jax.training import trainer

SHAPES = {"720p": (24, 88, 160), "480p": (8, 60, 104), "tiny": (3, 4, 6)}


def _mesh_axes(array: jax.Array) -> list:
  """The mesh axis (or None) of each dimension of a sharded array."""
  spec = tuple(array.sharding.spec)
  return [spec[i] if i < len(spec) else None for i in range(array.ndim)]


def run(shape: str, remat: str, precision: str, steps: int, warmup: int, config_name: str, backend: str,
        mesh_sizes: dict[str, int] | None = None, profile_dir: str | None = None, lora: bool = False) -> dict:
  config = common.load_config(config_name)
  if lora:
    config.lora.update(nemo_lora.get_config().lora)
  for axis, size in (mesh_sizes or {}).items():
    config.mesh[axis] = size
  config.model.remat_policy = remat
  config.model.attention_backend = backend
  config.optim.precision = precision
  config.model.param_dtype = "bfloat16" if precision == "reference_bf16" else "float32"
  t, h, w = SHAPES[shape]
  text_tokens = int(config.data.text_tokens)
  mesh = mesh_lib.make_mesh(config.mesh)
  clips = mesh.shape["data"] * mesh.shape["fsdp"]
  dit_cfg = trainer.dit_config(config)
  tx = optim_lib.make_optimizer(config)
  _, state_sh, initial_state = trainer.build_state(config, mesh, types.SimpleNamespace(dit_cfg=dit_cfg), tx)
  state = initial_state()
  state_gib = common.memory_in_use_gib()
  lora_info = None
  if lora:
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
    lora_info = {"rank": int(config.lora.rank), "alpha": float(config.lora.alpha), "targets": config.lora.targets,
                 "trainable_params": count(state.params), "frozen_params": count(state.frozen),
                 "frozen_dtype": str(jax.tree.leaves(state.frozen)[0].dtype),
                 "trainable_dtype": str(jax.tree.leaves(state.params)[0].dtype),
                 # an adapter is sharded like its layer: A on the layer's input axis, B on its output axis
                 "shardings": {f"mlp.layer1.{name}": _mesh_axes(tree["blocks"]["mlp"]["layer1"][name])
                               for tree, name in ((state.frozen, "kernel"), (state.params, "lora_a"),
                                                  (state.params, "lora_b"))}}
  train_step = step_lib.make_jitted_train_step(config, mesh, dit.apply_fn(dit_cfg), state_sh, tx=tx)
  k = jax.random.split(jax.random.key(0), 2)
  batch = {
      "latents": jax.random.normal(k[0], (clips, dit_cfg.in_channels, t, h, w), jnp.float32),
      "text_embeddings": jax.random.normal(k[1], (clips, text_tokens, dit_cfg.text_in_channels), jnp.bfloat16),
  }
  batch = jax.device_put(batch, sharding_lib.batch_shardings_for(batch, mesh))
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  holder = {"state": state}

  def one():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    return metrics["loss"]

  timing = common.time_calls(one, warmup=warmup, steps=steps)
  # The loss after warm-up + timed steps: equal across meshes for the same flags (a check of the
  # parallel layouts on the GPU); the profiled step comes after it.
  loss = float(one())
  profile = profile_lib.profile_calls(one, profile_dir) if profile_dir else None
  model_flops = clips * flops_lib.dit_flops(config.model, (t, h, w), text_tokens).train_step
  peak = flops_lib.peak_flops(jax.devices()[0])
  tflops = model_flops / timing["median_s"] / 1e12
  gpus = mesh.size
  return {
      "config": config_name, "shape": shape, "latent": [t, h, w], "tokens": (t * h * w) // 4,
      "text_tokens": text_tokens, "remat": remat, "precision": precision, "attention_backend": backend,
      "mesh": dict(mesh.shape), "clips_per_step": clips,
      "compile_s": compile_s, **timing, "seconds_per_clip": timing["median_s"] / clips,
      "state_gib": state_gib, "peak_gib": common.peak_memory_gib(),
      "peak_gib_per_device": [common.peak_memory_gib(d) for d in mesh.devices.flat],
      "model_tflop": model_flops / 1e12, "model_tflops_per_s": tflops,
      "model_tflops_per_s_per_device": tflops / gpus,
      "mfu": tflops * 1e12 / (peak * gpus) if peak else None,
      "profile": profile,
      "cudnn_fmha_calls": common.count_in_hlo(hlo, "__cudnn$fmha"),
      "loss": loss,
      "lora": lora_info,
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="720p", choices=sorted(SHAPES))
  ap.add_argument("--remat", default=None, help="default: the config's (nemo: save_attention, nemo_14b: full)")
  ap.add_argument("--precision", default="fp32_master", choices=["fp32_master", "reference_bf16"])
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--tiny", action="store_true", help="CPU smoke test with configs/tiny.py")
  ap.add_argument("--config", default="nemo", help="a module of configs/ (nemo, nemo_14b, ...)")
  for axis in ("data", "fsdp", "context"):
    ap.add_argument(f"--{axis}", type=int, default=1, help=f"mesh {axis} axis size")
  ap.add_argument("--profile", default=None, help="also trace one step into this folder and summarise it")
  ap.add_argument("--lora", action="store_true", help="LoRA post-training (configs/nemo_lora.py's LoRA settings)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  config_name = "tiny" if args.tiny else args.config
  default_remat = (nemo_lora.get_config() if args.lora else common.load_config(config_name)).model.remat_policy
  remat = args.remat or ("none" if args.tiny else default_remat)
  shape = "tiny" if args.tiny else args.shape
  result = {"device": common.device_info(),
            "result": run(shape, remat, args.precision, args.steps, args.warmup, config_name, args.backend,
                         dict(data=args.data, fsdp=args.fsdp, context=args.context), args.profile, args.lora)}
  print(result, flush=True)
  common.write_json(args.json, result)


if __name__ == "__main__":
  main()
