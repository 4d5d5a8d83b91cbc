"""The post-training loop: config -> mesh -> data -> state -> steps, checkpoints, logs, samples.

Read top to bottom (big_vision style): each section is one concern. The cheap checks come first
(mesh, then every data file), before the VAE and the model are built; the job's ``config.json`` is
written only once the settings are known to work with the job's checkpoints. Resume order is the
job's newest intact checkpoint > ``checkpoint.load_path`` (model weights only) > random init, so a
preempted or killed job restarts with the same command.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import load as load_lib
from v2w_jax.convert import params_io
from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import latent_cache
from v2w_jax.data import sample_dataset
from v2w_jax.inference import weights as weights_lib
from v2w_jax.models import dit
from v2w_jax.models import vae as vae_lib
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.parallel import mesh as mesh_lib
from v2w_jax.parallel import sharding as sharding_lib
from v2w_jax.training import checkpoint as ckpt_lib
from v2w_jax.training import ema as ema_lib
from v2w_jax.training import flops as flops_lib
from v2w_jax.training import logging as log_lib
from v2w_jax.training import lora as lora_lib
from v2w_jax.training import memory as memory_lib
from v2w_jax.training import optim as optim_lib
from v2w_jax.training import resume as resume_lib
from v2w_jax.training import samples as samples_lib
from v2w_jax.training import state as state_lib
from v2w_jax.training import step as step_lib
from v2w_jax.training.preemption import PreemptionGuard

_log = logging.getLogger(__name__)


# The progress line: iter_s is the whole iteration (data wait + VAE encode + train step).
PROGRESS_FIELDS = ("loss", "lr", "grad_norm", "iter_s", "step_s", "vae_s", "data_wait_s")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


def job_dir(config) -> pathlib.Path:
  """``OUTPUT_ROOT/project/group/name`` ($V2W_OUTPUT_ROOT overrides config.job.output_root)."""
  root = os.environ.get("V2W_OUTPUT_ROOT") or config.job.output_root
  return pathlib.Path(root) / config.job.project / config.job.group / config.job.name


@dataclasses.dataclass
class Model:
  """The DiT and VAE configs, the VAE parameters and the jitted VAE encode."""

  dit_cfg: DiTConfig
  vae_cfg: vae_lib.VAEConfig
  vae_params: Any
  encode: Any  # jitted (vae_params, video uint8 [B,3,T,H,W]) -> latents fp32
  normalize: Any = None  # jitted cached VAE means [B,z,t,h,w] -> the latents `encode` gives for the same clips


def dit_config(config) -> DiTConfig:
  return DiTConfig.from_config(config.model, logical_axis_rules=tuple(map(tuple, config.mesh.rules)),
                               lora=lora_lib.lora_spec(config))


def build_model(config, mesh, random_vae_dir: pathlib.Path) -> Model:
  """DiT/VAE configs and VAE weights (random ones are saved to `random_vae_dir` for generate)."""
  dit_cfg = dit_config(config)
  vae_cfg = vae_lib.VAEConfig.from_config(config.vae)
  rep = sharding_lib.replicated(mesh)
  vae_params = weights_lib.config_vae_params(config, rep)
  if not config.vae.checkpoint_path:
    _log.warning("config.vae.checkpoint_path is empty: the VAE has RANDOM weights (toy runs only); "
                 "they are saved to %s for generation", random_vae_dir)
    # One decision for all processes (orbax saves are collective).
    if not multihost_utils.broadcast_one_to_all(np.asarray(random_vae_dir.exists())):
      params_io.save_params(random_vae_dir, vae_params, metadata={"kind": "vae", "random": True})
  batch_sh = sharding_lib.batch_sharding(mesh)
  encode = jax.jit(lambda p, v: vae_lib.encode_video(vae_cfg, p, step_lib.normalize_video(v)),
                   in_shardings=(rep, batch_sh), out_shardings=batch_sh)
  normalize = jax.jit(functools.partial(vae_lib.normalize_latents, vae_cfg), in_shardings=batch_sh,
                      out_shardings=batch_sh)
  return Model(dit_cfg, vae_cfg, vae_params, encode, normalize)


def build_state(config, mesh, dit_cfg: DiTConfig, tx):
  """Abstract state + shardings, and a function creating the initial state (random or loaded)."""
  if dit_cfg.lora is not None:  # adapters train, the base is frozen (training/lora.py)
    return lora_lib.build_state(config, mesh, dit_cfg, tx)
  boxed = dit.abstract_variables(dit_cfg)["params"]
  param_sh = sharding_lib.param_shardings_from_boxed(boxed, mesh, dit_cfg.logical_axis_rules)
  init_fn = state_lib.state_init_fn(lambda k: dit.init_params(dit_cfg, k), tx, config)
  key = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(init_fn, key)
  state_sh = sharding_lib.train_state_shardings(abstract_state, param_sh, tx, mesh,
                                                ema_memory_kind=ema_lib.offload_memory_kind(config.ema))
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)

  def initial_state():
    load_path = config.checkpoint.load_path
    if not load_path:
      return sharding_lib.create_sharded(init_fn, state_sh, key)
    params = load_lib.load_weights(
        load_path, abstract_state.params,
        lambda sd: convert_dit.torch_to_params(sd, dit_cfg), what="DiT")
    from_params = state_lib.state_init_fn(lambda p: p, tx, config)
    return jax.jit(from_params, out_shardings=state_sh)(params)

  return abstract_state, state_sh, initial_state


def validate_clip_shape(config) -> None:
  """``data.video_size`` is (height, width), each a multiple of the VAE's 8 x the DiT's patch size."""
  size = tuple(config.data.video_size)
  multiple = 8 * int(config.model.patch_spatial)
  if len(size) != 2 or not all(isinstance(s, int) and s > 0 and s % multiple == 0 for s in size):
    raise ValueError(f"data.video_size={size}: expected (height, width), each a positive multiple of {multiple} "
                     f"(8 for the VAE x model.patch_spatial), e.g. --config.data.video_size='(704,1280)'")


def device_batch(model: Model, host_batch: dict, sharding) -> dict:
  """A loader batch -> the step's global batch: latents, text embeddings, padding mask.

  Video batches are VAE-encoded; latent-cache batches (``latents``: the cached VAE means) are only
  normalised, which gives the latents the encode gives for the same window (``data/latent_cache.py``).
  """
  cached = "latents" in host_batch
  keys = ("latents" if cached else "video", "text_embeddings", "padding_mask")
  batch = dataset_lib.to_global_batch({k: host_batch[k] for k in keys if k in host_batch}, sharding)
  latents = model.normalize(batch["latents"]) if cached else model.encode(model.vae_params, batch["video"])
  out = {"latents": latents, "text_embeddings": batch["text_embeddings"]}
  if "padding_mask" in batch:
    out["padding_mask"] = batch["padding_mask"]
  return out


def validate_mesh(config, mesh, dit_cfg: DiTConfig) -> None:
  """Start-up checks that would otherwise fail deep inside compilation."""
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = int(config.data.global_batch_size)
  if batch % data_parallel:
    raise ValueError(f"data.global_batch_size={batch} is not divisible by the data-parallel size "
                     f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {data_parallel}")
  if batch % jax.process_count():
    raise ValueError(f"data.global_batch_size={batch} is not divisible by the {jax.process_count()} processes")
  if mesh.shape["context"] > 1:
    from v2w_jax.parallel import context_attention  # pylint: disable=import-outside-toplevel

    t = 1 + (int(config.data.num_frames) - 1) // 4
    h, w = (int(s) // 8 for s in config.data.video_size)
    context_attention.validate_context_parallel(dit_cfg, mesh, latent_thw=(t, h, w))


def open_data(config) -> tuple[dataset_lib.VideoBatchIterator, list[dict]]:
  """The training iterator and the fixed validation batches, every file checked (cheap: no model yet).

  Makes the synthetic sample dataset first when the config asks for it (only in its own folder,
  ``data.sample_dataset_dir``). A dataset folder that does not exist is an error naming the field.
  """
  sample_dataset.ensure_sample_dataset(config)
  run_validation = bool(config.trainer.run_validation) and bool(config.data.get("val_dataset_dir", ""))
  fields = ("dataset_dir", "val_dataset_dir") if run_validation else ("dataset_dir",)
  for field in fields:
    folder = str(config.data.get(field, ""))
    if not pathlib.Path(folder).is_dir():
      raise dataset_lib.DataError(
          f"data.{field}={folder}: the dataset folder does not exist (expected DATASET/videos/*.mp4, "
          f"DATASET/metas/*.txt and their text embeddings); set --config.data.{field}")
  data_iter = dataset_lib.make_loader(config, split="train")
  val_batches: list[dict] = []
  if run_validation:  # read (and checked) once, kept on the host: the same batches every evaluation
    val_iter = dataset_lib.make_loader(config, split="val")
    val_batches.extend(next(val_iter) for _ in range(int(config.trainer.get("validation_batches", 2))))
    val_iter.close()
  return data_iter, val_batches


def resume_or_init(config, mesh, model: Model, tx, data_iter, workdir: pathlib.Path):
  """(state, start step, state shardings, checkpointer): the job's newest intact checkpoint, else a new state.

  The checkpoint is checked against the model before anything is restored (a changed model is a
  :class:`resume.IncompatibleCheckpoint`); ``data_iter`` continues where the checkpoint left it.
  """
  abstract_state, state_sh, initial_state = build_state(config, mesh, model.dit_cfg, tx)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  try:
    # A LoRA checkpoint holds the state without its frozen base, which is loaded again and checked.
    restored = resume_lib.restore_newest_intact(checkpointer, lora_lib.saved_part(abstract_state), data_iter,
                                                config=config, job=workdir)
    if restored is None:
      return initial_state(), 0, state_sh, checkpointer
    state = lora_lib.resume_state(restored.state, checkpointer.saved_meta(restored.step) or {}, config,
                                  model.dit_cfg, abstract_state, restored.step)
  except BaseException:
    checkpointer.close()
    raise
  _log.info("resumed from %s", checkpointer.step_dir(restored.step))
  return state, restored.step, state_sh, checkpointer


def write_config_json(workdir: pathlib.Path, config) -> None:
  """``<job>/config.json``, replaced atomically (a kill never leaves half a file)."""
  if jax.process_index() != 0:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / ".config.json.tmp"
  tmp.write_text(config.to_json_best_effort(indent=2))
  os.replace(tmp, workdir / "config.json")


def _host_metrics(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _memory_gib() -> dict[str, float]:
  stats = jax.local_devices()[0].memory_stats() or {}
  if not stats:
    return {}
  return {"mem_in_use_gib": stats.get("bytes_in_use", 0) / 2**30,
          "mem_peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def oom_hint(err: Exception) -> MemoryError | None:
  """For an out-of-device-memory error, a MemoryError saying which settings to change; else None."""
  if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
    return None
  return MemoryError(
      "out of device memory at the first step. Settings that lower memory, in order of cost: "
      "--config.model.remat_policy=full (recompute blocks), a larger --config.mesh.fsdp (shard "
      "parameters/optimizer over more devices), --config.mesh.context=2/4/8 (split each clip's tokens), "
      "--config.optim.precision=reference_bf16 (bf16 params and Adam state), fewer "
      "--config.data.num_frames or a smaller --config.data.video_size, a smaller "
      f"--config.data.global_batch_size. Original error: {str(err)[:500]}")


def train(config) -> dict[str, Any]:
  """Runs (or resumes) the job; returns a summary (final step, last metrics, job folder)."""
  # ---- Cheap checks first: mesh, then every data file (nothing built or written yet) -----------
  workdir = job_dir(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  _log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
            jax.process_count())
  validate_clip_shape(config)
  validate_mesh(config, mesh, dit_config(config))

  # ---- The compiled step and its memory per device, printed and checked before any data is read --
  dit_cfg = dit_config(config)
  tx = optim_lib.make_optimizer(config)
  abstract_state, state_sh, _ = build_state(config, mesh, dit_cfg, tx)
  train_step = step_lib.make_jitted_train_step(config, mesh, dit.apply_fn(dit_cfg), state_sh, tx=tx)
  memory = memory_lib.preflight(config, train_step, abstract_state, memory_lib.abstract_batch(config, mesh, dit_cfg),
                                jax.random.key(config.seed))
  if config.trainer.get("dry_run", False):
    return {"step": 0, "metrics": {}, "job_dir": str(workdir), "memory": memory.as_dict()}
  data_iter, val_batches = open_data(config)

  # ---- Model; state: resume (newest intact checkpoint) > load_path > random --------------------
  try:
    model = build_model(config, mesh, workdir / "random_vae")
    latent_cache.check_vae_weights(config, model.vae_params)  # a latent cache must hold this VAE's latents
    state, start, state_sh, checkpointer = resume_or_init(config, mesh, model, tx, data_iter, workdir)
  except BaseException:
    data_iter.close()
    raise
  write_config_json(workdir, config)  # the settings work (and fit the job's checkpoints)
  base_rng = jax.random.key(config.seed)

  # ---- Steps -----------------------------------------------------------------------------------
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(config, dit.apply_fn(model.dit_cfg)), mesh,
                                     lora_lib.model_params(state_sh))
  batch_sh = sharding_lib.batch_sharding(mesh)
  t_lat = 1 + (int(config.data.num_frames) - 1) // 4
  h_lat, w_lat = (int(s) // 8 for s in config.data.video_size)
  step_flops = flops_lib.dit_flops(config.model, (t_lat, h_lat, w_lat), int(config.data.text_tokens))
  flops_per_step = step_flops.train_step * int(config.data.global_batch_size)
  peak = flops_lib.peak_flops(jax.devices()[0])

  def model_batch(host_batch):
    return device_batch(model, host_batch, batch_sh)

  def save(step: int, *, force: bool = False):
    meta = {"step": step, "seed": int(config.seed), "config": json.loads(config.to_json_best_effort()),
            **lora_lib.checkpoint_meta(state, config)}
    checkpointer.save(step, lora_lib.saved_part(state), data_iter, meta, force=force)

  def validate() -> dict[str, float]:
    """EMA loss at fixed timesteps on the first batches of the validation set (the same each time)."""
    ema = ema_lib.to_device(state.ema_params) if state.ema_params is not None else None
    params = lora_lib.model_params(state.replace(ema_params=ema), ema=True)
    totals: dict[str, list[float]] = {}
    for i, host_batch in enumerate(val_batches):
      batch = model_batch(host_batch)
      for t in config.trainer.validation_timesteps:
        m = _host_metrics(eval_step(params, batch, jax.random.key(1000 + i), t))
        totals.setdefault(f"loss_t{int(t)}", []).append(m["loss"])
    return {k: float(np.mean(v)) for k, v in totals.items()}

  max_iter = int(config.trainer.max_iter)
  logger = log_lib.MetricLogger(workdir, config, total_steps=max_iter, start_step=start)
  sampler = samples_lib.SampleWriter(config, model, mesh, workdir, logger)
  sample_iter = int(config.trainer.get("sample_iter", 0))
  run_validation = bool(val_batches)
  if run_validation and start == 0:
    logger.log(0, validate(), prefix="val")  # the baseline the validation curve starts from
  window: list[dict[str, float]] = []
  skips_reported = 0  # bad samples the data loader replaced at run time, as last logged
  step = start
  metrics: dict[str, float] = {}
  last_saved = start if checkpointer.latest_step() == start else None
  preempted = None  # the signal's name when SIGTERM/SIGINT stopped the run early
  try:
    with PreemptionGuard() as guard:
      while step < max_iter:
        t0 = time.perf_counter()
        host_batch = next(data_iter)
        t1 = time.perf_counter()
        try:
          batch = model_batch(host_batch)
          jax.block_until_ready(batch["latents"])
          t2 = time.perf_counter()
          state, dev_metrics = train_step(state, batch, base_rng)
          m = _host_metrics(dev_metrics)  # waits for the step: loss is checked every step
        except Exception as err:  # noqa: BLE001 - an out-of-memory error gets a hint, others pass
          hint = oom_hint(err)
          if hint is None:
            raise
          raise hint from err
        t3 = time.perf_counter()
        step += 1
        logger.step_done(step)
        if not np.isfinite(m["loss"]):
          raise NonFiniteLossError(
              f"non-finite loss {m['loss']} at step {step}; the last good checkpoint "
              f"({checkpointer.latest_step()}) is kept in {workdir / 'checkpoints'}")
        m.update(data_wait_s=t1 - t0, vae_s=t2 - t1, step_s=t3 - t2, iter_s=t3 - t0)
        window.append(m)
        if step % int(config.trainer.logging_iter) == 0 or step == max_iter:
          metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
          tflops = flops_per_step / metrics["step_s"] / jax.device_count() / 1e12
          metrics.update(tflops_per_device=tflops, data_skipped=float(data_iter.num_skipped), **_memory_gib())
          if data_iter.num_skipped > skips_reported:
            _log.warning("%d bad training sample(s) replaced so far (data.skip_bad_files; files named above)",
                         data_iter.num_skipped)
            skips_reported = data_iter.num_skipped
          if peak:
            metrics["mfu"] = tflops * 1e12 / peak
          logger.log(step, metrics)
          logger.progress(step, {k: metrics[k] for k in PROGRESS_FIELDS})
          window = []
        if step % int(config.trainer.save_iter) == 0 or guard.requested:
          save(step)
          last_saved = step
        if run_validation and step % int(config.trainer.validation_iter) == 0:
          logger.log(step, validate(), prefix="val")
        if sample_iter > 0 and step % sample_iter == 0:
          sampler.write(step, lora_lib.model_view(state), host_batch)
        if guard.requested:
          _log.warning("%s received: saved step %d, exiting", guard.signal_name, step)
          preempted = guard.signal_name
          break
    if last_saved != step:
      save(step, force=True)
  finally:
    checkpointer.close()
    logger.close()
  return {"step": step, "metrics": metrics, "job_dir": str(workdir), "preempted": preempted}
