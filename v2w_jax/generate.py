r"""Video2World inference CLI: text/image/video -> 16 fps mp4, as the reference ``examples/inference.py``.

Usage::

    python -m v2w_jax.generate --spec=assets/sample_spec.json --config=configs/nemo.py \
        --checkpoint=outputs/.../checkpoints            # training run (EMA weights of the latest step)
        # or --checkpoint=checkpoints/dit_params         # converted params folder (tools/convert_torch_ckpt.py)
        # or --checkpoint=checkpoints/..._ema_bf16.pt    # reference checkpoint, converted on the fly
        --vae_checkpoint=checkpoints/Wan2.1_VAE.pth --output_dir=outputs/generate
        [--lora=outputs/.../checkpoints:0.8,other_adapters.pt:0.5]   # LoRA adapters, blended

``--spec`` takes this port's sample lists (``assets/sample_spec.json``) and the reference's own spec files
as they are (``{"inference_type": ..., "samples": {NAME: {"prompt_path" | "prompt", "input_path"}}}``,
e.g. its ``assets/base/video2world.json``); both are documented in ``v2w_jax/inference/spec.py``. Prompts
are looked up in the text-embedding store (``--text_embeddings_dir``); those it lacks are embedded first
with ``--text_encoder_dir`` (the Cosmos-Reason1 folder; needs torch), or listed in one error with the
command that computes them. Every sample, embedding and input file is checked before any weights are
loaded. ``--checkpoint`` / ``--vae_checkpoint`` default to ``config.checkpoint.load_path`` /
``config.vae.checkpoint_path``; random weights need ``--allow_random_weights`` (tests and smoke runs).
Each sample writes ``<output>.mp4`` and a JSON sidecar ``<output>.json`` with the resolved settings and
stage timings. The sampler follows ``config.objective``: rectified flow -> the reference's UniPC (``shift``
applies); EDM (``configs/nemo_edm.py``) -> the reference's 2ab sampler on the EDM-preconditioned DiT.
Mistakes end in one ``error:`` line (exit status 2).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any, Sequence

from absl import app, flags

from v2w_jax import config_cli
from v2w_jax.logging_setup import setup_logging
from v2w_jax.user_errors import UserError, main_guard

_CONFIG = config_cli.ConfigFlag("configs/nemo.py", "Model / data config (configs/*.py).", doc=__doc__)
_SPEC = flags.DEFINE_multi_string("spec", None, "Sample spec file(s): .json, .jsonl, .yaml (repeatable).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "DiT weights: training checkpoint folder (EMA), params folder, or reference .pt. "
    "Default: config.checkpoint.load_path.")
_VAE_CHECKPOINT = flags.DEFINE_string(
    "vae_checkpoint", "", "VAE weights: Wan2.1_VAE.pth or a params folder. Default: config.vae.checkpoint_path.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "outputs/generate", "Where the mp4 files go.")
_ALLOW_RANDOM = flags.DEFINE_bool("allow_random_weights", False,
                                  "Use random weights when no checkpoint is given (tests / smoke runs only).")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "From a training checkpoint, load the EMA weights (else the raw ones).")
_TEXT_DIR = flags.DEFINE_string(
    "text_embeddings_dir", "", "Text-embedding store for 'prompt' texts. Default: config.data.embeddings_dir or "
    "<config.data.dataset_dir>/text_embeddings when it exists, else <output_dir>/text_embeddings.")
_TEXT_ENCODER = flags.DEFINE_string(
    "text_encoder_dir", "", "Cosmos-Reason1 (Hugging Face) folder: prompts the store lacks are embedded with it "
    "into the store before generating (needs torch and transformers, the [text] extra).")
_NEGATIVE = flags.DEFINE_string("negative_prompt_embedding", "",
                                "Default negative-prompt embedding .npy for samples without their own.")
_KEEP_GOING = flags.DEFINE_bool("keep_going", False, "Continue with the next sample after a failure.")
_LORA = flags.DEFINE_string(
    "lora", "", "LoRA adapters merged into the DiT weights once, before sampling: PATH[:SCALE][,PATH[:SCALE]...] "
    "(a LoRA run's checkpoint folder, an adapters .pt or a reference LoRA .pt; SCALE multiplies alpha/r, "
    "default 1). See v2w_jax/inference/lora.py.")

_log = logging.getLogger("v2w_jax.generate")


def _cfg_get(section: Any, name: str, default: Any) -> Any:
  if section is None:
    return default
  getter = getattr(section, "get", None)
  return getter(name, default) if getter is not None else getattr(section, name, default)


def spec_defaults(config, negative_prompt_embedding: str | None = None):
  """SpecDefaults from the config (clip size and length) and the model's shape rules."""
  from v2w_jax.inference.spec import SpecDefaults  # pylint: disable=import-outside-toplevel

  data = _cfg_get(config, "data", None)
  size = tuple(int(s) for s in _cfg_get(data, "video_size", (704, 1280)))
  num_frames = int(_cfg_get(data, "num_frames", 93))
  patch = int(_cfg_get(config.model, "patch_spatial", 2))
  return SpecDefaults(resolution=size, num_frames=num_frames, size_multiple=8 * patch,
                      negative_prompt_embedding=negative_prompt_embedding or None)


