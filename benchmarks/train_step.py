"""Times the full jitted train step of the 2B DiT on one GPU (issue 9).

The step is the trainer's own (``training/step.py``): DiT forward+backward with the configured remat
policy, rectified-flow loss, nan-guard + global-norm clipping, AdamW with the LambdaLinear schedule,
power EMA. Data loading and the VAE are excluded (latents are random; ``benchmarks/vae.py`` times the
VAE). Reports compile time, median step time over several steps after warm-up, peak device memory,
model TFLOP/s (the reference anchor's formula, ``training/flops.py``) and MFU.

    python -m benchmarks.train_step --shape=720p --json=out.json [--remat=save_attention]
        [--precision=fp32_master|reference_bf16] [--backend=auto|fa3|cudnn|xla] [--steps=3] [--tiny]
        [--config=nemo_14b] [--data=1 --fsdp=1 --context=1] [--profile=DIR] [--set ema.offload=True ...]
        [--lora]

With several GPUs the mesh flags spread the step: the global batch is one clip per data-parallel
replica (``data x fsdp``), and ``--context`` splits each clip's tokens (Ulysses). The result then also
gives the time per clip and the per-GPU throughput, for scaling against one GPU. ``--profile`` records
one extra step with the JAX profiler and writes a per-kernel-category summary
(``benchmarks/profile_summary.py``). ``--set KEY=VALUE`` overrides any config field (e.g. the EMA
offload options). The batch is the trainer's (latents, text embeddings, padding mask); besides the
runtime peak the result holds the compiled step's own memory analysis (``training/memory.py``), the
attention kernel calls in the compiled program and the last timed step's loss.

``--lora`` times LoRA post-training with ``configs/nemo_lora.py``'s settings (rank 32, alpha 32 on the
attention projections and MLP layers; frozen bf16 base, float32 adapters; remat
``save_self_attention`` unless ``--remat`` says otherwise): the same step with gradients, AdamW and
EMA on the adapters only. ``model_tflop`` still counts a full fine-tune's work (the formula of the
reference anchor), so compare LoRA by step time and memory.
"""

from __future__ import annotations

import argparse
import time

import jax

from benchmarks import common
from benchmarks import profile_summary as profile_lib
from configs import nemo_lora
from v2w_jax.models import attention
from v2w_jax.training import flops as flops_lib
from v2w_jax.training import memory as memory_lib

SHAPES = common.SHAPES


