"""Optimizer pieces: LambdaLinear LR, torch-style AdamW, gradient sanitising and clipping.

training_spec §7-§8.

* :func:`lambda_linear` (float64, host) and :func:`make_lambda_linear` (jnp, traced) give the reference
  ``LambdaLinearScheduler`` multiplier f(k): per cycle, linear warm-up f_start → f_max over W steps,
  then linear decay to f_min at the cycle's end, f = f_min + (f_max − f_min)(L − n)/(L − W) with n the
  step inside the cycle. A step equal to a cycle boundary belongs to the earlier cycle (reference
  ``find_in_interval``). Past the last cycle the reference raises; here f holds f_min of the last cycle.
  Optimizer step k (0-based) uses lr = base_lr · f(k) (LambdaLR semantics).
* :func:`torch_adamw` — ``torch.optim.AdamW(fused=True)`` semantics as an optax transformation:
  all arithmetic in float32, moments stored in ``moment_dtype`` (float32, or bfloat16 for the
  reference-bf16 mode where the reference keeps exp_avg/exp_avg_sq in the params' bf16), decoupled
  weight decay on the parameters selected by a mask. Updates come out in float32 and
  ``optax.apply_updates`` rounds p + u once to the parameter dtype, which is what the fused kernel
  does (so an update below half a bf16 ulp is lost, spec §12 number 21).
* :func:`sanitize_and_clip` — nan/±inf gradients → 0, then global-norm clipping with the reference
  coefficient min(1, max_norm/(‖g‖ + 1e-6)); returns the pre-clip norm for logging.

Precision modes (``optim.precision``): ``fp32_master`` (default: float32 params and moments, the model
computes in bf16) and ``reference_bf16`` (params and moments in bf16, as the reference run).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PRECISIONS = ("fp32_master", "reference_bf16")
WEIGHT_DECAY_FILTERS = ("all", "matrices")


# ----------------------------------------------------------------------------------------------- LR


def _schedule_lists(warm_up_steps, cycle_lengths, f_start, f_max, f_min):
  lists = [tuple(np.atleast_1d(x).tolist()) for x in (warm_up_steps, cycle_lengths, f_start, f_max, f_min)]
  n = len(lists[0])
  if any(len(x) != n for x in lists) or n == 0:
    raise ValueError("schedule: warm_up_steps, cycle_lengths, f_start, f_max, f_min must have the same "
                     f"non-zero length, got {[len(x) for x in lists]}")
  for w, l in zip(lists[0], lists[1]):
    if not 0 <= w < l:
      raise ValueError(f"schedule: need 0 <= warm_up_steps < cycle_length, got {w} and {l}")
  return lists


def lambda_linear(step: int, *, warm_up_steps, cycle_lengths, f_start, f_max, f_min) -> float:
  """Reference LambdaLinear multiplier f(step) in float64 (host side)."""
  ws, ls, fs, fx, fn = _schedule_lists(warm_up_steps, cycle_lengths, f_start, f_max, f_min)
  cum = np.cumsum([0] + list(ls))
  cycle = int(np.searchsorted(cum[1:], step, side="left"))  # first boundary >= step
  if cycle >= len(ls):
    return float(fn[-1])
  n = step - int(cum[cycle])
  w, l = ws[cycle], ls[cycle]
  if n < w:
    return (fx[cycle] - fs[cycle]) / w * n + fs[cycle]
  return fn[cycle] + (fx[cycle] - fn[cycle]) * (l - n) / (l - w)


def make_lambda_linear(*, warm_up_steps, cycle_lengths, f_start, f_max, f_min) -> Callable[[jax.Array], jax.Array]:
  """Traceable f(step) (float32); same piecewise formula as :func:`lambda_linear`."""
  ws, ls, fs, fx, fn = _schedule_lists(warm_up_steps, cycle_lengths, f_start, f_max, f_min)
  bounds = jnp.asarray(np.cumsum(ls), jnp.int32)  # end of each cycle (inclusive)
  starts = jnp.asarray(np.cumsum([0] + list(ls))[:-1], jnp.int32)
  w_a, l_a = jnp.asarray(ws, jnp.float32), jnp.asarray(ls, jnp.float32)
  fs_a, fx_a, fn_a = (jnp.asarray(x, jnp.float32) for x in (fs, fx, fn))
  slope = jnp.asarray([(b - a) / w if w > 0 else 0.0 for a, b, w in zip(fs, fx, ws)], jnp.float32)
  last_f_min = jnp.float32(fn[-1])

  def f(step):
    step = jnp.asarray(step, jnp.int32)
    cycle = jnp.sum(step > bounds).astype(jnp.int32)
    past = cycle >= len(ls)
    c = jnp.minimum(cycle, len(ls) - 1)
    n = (step - starts[c]).astype(jnp.float32)
    warm = slope[c] * n + fs_a[c]
    decay = fn_a[c] + (fx_a[c] - fn_a[c]) * (l_a[c] - n) / (l_a[c] - w_a[c])
    val = jnp.where(n < w_a[c], warm, decay)
    return jnp.where(past, last_f_min, val)

  return f


def schedule_kwargs(schedule_cfg) -> dict[str, Any]:
  if schedule_cfg.get("name", "lambda_linear") != "lambda_linear":
    raise ValueError(f"config.schedule.name: unknown {schedule_cfg.name!r} (only 'lambda_linear')")
  return dict(
      warm_up_steps=tuple(schedule_cfg.warm_up_steps),
      cycle_lengths=tuple(schedule_cfg.cycle_lengths),
      f_start=tuple(schedule_cfg.f_start),
      f_max=tuple(schedule_cfg.f_max),
      f_min=tuple(schedule_cfg.f_min),
  )


def make_lr_schedule(config) -> optax.Schedule:
  """lr(k) = optim.lr · f(k) from ``config.optim.lr`` and ``config.schedule``."""
  f = make_lambda_linear(**schedule_kwargs(config.schedule))
  base = float(config.optim.lr)
  return lambda step: jnp.float32(base) * f(step)


# -------------------------------------------------------------------------------------------- AdamW


def _log(b: float) -> float:
  return math.log(b) if b > 0 else -math.inf


class TorchAdamWState(NamedTuple):
  count: jax.Array  # int32: optimizer steps taken so far
  mu: Any
  nu: Any


def weight_decay_mask(params: Any, weight_decay_filter: str = "all") -> Any:
  """Which parameters get weight decay: ``all`` (reference) or ``matrices`` (ndim >= 2)."""
  if weight_decay_filter == "all":
    return jax.tree.map(lambda _: True, params)
  if weight_decay_filter == "matrices":
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  raise ValueError(f"config.optim.weight_decay_filter: unknown {weight_decay_filter!r} "
                   f"(expected one of {WEIGHT_DECAY_FILTERS})")


def torch_adamw(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
    moment_dtype: Any = jnp.float32,
) -> optax.GradientTransformation:
  """AdamW with torch's formula, computed in float32 (see the module docstring).

  Step k (count before the update) with lr = schedule(k), bias corrections bc_i = 1 − b_i^(k+1):
  m ← b1 m + (1 − b1) g; v ← b2 v + (1 − b2) g²; u = −lr·wd·p·[mask] − (lr/bc1)·m/(√v/√bc2 + eps).
  """
  sched = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    z = lambda p: jnp.zeros(jnp.shape(p), moment_dtype)
    return TorchAdamWState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(z, params), nu=jax.tree.map(z, params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("torch_adamw needs params (decoupled weight decay)")
    count = state.count
    lr = jnp.asarray(sched(count), jnp.float32)
    k1 = (count + 1).astype(jnp.float32)
    # 1 − b^k as −expm1(k·ln b) with ln b from float64: float32 1 − 0.999^k would lose ~1e-5 to cancellation.
    bc1 = -jnp.expm1(k1 * jnp.float32(_log(b1)))
    bc2_sqrt = jnp.sqrt(-jnp.expm1(k1 * jnp.float32(_log(b2))))
    m_tree = mask(params) if callable(mask) else mask
    if m_tree is None:
      m_tree = jax.tree.map(lambda _: True, params)

    def one(g, m, v, p, decay):
      g = g.astype(jnp.float32)
      m32 = b1 * m.astype(jnp.float32) + (1.0 - b1) * g
      v32 = b2 * v.astype(jnp.float32) + (1.0 - b2) * g * g
      denom = jnp.sqrt(v32) / bc2_sqrt + eps
      u = -(lr / bc1) * (m32 / denom)
      if decay:
        u = u - lr * weight_decay * p.astype(jnp.float32)
      return u, m32.astype(moment_dtype), v32.astype(moment_dtype)

    out = jax.tree.map(one, grads, state.mu, state.nu, params, m_tree)
    updates, mu, nu = jax.tree.transpose(jax.tree.structure(grads), jax.tree.structure((0, 0, 0)), out)
    return updates, TorchAdamWState(count=count + 1, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def precision_dtypes(precision: str) -> tuple[Any, Any]:
  """(param dtype, moment dtype) for ``optim.precision``."""
  if precision == "fp32_master":
    return jnp.float32, jnp.float32
  if precision == "reference_bf16":
    return jnp.bfloat16, jnp.bfloat16
  raise ValueError(f"config.optim.precision: unknown {precision!r} (expected one of {PRECISIONS})")


def make_optimizer(config) -> optax.GradientTransformation:
  """The AdamW of ``config.optim`` on the LambdaLinear schedule (clipping is done by the train step)."""
  o = config.optim
  _, moment_dtype = precision_dtypes(str(o.get("precision", "fp32_master")))
  wd_filter = str(o.get("weight_decay_filter", "all"))
  weight_decay_mask({}, wd_filter)  # validates the name early
  return torch_adamw(
      make_lr_schedule(config),
      b1=float(o.b1),
      b2=float(o.b2),
      eps=float(o.eps),
      weight_decay=float(o.weight_decay),
      mask=lambda p: weight_decay_mask(p, wd_filter),
      moment_dtype=moment_dtype,
  )


# ----------------------------------------------------------------------------------------- clipping


def clip_coefficient(norm: jax.Array, max_norm: float) -> jax.Array:
  """Reference clip coefficient min(1, max_norm / (norm + 1e-6))."""
  return jnp.minimum(1.0, max_norm / (norm + 1e-6))


def global_norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def sanitize_and_clip(grads: Any, max_norm: float | None) -> tuple[Any, jax.Array]:
  """nan/±inf → 0, then scale by the clip coefficient; returns (grads, pre-clip global norm)."""
  grads = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), grads)
  norm = global_norm(grads)
  if max_norm is None or max_norm <= 0:
    return grads, norm
  coef = clip_coefficient(norm, max_norm)
  return jax.tree.map(lambda g: (g.astype(jnp.float32) * coef).astype(g.dtype), grads), norm


def split_microbatches(batch: Any, num: int) -> Any:
  """[B, ...] leaves -> [num, B/num, ...]; microbatch j holds samples j, j+num, j+2·num, ...

  The strided split keeps each device's contiguous slice of a batch sharded over its first axis
  local to that device (every device contributes B/(num·devices) samples to every microbatch).
  """
  def one(x):
    b = x.shape[0]
    if b % num:
      raise ValueError(f"batch size {b} is not divisible by optim.grad_accum_steps = {num}")
    return jnp.swapaxes(x.reshape((b // num, num) + x.shape[1:]), 0, 1)

  return jax.tree.map(one, batch)


def tree_cast(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def zeros_like_f32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