def build_pipeline(config, *, checkpoint: str = "", vae_checkpoint: str = "", allow_random_weights: bool = False,
                   use_ema: bool = True, seed: int = 0, lora: str = ""):
  """The pipeline for ``config`` with weights from the given (or the config's) checkpoints.

  Returns:
    (pipeline, info) where info records where the weights came from.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from v2w_jax.inference import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference import weights  # pylint: disable=import-outside-toplevel
  from v2w_jax.models.dit_config import DiTConfig  # pylint: disable=import-outside-toplevel
  from v2w_jax.models.vae import VAEConfig  # pylint: disable=import-outside-toplevel

  from v2w_jax.diffusion.objective import make_objective  # pylint: disable=import-outside-toplevel

  # The sampler follows the training objective: RF -> UniPC; EDM -> 2ab on the preconditioned DiT.
  objective = make_objective(config)
  dit_cfg = DiTConfig.from_config(config.model)
  vae_cfg = VAEConfig.from_config(config.vae)
  dit_path = checkpoint or str(_cfg_get(_cfg_get(config, "checkpoint", None), "load_path", "") or "")
  vae_path = vae_checkpoint or str(_cfg_get(config.vae, "checkpoint_path", "") or "")
  info = {"checkpoint": dit_path or "random", "vae_checkpoint": vae_path or "random", "objective": objective.name}
  if not dit_path or not vae_path:
    missing = [n for n, p in (("--checkpoint (DiT)", dit_path), ("--vae_checkpoint", vae_path)) if not p]
    if not allow_random_weights:
      raise ValueError(f"no weights given for {', '.join(missing)} (nor in the config); pass them, or "
                       "--allow_random_weights for a smoke run")
    _log.warning("RANDOM weights for %s: the output is noise (smoke run)", ", ".join(missing))
  from v2w_jax.inference import lora as lora_lib  # pylint: disable=import-outside-toplevel

  requests = lora_lib.parse_lora_flag(lora)
  t0 = time.perf_counter()
  dit_params, merged = lora_lib.load_dit_params(
      dit_path, dit_cfg, requests, use_ema=use_ema, alpha=float(_cfg_get(_cfg_get(config, "lora", None), "alpha", 32.0)),
      base=None if dit_path else weights.random_dit_params(dit_cfg, seed))
  if merged:
    info["lora"] = merged
  vae_params = weights.load_vae_params(vae_path, vae_cfg) if vae_path else weights.random_vae_params(vae_cfg, seed)
  info["load_s"] = time.perf_counter() - t0
  mesh = None
  if jax.device_count() > 1:
    # Several GPUs: the config's mesh (e.g. --config.mesh.data=2 --config.mesh.fsdp=1 splits the two CFG
    # branches, --config.mesh.context=N each clip's tokens); parameters are replicated.
    from v2w_jax.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel

    mesh = make_mesh(config.mesh)
    info["mesh"] = dict(mesh.shape)
  pipe = pipeline_lib.Video2WorldPipeline(dit_cfg, vae_cfg, dit_params, vae_params, objective=objective, mesh=mesh)
  return pipe, info


def generate_all(specs: Sequence[Any], pipe, resolver, output_dir: str | os.PathLike, *, info: dict | None = None,
                 keep_going: bool = False) -> list[dict]:
  """Generates every sample; returns one record per sample (path, timings, or the error)."""
  from v2w_jax.data.video import write_mp4  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference import conditioning  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference.pipeline import GenerationRequest  # pylint: disable=import-outside-toplevel

  records = []
  for i, spec in enumerate(specs):
    out_path = spec.output_path(output_dir)
    _log.info("[%d/%d] %s: %s, %d frames at %dx%d, %d steps, guidance %g, seed %d", i + 1, len(specs), spec.name,
              spec.inference_type, spec.num_frames, *spec.resolution, spec.num_steps, spec.guidance, spec.seed)
    try:
      text, negative = resolver.resolve(spec)
      cond = None
      if spec.num_conditional_frames > 0:
        cond = conditioning.conditional_frames(spec.input_path, spec.num_conditional_frames, spec.resolution,
                                               pipe.vae_cfg.temporal_factor)
      req = GenerationRequest(
          text_embedding=text, negative_text_embedding=negative, cond_frames=cond,
          num_conditional_frames=spec.num_conditional_frames, num_frames=spec.num_frames,
          size=spec.resolution, seed=spec.seed, guidance=spec.guidance, num_steps=spec.num_steps,
          shift=spec.shift)
      result = pipe.generate(req)
      t0 = time.perf_counter()
      write_mp4(out_path, result.video, spec.fps, threads=0)
      timings = dict(result.timings, write=time.perf_counter() - t0)
      record = dict(name=spec.name, output=str(out_path), inference_type=spec.inference_type,
                    prompt=spec.prompt, prompt_embedding=spec.prompt_embedding,
                    negative_prompt_embedding=spec.negative_prompt_embedding, input_path=spec.input_path,
                    num_conditional_frames=spec.num_conditional_frames, num_frames=spec.num_frames,
                    resolution=list(spec.resolution), seed=spec.seed, guidance=spec.guidance,
                    num_steps=spec.num_steps, shift=spec.shift, fps=spec.fps, timings=timings, **(info or {}))
      out_path.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
      _log.info("wrote %s (dit %.1fs, decode %.1fs, total %.1fs)", out_path, timings["dit"], timings["decode"],
                timings["total"])
      records.append(record)
    except Exception as e:  # pylint: disable=broad-except
      if not keep_going:
        raise
      _log.error("%s: failed: %s: %s", spec.where, type(e).__name__, e)
      records.append(dict(name=spec.name, error=f"{type(e).__name__}: {e}"))
  return records


class GenerateError(UserError):
  """A flag of the generator is unusable; the message names it."""


def text_store_dir(config, flag: str, output_dir: str | os.PathLike) -> pathlib.Path:
  """--text_embeddings_dir; else the config's store when it exists; else ``<output_dir>/text_embeddings``."""
  from v2w_jax.data import text as text_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference import embeddings  # pylint: disable=import-outside-toplevel

  if flag:
    return pathlib.Path(flag)
  default = embeddings.default_store_dir(config)
  if default is not None and text_lib.TextEmbeddingStore(default).exists():
    return default
  return pathlib.Path(output_dir) / "text_embeddings"