def run(shape: str, remat: str | None, precision: str, steps: int, warmup: int, backend: str,
        mesh_sizes: dict[str, int] | None = None, profile_dir: str | None = None,
        overrides: dict | None = None, config_name: str = "nemo", lora: bool = False) -> dict:
  if lora:  # the reference LoRA settings and the LoRA recipe's remat, under any explicit flags
    lora_config = nemo_lora.get_config()
    lora_fields = {f"lora.{k}": v for k, v in lora_config.lora.items()}
    overrides = {**lora_fields, **(overrides or {})}
    remat = remat or lora_config.model.remat_policy
  config = common.bench_config(shape, config_name=config_name, remat=remat, precision=precision, backend=backend,
                               mesh_sizes=mesh_sizes, overrides=overrides)
  setup = common.build_step(config)
  t, h, w = SHAPES[shape]
  text_tokens = int(config.data.text_tokens)
  state = setup.initial_state()
  state_gib = common.memory_in_use_gib()
  lora_info = _lora_info(config, state) if lora else None
  batch = common.random_batch(setup.batch)
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = setup.train_step.compile(state, batch, rng)
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  compiled_memory = memory_lib.step_memory(compiled, setup.abstract_state)
  holder = {"state": state, "loss": None}

  def one():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    holder["loss"] = metrics["loss"]
    return metrics["loss"]

  timing = common.time_calls(one, warmup=warmup, steps=steps)
  # The last timed step's loss: equal across meshes for the same flags (a check of the parallel
  # layouts on the GPU); the profiled step comes after it.
  loss = float(holder["loss"])
  profile = profile_lib.profile_calls(one, profile_dir) if profile_dir else None
  clips = setup.clips
  model_flops = clips * flops_lib.dit_flops(config.model, (t, h, w), text_tokens).train_step
  peak = flops_lib.peak_flops(jax.devices()[0])
  tflops = model_flops / timing["median_s"] / 1e12
  gpus = setup.mesh.size
  q = jax.ShapeDtypeStruct((1, 1, setup.dit_cfg.num_heads, setup.dit_cfg.head_dim), jax.numpy.bfloat16)
  return {
      "config": "tiny" if shape == "tiny" else config_name, "shape": shape, "latent": [t, h, w], "tokens": (t * h * w) // 4, "text_tokens": text_tokens,
      "remat": config.model.remat_policy, "precision": precision, "attention_backend": backend,
      "attention_kernel": attention.kernel_for(backend, q, q, q),
      "overrides": overrides or {}, "ema": config.ema.to_dict(),
      "mesh": dict(setup.mesh.shape), "clips_per_step": clips,
      "compile_s": compile_s, **timing, "seconds_per_clip": timing["median_s"] / clips,
      "state_gib": state_gib, "peak_gib": common.peak_memory_gib(),
      "peak_gib_per_device": [common.peak_memory_gib(d) for d in setup.mesh.devices.flat],
      "compiled_memory": compiled_memory.as_dict(),
      "model_tflop": model_flops / 1e12, "model_tflops_per_s": tflops,
      "model_tflops_per_s_per_device": tflops / gpus,
      "mfu": tflops * 1e12 / (peak * gpus) if peak else None,
      "profile": profile,
      "cudnn_fmha_calls": common.count_in_hlo(hlo, "__cudnn$fmha"),
      # FA3 kernels in the compiled program: per scanned block body, 2 forward (self + cross) and 2
      # backward when the remat policy keeps the forward's outputs; more forwards mean recomputation.
      "fa3_fwd_calls": common.count_in_hlo(hlo, 'custom_call_target="flash_mha_fwd"'),
      "fa3_bwd_calls": common.count_in_hlo(hlo, 'custom_call_target="flash_mha_bwd"'),
      "loss": loss,
      "lora": lora_info,
  }


def _mesh_axes(array: jax.Array) -> list:
  """The mesh axis (or None) of each dimension of a sharded array."""
  spec = tuple(array.sharding.spec)
  return [spec[i] if i < len(spec) else None for i in range(array.ndim)]


def _lora_info(config, state) -> dict:
  """Adapter settings, sizes, dtypes and (for one layer) how base and adapters are sharded."""
  count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
  layer = ("blocks", "mlp", "layer1")
  pick = lambda tree, name: _mesh_axes(tree[layer[0]][layer[1]][layer[2]][name])  # noqa: E731
  return {"rank": int(config.lora.rank), "alpha": float(config.lora.alpha), "targets": config.lora.targets,
          "trainable_params": count(state.params), "frozen_params": count(state.frozen),
          "frozen_dtype": str(jax.tree.leaves(state.frozen)[0].dtype),
          "trainable_dtype": str(jax.tree.leaves(state.params)[0].dtype),
          # an adapter is sharded like its layer: A on the layer's input axis, B on its output axis
          "shardings": {"mlp.layer1.kernel": pick(state.frozen, "kernel"),
                        "mlp.layer1.lora_a": pick(state.params, "lora_a"),
                        "mlp.layer1.lora_b": pick(state.params, "lora_b")}}


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
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
  ap.add_argument("--lora", action="store_true", help="LoRA post-training (configs/nemo_lora.py's adapters)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  remat = args.remat or ("none" if args.tiny else None)
  shape = "tiny" if args.tiny else args.shape
  result = {"device": common.device_info(),
            "result": run(shape, remat, args.precision, args.steps, args.warmup, args.backend,
                         dict(data=args.data, fsdp=args.fsdp, context=args.context), args.profile,
                         common.parse_overrides(args.set), args.config, args.lora)}
  print(result, flush=True)
  common.write_json(args.json, result)


if __name__ == "__main__":
  main()
