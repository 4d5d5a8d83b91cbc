"""The pure train step and the validation-loss step.

``make_train_step(config, apply_fn, encode_fn=None)`` returns ``train_step(state, batch, rng) ->
(state, metrics)``: a pure function over pytrees, jitted by :func:`make_jitted_train_step` with
explicit in/out shardings and the state donated.

One call = one optimizer step (the reference ``training_step`` + optimizer hooks):

1. latents: ``batch['latents']`` (float32 [B,16,T,H,W]) or ``encode_fn(batch['video'])`` (uint8
   [B,3,T,H,W]; ``encode_fn`` normalises with :func:`normalize_video` (``models/vae.uint8_to_unit_range``)
   and runs the VAE; no gradient);
2. conditioning (``diffusion/conditioning.py``): N conditional frames per sample (or
   ``batch['num_conditional_frames']``, −1 = draw), caption dropout;
3. the objective's noise level, noise ε and loss (``diffusion/objective.py``);
4. gradient accumulation over ``optim.grad_accum_steps`` microbatches: an explicit ``lax.scan`` over
   strided microbatches inside the step (not ``optax.MultiSteps``), gradients summed in float32 and
   divided by the count (the reference divides the loss before backward), so each call is exactly one
   optimizer step and ``state.step`` counts optimizer steps;
5. nan/inf gradients → 0, global-norm clipping (pre-clip norm reported as ``grad_norm``), AdamW with
   lr = optim.lr · f(step), power-EMA update with β(step + iteration_shift); step += 1.

A LoRA state (``training/lora.py``) also carries the frozen base weights: the network sees base +
adapters, and only the adapters (``state.params``) get gradients, optimizer updates and the EMA.

The EMA update may run in host memory (``ema.offload``), every N steps only (``ema.every_n_steps``) or
as a program of its own after the step (``ema.offload_update='separate'``): :class:`JittedTrainStep`
then runs a step program without the update and, when due, the update (``training/ema.py``).

Randomness: the step folds ``state.step`` into ``rng`` (and the microbatch index into that), so the
caller may pass the run's base key every step; the result is deterministic and resumable.

``apply_fn(params, x_B_C_T_H_W, timesteps, crossattn_emb, cond_mask_B_1_T_H_W, padding_mask, is_image)``
returns the float32 network output (``models/dit.py:apply_fn``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from v2w_jax.diffusion.conditioning import make_condition
from v2w_jax.diffusion.objective import Objective, make_objective
from v2w_jax.models import lora as lora_lib
from v2w_jax.models.vae import uint8_to_unit_range as normalize_video  # re-exported: the VAE's input convention
from v2w_jax.parallel import sharding as sharding_lib
from v2w_jax.training import ema as ema_lib
from v2w_jax.training import optim as optim_lib
from v2w_jax.training.state import TrainState

ApplyFn = Callable[..., jax.Array]
EncodeFn = Callable[[jax.Array], jax.Array]
Batch = dict[str, Any]


def _batch_latents(batch: Batch, encode_fn: EncodeFn | None) -> jax.Array:
  if "latents" in batch:
    lat = batch["latents"]
  elif "video" in batch:
    if encode_fn is None:
      raise ValueError("batch has 'video' but the train step was built without encode_fn "
                       "(pass the VAE encoder, or precomputed 'latents')")
    lat = encode_fn(batch["video"])
  else:
    raise ValueError(f"batch needs 'latents' or 'video', got keys {sorted(batch)}")
  lat = jax.lax.stop_gradient(jnp.asarray(lat).astype(jnp.float32))
  if lat.ndim != 5:
    raise ValueError(f"latents must be [B,C,T,H,W], got shape {lat.shape}")
  return lat


def _check_batch(batch: Batch) -> None:
  if "text_embeddings" not in batch:
    raise ValueError(f"batch needs 'text_embeddings' [B,N,D], got keys {sorted(batch)}")


def make_loss_fn(config, apply_fn: ApplyFn, encode_fn: EncodeFn | None = None,
                 objective: Objective | None = None, *, caption_dropout: bool = True) -> Callable:
  """``loss_fn(params, batch, key, timesteps=None) -> (loss, metrics)`` for one (micro)batch.

  With ``timesteps`` (τ per sample, RF units) the noise level is fixed instead of sampled.
  """
  objective = objective or make_objective(config)
  probs = tuple(config.conditioning.conditional_frames_probs)
  dropout = float(config.conditioning.caption_dropout) if caption_dropout else 0.0

  def loss_fn(params, batch: Batch, key: jax.Array, timesteps: jax.Array | None = None):
    _check_batch(batch)
    latents = _batch_latents(batch, encode_fn)
    b, _, t = latents.shape[:3]
    k_cond, k_level, k_eps = jax.random.split(key, 3)
    cond = make_condition(
        k_cond,
        batch["text_embeddings"],
        latents.shape,
        conditional_frames_probs=probs,
        caption_dropout_rate=dropout,
        forced_num_conditional_frames=batch.get("num_conditional_frames"),
        padding_mask=batch.get("padding_mask"),
    )
    if timesteps is None:
      level = objective.sample_noise_level(k_level, b, t)
    else:
      level = objective.noise_level_at(jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,)), t)
    eps = jax.random.normal(k_eps, latents.shape, jnp.float32)

    def net_fn(x_in, ts):
      mask = cond.input_mask(latents.shape, x_in.dtype)
      return apply_fn(params, x_in, ts, cond.crossattn_emb, mask, cond.padding_mask, cond.is_image)

    loss, aux = objective.loss(net_fn, latents, eps, level, cond)
    metrics = {
        "loss": loss,
        "num_conditional_frames": jnp.mean(cond.num_conditional_frames.astype(jnp.float32)),
        "caption_dropped": 1.0 - jnp.mean(cond.caption_kept.astype(jnp.float32)),
        "sigma_mean": jnp.mean(level.sigma),
        "timestep_mean": jnp.mean(level.timestep),
    }
    return loss, metrics

  return loss_fn


def _ema_settings(config) -> tuple[bool, float, int, int, bool]:
  """(enabled, γ, iteration shift, every_n_steps, offloaded) from ``config.ema``."""
  enabled = bool(config.ema.get("enabled", True))
  gamma = ema_lib.power_ema_gamma(float(config.ema.rate)) if enabled else 0.0
  every, _ = ema_lib.schedule(config.ema)
  return enabled, gamma, int(config.ema.get("iteration_shift", 0)), every, bool(config.ema.get("offload", False))


def make_ema_step(config) -> Callable[[TrainState], TrainState]:
  """``ema_step(state) -> state``: the EMA update for the optimizer step just taken (``state.step − 1``),
  alone; what the train step does in place when the update is not a program of its own."""
  enabled, gamma, shift, every, offloaded = _ema_settings(config)

  def ema_step(state: TrainState) -> TrainState:
    if not enabled or state.ema_params is None:
      return state
    beta = ema_lib.power_ema_beta_window(state.step - 1 + shift, every, gamma)
    return state.replace(ema_params=ema_lib.ema_update(state.ema_params, state.params, beta, on_host=offloaded))

  return ema_step


def make_train_step(
    config,
    apply_fn: ApplyFn,
    encode_fn: EncodeFn | None = None,
    *,
    objective: Objective | None = None,
    tx: optax.GradientTransformation | None = None,
    update_ema: bool = True,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure ``train_step(state, batch, rng) -> (state, metrics)`` (see the module docstring).

  ``tx`` defaults to ``optim.make_optimizer(config)``; it must be the one the state was created with.
  ``update_ema=False`` leaves the EMA as it is (``ema_beta`` is then reported as 1); with
  ``ema.every_n_steps`` N > 1 an update uses the decay of the N steps ending at this one.
  Metrics (float32 scalars): loss, grad_norm (pre-clip, after nan→0), grad_nonfinite (count of
  nan/inf gradient entries), clip_coef, lr, ema_beta, num_conditional_frames (mean), caption_dropped
  (fraction), sigma_mean, timestep_mean. ``lr`` is the schedule at ``state.step``; the optimizer applies
  the schedule at its own count, which equals ``state.step`` for a state built by ``training/state.py``.
  """
  tx = tx or optim_lib.make_optimizer(config)
  loss_fn = make_loss_fn(config, apply_fn, encode_fn, objective)
  accum = int(config.optim.get("grad_accum_steps", 1))
  if accum < 1:
    raise ValueError(f"config.optim.grad_accum_steps must be >= 1, got {accum}")
  max_norm = float(config.optim.get("clip_grad_norm", 0.0) or 0.0)
  lr_fn = optim_lib.make_lr_schedule(config)
  ema_enabled, gamma, shift, ema_every, ema_offloaded = _ema_settings(config)

  def trained_loss(params, frozen, batch, key):
    # LoRA: the network sees base + adapters; only the adapters (params) are differentiated.
    return loss_fn(params if frozen is None else lora_lib.join_params(frozen, params), batch, key)

  grad_fn = jax.value_and_grad(trained_loss, has_aux=True)

  def grads_and_metrics(params, frozen, batch, key):
    if accum == 1:
      (_, metrics), grads = grad_fn(params, frozen, batch, key)
      return optim_lib.tree_cast(grads, jnp.float32), metrics
    micro = optim_lib.split_microbatches(batch, accum)

    def body(g_acc, xs):
      mb, j = xs
      (_, m), g = grad_fn(params, frozen, mb, jax.random.fold_in(key, j))
      g_acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g)
      return g_acc, m

    g0 = optim_lib.zeros_like_f32(params)
    g_sum, ms = jax.lax.scan(body, g0, (micro, jnp.arange(accum, dtype=jnp.int32)))
    grads = jax.tree.map(lambda g: g / jnp.float32(accum), g_sum)
    return grads, jax.tree.map(lambda m: jnp.mean(m, axis=0), ms)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    key = jax.random.fold_in(rng, state.step)
    grads, metrics = grads_and_metrics(state.params, getattr(state, "frozen", None), batch, key)
    nonfinite = sum(jnp.sum(~jnp.isfinite(g)) for g in jax.tree.leaves(grads))
    grads, grad_norm = optim_lib.sanitize_and_clip(grads, max_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics.update(
        grad_norm=grad_norm,
        grad_nonfinite=jnp.asarray(nonfinite, jnp.float32),
        clip_coef=optim_lib.clip_coefficient(grad_norm, max_norm) if max_norm > 0 else jnp.float32(1.0),
        lr=lr_fn(state.step),
    )
    ema_params = state.ema_params
    if ema_enabled and ema_params is not None:
      if update_ema:
        beta = ema_lib.power_ema_beta_window(state.step + shift, ema_every, gamma)
        ema_params = ema_lib.ema_update(ema_params, params, beta, on_host=ema_offloaded)
      else:
        beta = jnp.float32(1.0)  # unchanged this step
      metrics["ema_beta"] = beta
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
    return new_state, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

  return train_step


def make_eval_step(
    config,
    apply_fn: ApplyFn,
    encode_fn: EncodeFn | None = None,
    *,
    objective: Objective | None = None,
) -> Callable[[Any, Batch, jax.Array, jax.Array], dict[str, jax.Array]]:
  """``eval_step(params, batch, rng, timesteps) -> metrics``: the loss at fixed timesteps.

  ``timesteps``: RF τ in [0, 1000] (scalar or [B]; EDM maps it to σ = t/(1−t), t = τ/1000). Noise and
  conditional-frame counts come from ``rng`` (deterministic); captions are never dropped.
  """
  loss_fn = make_loss_fn(config, apply_fn, encode_fn, objective, caption_dropout=False)

  def eval_step(params, batch: Batch, rng: jax.Array, timesteps: jax.Array):
    _, metrics = loss_fn(params, batch, rng, timesteps)
    return jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

  return eval_step


def _batch_key(batch: Batch):
  """Tree structure, shapes and dtypes of a batch (arrays or ``jax.ShapeDtypeStruct``s)."""
  leaves, treedef = jax.tree.flatten(batch)
  return treedef, tuple((tuple(np.shape(x) if not hasattr(x, "shape") else x.shape),
                         str(getattr(x, "dtype", None) or np.asarray(x).dtype)) for x in leaves)


class JittedTrainStep:
  """The jitted train step, ``step(state, batch, rng) -> (state, metrics)``, with explicit shardings:
  state per ``state_shardings`` (donated), each batch leaf's first dim over ('data', 'fsdp')
  (replicated when that product does not divide it, e.g. a global batch smaller than the device
  count), rng and metrics replicated. Calls run under ``jax.set_mesh(mesh)`` so the model's logical
  activation constraints bind to the mesh.

  One call runs the program ``"step"`` (with the EMA update); when the EMA update is skipped on some
  steps (``ema_every`` > 1) or is a program of its own (``ema_separate``), the programs
  ``"step_no_ema"`` and ``"ema"`` instead, as due. ``compile(state, batch, rng)`` compiles every program
  ahead of time (``state``/``batch`` may be ``jax.ShapeDtypeStruct``s) and later calls with that batch
  signature reuse them, so a memory check before training costs no second compile.
  """

  def __init__(self, fns: dict[str, Callable], mesh: jax.sharding.Mesh, state_shardings: Any, *,
               donate: bool = True, ema_every: int = 1, ema_separate: bool = False):
    self.fns, self.mesh, self.state_shardings, self.donate = fns, mesh, state_shardings, donate
    self.ema_every, self.ema_separate = int(ema_every), bool(ema_separate)
    self._jitted: dict[Any, Any] = {}
    self._compiled: dict[Any, Any] = {}

  @property
  def program_names(self) -> tuple[str, ...]:
    if self.ema_separate:
      return ("step_no_ema", "ema")
    return ("step", "step_no_ema") if self.ema_every > 1 else ("step",)

  def _jit(self, name: str, batch: Batch):
    key = (name, _batch_key(batch)) if name != "ema" else (name,)
    if key not in self._jitted:
      rep = sharding_lib.replicated(self.mesh)
      donate = (0,) if self.donate else ()
      if name == "ema":
        self._jitted[key] = jax.jit(self.fns[name], in_shardings=(self.state_shardings,),
                                    out_shardings=self.state_shardings, donate_argnums=donate)
      else:
        self._jitted[key] = jax.jit(
            self.fns[name],
            in_shardings=(self.state_shardings, sharding_lib.batch_shardings_for(batch, self.mesh), rep),
            out_shardings=(self.state_shardings, rep), donate_argnums=donate)
    return self._jitted[key]

  def _program(self, name: str, batch: Batch):
    key = (name, _batch_key(batch)) if name != "ema" else (name,)
    return self._compiled.get(key) or self._jit(name, batch)

  def _ema_due(self, state: TrainState) -> bool:
    return self.ema_every == 1 or (int(state.step) + 1) % self.ema_every == 0

  def __call__(self, state: TrainState, batch: Batch, rng: jax.Array):
    with jax.set_mesh(self.mesh):
      if self.ema_separate:
        due = self._ema_due(state)
        state, metrics = self._program("step_no_ema", batch)(state, batch, rng)
        return (self._program("ema", batch)(state) if due else state), metrics
      name = "step" if self._ema_due(state) else "step_no_ema"
      return self._program(name, batch)(state, batch, rng)

  def lower(self, state: TrainState, batch: Batch, rng: jax.Array):
    """The lowered main program (the step that updates the EMA, or the step alone when the EMA
    update is a program of its own)."""
    name = "step_no_ema" if self.ema_separate else "step"
    with jax.set_mesh(self.mesh):
      return self._jit(name, batch).lower(state, batch, rng)

  def compile(self, state: TrainState, batch: Batch, rng: jax.Array) -> "CompiledTrainStep":
    """Compiles every program now; later calls with this batch signature run these executables."""
    programs = {}
    with jax.set_mesh(self.mesh):
      for name in self.program_names:
        args = (state,) if name == "ema" else (state, batch, rng)
        programs[name] = self._jit(name, batch).lower(*args).compile()
        self._compiled[(name, _batch_key(batch)) if name != "ema" else (name,)] = programs[name]
    return CompiledTrainStep(self, programs)


class CompiledTrainStep:
  """The compiled programs of a :class:`JittedTrainStep` (by name); callable like it."""

  def __init__(self, step: JittedTrainStep, programs: dict[str, Any]):
    self.step, self.programs = step, programs

  def __call__(self, state: TrainState, batch: Batch, rng: jax.Array):
    return self.step(state, batch, rng)

  def as_text(self) -> str:
    """The optimized HLO of every program, concatenated."""
    return "\n".join(p.as_text() for p in self.programs.values())


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh, state_shardings: Any, *,
                   donate: bool = True) -> JittedTrainStep:
  """A :class:`JittedTrainStep` running ``train_step`` (one program, ``"step"``)."""
  return JittedTrainStep({"step": train_step}, mesh, state_shardings, donate=donate)


