r"""Times one Video2World generation: 93 frames at 704x1280, 35 UniPC steps, guidance 7 (random weights).

Usage::

    python benchmarks/generate.py                    # the 2B model on the GPU (H200: target <= 150 s)
    python benchmarks/generate.py --tiny             # CPU smoke run of the same code (tiny config)
    python benchmarks/generate.py --data=2           # CFG branches on 2 GPUs (mesh data axis)
    python benchmarks/generate.py --context=4        # each clip's tokens over 4 GPUs (Ulysses)
    python benchmarks/generate.py --config=nemo_14b --param_dtype=bfloat16 --init=device --num_steps=4
                                                     # the 14B: 4 guided steps (35 exceed one call)

Every stage is compiled ahead of time (``jit(...).lower(...).compile()``) so compile and run times are
reported separately: conditional-frame encode (1 latent frame, image2world), the DiT sampling loop (both CFG
branches in one batch-2 call per step), and the VAE decode. Also reports the DiT's achieved model TFLOP/s
(``training/flops.py``, the reference anchor's formula), peak device memory, and optionally writes the mp4.
Prints one JSON object (last line) and writes it to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test of this script)")
  p.add_argument("--config", default="nemo", help="a module of configs/ (nemo, nemo_14b)")
  p.add_argument("--init", default="host", choices=("host", "device"),
                 help="random DiT weights made with numpy (host) or by the model's init on the device "
                 "(seconds instead of minutes for the 14B)")
  p.add_argument("--num_frames", type=int, default=None, help="default 93 (tiny: 9)")
  p.add_argument("--height", type=int, default=None, help="default 704 (tiny: 32)")
  p.add_argument("--width", type=int, default=None, help="default 1280 (tiny: 48)")
  p.add_argument("--num_steps", type=int, default=None, help="default 35 (tiny: 3)")
  p.add_argument("--guidance", type=float, default=7.0)
  p.add_argument("--num_conditional_frames", type=int, default=1, choices=(0, 1, 2))
  p.add_argument("--text_tokens", type=int, default=None, help="default 512 (tiny: 16)")
  p.add_argument("--param_dtype", default=None, help="DiT weight dtype (default: the config's, float32)")
  p.add_argument("--vae_dtype", default=None, help="VAE compute dtype (default: the config's, bfloat16)")
  p.add_argument("--attention_backend", default=None, help="auto | fa3 | cudnn | xla")
  p.add_argument("--data", type=int, default=1, help="mesh data axis (splits the CFG batch of 2)")
  p.add_argument("--context", type=int, default=1, help="mesh context axis (splits each clip's tokens)")
  p.add_argument("--decode_chunk", type=int, default=None, help="VAE latent frames per decode scan step")
  p.add_argument("--write", default="", help="also write the decoded clip to this mp4")
  p.add_argument("--json", default="", help="write the result JSON here")
  return p.parse_args(argv)


def _mem(devices) -> dict:
  out = {}
  try:
    stats = [d.memory_stats() or {} for d in devices]
  except Exception:  # pylint: disable=broad-except  # CPU has none
    return out
  peak = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
  if peak:
    out["peak_mem_gib"] = max(peak) / 2**30
  return out


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def main(argv=None) -> dict:
  a = _args(argv)
  if a.tiny:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  from v2w_jax.diffusion import guidance as guidance_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference import weights  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference.pipeline import Video2WorldPipeline  # pylint: disable=import-outside-toplevel
  from v2w_jax.models import dit as dit_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.models.dit_config import DiTConfig  # pylint: disable=import-outside-toplevel
  from v2w_jax.models.vae import VAEConfig  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import flops as flops_lib  # pylint: disable=import-outside-toplevel

  config = common.load_config("tiny" if a.tiny else a.config)
  frames = a.num_frames or (9 if a.tiny else 93)
  size = (a.height or (32 if a.tiny else 704), a.width or (48 if a.tiny else 1280))
  steps = a.num_steps or (3 if a.tiny else 35)
  tokens = a.text_tokens or (16 if a.tiny else 512)
  overrides = {}
  if a.param_dtype:
    overrides["param_dtype"] = a.param_dtype
  if a.attention_backend:
    overrides["attention_backend"] = a.attention_backend
  dit_cfg = DiTConfig.from_config(config.model, **overrides)
  vae_over = {k: v for k, v in (("dtype", a.vae_dtype), ("decode_chunk", a.decode_chunk)) if v}
  vae_cfg = VAEConfig.from_config(config.vae, **vae_over)
  devices = jax.devices()
  mesh = None
  if a.data * a.context > 1:
    from v2w_jax.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel

    mesh = make_mesh({"data": a.data, "fsdp": 1, "context": a.context}, devices[:a.data * a.context])
  result = dict(config="tiny" if a.tiny else a.config, init=a.init, device=str(devices[0].device_kind),
                num_devices=a.data * a.context, data=a.data,
                context=a.context, num_frames=frames, size=list(size), num_steps=steps, guidance=a.guidance,
                num_conditional_frames=a.num_conditional_frames, text_tokens=tokens,
                param_dtype=dit_cfg.param_dtype, dit_dtype=dit_cfg.dtype, vae_dtype=vae_cfg.dtype)
  print(f"benchmark: {json.dumps(result)}", flush=True)

  t0 = time.perf_counter()
  dit_params = (dit_lib.init_params(dit_cfg, jax.random.key(0)) if a.init == "device"
                else weights.random_dit_params(dit_cfg, 0))
  pipe = Video2WorldPipeline(dit_cfg, vae_cfg, dit_params,
                             weights.random_vae_params(vae_cfg, 0), mesh=mesh)
  jax.block_until_ready((pipe.dit_params, pipe.vae_params))
  result["weights_s"] = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.standard_normal((1, tokens, dit_cfg.text_in_channels), np.float32), jnp.bfloat16)
  neg = jnp.asarray(rng.standard_normal((1, tokens, dit_cfg.text_in_channels), np.float32), jnp.bfloat16)
  shape = pipe.latent_shape(frames, size)
  n = a.num_conditional_frames
  cond = rng.integers(0, 256, (3, 1 + 4 * max(n - 1, 0), *size), dtype=np.uint8) if n else None
  t_start = time.perf_counter()

  # Encode the conditional frames (image2world by default).
  gt = None
  if n:
    enc_args = (pipe.vae_params, pipe.put(cond[None]))
    with pipe._mesh_scope():  # pylint: disable=protected-access
      t = time.perf_counter()
      enc = pipe._encode.lower(*enc_args, shape[2]).compile()  # pylint: disable=protected-access
      result["encode_compile_s"] = time.perf_counter() - t
      gt, result["encode_s"] = _timed(enc, *enc_args)

  # DiT sampling loop.
  guided = a.guidance != 0
  noise = guidance_lib.initial_noise(shape, 0)
  mask = guidance_lib.conditional_frame_mask(n, 1, shape[2], jnp.float32)
  gt = jnp.zeros(shape, jnp.float32) if gt is None else gt
  fn = pipe.sample_fn(steps, 5.0, guided)
  args = (pipe.dit_params, *pipe.put((noise, text, neg if guided else text, gt, mask, jnp.float32(a.guidance))))
  with pipe._mesh_scope():  # pylint: disable=protected-access
    t = time.perf_counter()
    sample = fn.lower(*args).compile()
    result["dit_compile_s"] = time.perf_counter() - t
    latents, result["dit_s"] = _timed(sample, *args)
  result.update({f"after_dit_{k}": v for k, v in _mem(devices).items()})

  # VAE decode to uint8 frames.
  with pipe._mesh_scope():  # pylint: disable=protected-access
    t = time.perf_counter()
    dec = pipe._decode.lower(pipe.vae_params, latents).compile()  # pylint: disable=protected-access
    result["decode_compile_s"] = time.perf_counter() - t
    video, result["decode_s"] = _timed(dec, pipe.vae_params, latents)
  video = np.asarray(video)
  t_end = time.perf_counter()

  result["run_s"] = result.get("encode_s", 0.0) + result["dit_s"] + result["decode_s"]
  result["compile_s"] = sum(result.get(k, 0.0) for k in ("encode_compile_s", "dit_compile_s", "decode_compile_s"))
  result["wall_s"] = t_end - t_start
  result["dit_s_per_step"] = result["dit_s"] / steps
  fl = flops_lib.dit_flops(config.model, shape[2:], tokens).forward_total * steps * (2 if guided else 1)
  result["dit_model_tflops_per_s"] = fl / result["dit_s"] / 1e12
  peak = flops_lib.peak_flops(devices[0])
  if peak:
    result["dit_mfu"] = fl / result["dit_s"] / (peak * max(1, a.data * a.context))
  result.update(_mem(devices))
  result["video_shape"] = list(video.shape)
  result["finite"] = bool(np.isfinite(np.asarray(latents)).all())
  if a.write:
    from v2w_jax.data.video import write_mp4  # pylint: disable=import-outside-toplevel

    write_mp4(a.write, video, 16, threads=0)
  print(f"encode {result.get('encode_s', 0):.2f}s  dit {result['dit_s']:.1f}s ({result['dit_s_per_step']:.2f}s/step, "
        f"{result['dit_model_tflops_per_s']:.0f} TFLOP/s)  decode {result['decode_s']:.1f}s  "
        f"run {result['run_s']:.1f}s  (+compile {result['compile_s']:.1f}s)  peak "
        f"{result.get('peak_mem_gib', float('nan')):.1f} GiB", flush=True)
  print(json.dumps(result), flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