def check_inputs(specs: Sequence[Any], temporal_factor: int) -> None:
  """Reads every sample's conditioning frames once; raises one InputError naming each unusable file."""
  from v2w_jax.inference import conditioning  # pylint: disable=import-outside-toplevel

  problems = []
  for spec in specs:
    if spec.num_conditional_frames > 0:
      try:
        conditioning.conditional_frames(spec.input_path, spec.num_conditional_frames, spec.resolution,
                                        temporal_factor)
      except conditioning.InputError as e:
        problems.append(f"{spec.where}: field 'input_path': {e}")
  if len(problems) == 1:
    raise conditioning.InputError(problems[0])
  if problems:
    raise conditioning.InputError(f"{len(problems)} unusable input files:\n  " + "\n  ".join(problems))


def run(config) -> int:
  """Validates everything, prepares missing text embeddings, loads the weights and generates every sample."""
  from v2w_jax.inference import embeddings  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference import spec as spec_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.models.dit_config import DiTConfig  # pylint: disable=import-outside-toplevel
  from v2w_jax.models.vae import VAEConfig  # pylint: disable=import-outside-toplevel

  if not _SPEC.value:
    raise GenerateError("--spec is required: a sample spec (.json, .jsonl or .yaml), e.g. --spec=assets/sample_spec.json")
  negative = _NEGATIVE.value
  if negative and not pathlib.Path(negative).is_file():
    raise GenerateError(f"--negative_prompt_embedding {negative}: no such file")
  specs = spec_lib.load_specs(_SPEC.value, spec_defaults(config, os.path.abspath(negative) if negative else None))
  width = DiTConfig.from_config(config.model).text_in_channels
  num_tokens = int(_cfg_get(_cfg_get(config, "data", None), "text_tokens", 512))
  store_dir = text_store_dir(config, _TEXT_DIR.value, _OUTPUT_DIR.value)
  resolver = embeddings.EmbeddingResolver(width, store_dir)
  # Text first: the encoder (torch) runs and frees its memory before JAX takes the accelerator.
  missing = resolver.missing_texts(specs, default_negative=bool(_TEXT_ENCODER.value))
  if missing and not _TEXT_ENCODER.value:
    raise embeddings.missing_error(missing, store_dir, num_tokens)
  if missing:
    embeddings.embed_missing(list(missing), store_dir, _TEXT_ENCODER.value, num_tokens, width)
    resolver = embeddings.EmbeddingResolver(width, store_dir)
  resolver.check(specs)
  check_inputs(specs, VAEConfig.from_config(config.vae).temporal_factor)
  try:
    pipe, info = build_pipeline(config, checkpoint=_CHECKPOINT.value, vae_checkpoint=_VAE_CHECKPOINT.value,
                                allow_random_weights=_ALLOW_RANDOM.value, use_ema=_USE_EMA.value,
                                lora=_LORA.value)
  except ValueError as e:  # bad / missing weights (WeightsError), bad objective settings
    raise GenerateError(str(e)) from e
  records = generate_all(specs, pipe, resolver, _OUTPUT_DIR.value, info=info, keep_going=_KEEP_GOING.value)
  failed = [r for r in records if "error" in r]
  _log.info("%d sample(s) written to %s, %d failed", len(records) - len(failed), _OUTPUT_DIR.value, len(failed))
  return 1 if failed else 0


@main_guard
def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise GenerateError(f"unexpected arguments {argv[1:]}: settings are flags (--spec=..., --config.a.b=value)")
  setup_logging()
  return run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_CONFIG.flags_parser)