def make_jitted_train_step(
    config,
    mesh: jax.sharding.Mesh,
    apply_fn: ApplyFn,
    state_shardings: Any,
    encode_fn: EncodeFn | None = None,
    *,
    objective: Objective | None = None,
    tx: optax.GradientTransformation | None = None,
    donate: bool = True,
) -> JittedTrainStep:
  """:func:`make_train_step` (+ its EMA-less variant and :func:`make_ema_step` as ``config.ema`` needs)
  in a :class:`JittedTrainStep`."""
  every, separate = ema_lib.schedule(config.ema)
  kw = dict(objective=objective, tx=tx)
  fns = {"step": make_train_step(config, apply_fn, encode_fn, **kw)}
  if every > 1 or separate:
    fns["step_no_ema"] = make_train_step(config, apply_fn, encode_fn, update_ema=False, **kw)
  if separate:
    fns["ema"] = make_ema_step(config)
  return JittedTrainStep(fns, mesh, state_shardings, donate=donate, ema_every=every, ema_separate=separate)


def jit_eval_step(eval_step: Callable, mesh: jax.sharding.Mesh, param_shardings: Any) -> Callable:
  """Jitted ``eval_step`` with params per ``param_shardings``, batch leaves over ('data', 'fsdp')."""
  rep = sharding_lib.replicated(mesh)
  cache: dict[Any, Callable] = {}

  def call(params, batch, rng, timesteps):
    sig = _batch_key(batch)
    if sig not in cache:
      cache[sig] = jax.jit(eval_step, in_shardings=(param_shardings, sharding_lib.batch_shardings_for(batch, mesh),
                                                    rep, rep), out_shardings=rep)
    with jax.set_mesh(mesh):
      return cache[sig](params, batch, rng, jnp.asarray(timesteps, jnp.float32))

  return call


__all__ = [
    "normalize_video",
    "make_loss_fn",
    "make_train_step",
    "make_eval_step",
    "make_ema_step",
    "JittedTrainStep",
    "CompiledTrainStep",
    "jit_train_step",
    "make_jitted_train_step",
    "jit_eval_step",
]
