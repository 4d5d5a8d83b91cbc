"""Rectified-flow UniPC (bh2, order 2, data prediction) as a pure, jittable JAX loop.

This is the reference ``FlowUniPCMultistepScheduler`` (UniPC of Zhao et al. 2023 ported to flow matching):
multistep predictor UniP + corrector UniC in x0-prediction form, B(h) = expm1(-h) ("bh2"), solver order 2,
``lower_order_final``, the corrector on every step after the first, final sigma 0. Flow parameterisation:
x_sigma = (1 - sigma) x0 + sigma noise, alpha = 1 - sigma, lambda = ln alpha - ln sigma, m = x - sigma v.

All per-step scalars depend only on the sigma grid, so they are computed once on the host in float64
(``unipc_coefficients``) and the device loop is a ``lax.scan`` of a few fused multiply-adds per step.
Unlike the reference (which steps only batch element 0), every batch element is integrated.
Math: fixtures ``samplers/README.md`` §1 ("UniPC step k").
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.diffusion.timesteps import RFSchedule

Array = jax.Array
# velocity_fn(x [B, ...], timesteps [B, 1] float32, values in 0..1000) -> v [B, ...]
VelocityFn = Callable[[Array, Array], Array]


class UniPCCoefficients(NamedTuple):
  """Per-step scalars, each shape (K,) for K model evaluations.

  Corrector at step k (k >= 1, order p = order[k-1]):
    x_k <- c_ratio xc_{k-1} - c_m m_{k-1} - c_d1 (m_{k-2} - m_{k-1}) - c_dt (m_k - m_{k-1}).
  Predictor at step k (order order[k]):
    x_{k+1} = p_ratio x_k - p_m m_k - p_d1 (m_{k-1} - m_k).
  """

  sigma: np.ndarray  # sigma_k used for m_k = x_k - sigma_k v_k
  use_corrector: np.ndarray  # bool, False at k = 0
  c_ratio: np.ndarray
  c_m: np.ndarray
  c_d1: np.ndarray
  c_dt: np.ndarray
  p_ratio: np.ndarray
  p_m: np.ndarray
  p_d1: np.ndarray
  order: np.ndarray  # int, predictor order p_k


class UniPCState(NamedTuple):
  """Solver state entering step k.

  Attributes:
    x: the predictor output of step k-1 (x_0 = initial noise), where the model is evaluated at step k.
    last_sample: the (corrected) sample that entered the predictor at step k-1.
    m_prev: data prediction m_{k-1}.
    m_prev2: data prediction m_{k-2}.
  """

  x: Array
  last_sample: Array
  m_prev: Array
  m_prev2: Array


def unipc_orders(num_evaluations: int, solver_order: int = 2) -> np.ndarray:
  """Predictor order p_k = min(solver_order, K - k, k + 1) (warm-up and ``lower_order_final``)."""
  k = np.arange(num_evaluations)
  return np.minimum(np.minimum(solver_order, num_evaluations - k), k + 1).astype(np.int64)


def unipc_coefficients(sigmas: np.ndarray) -> UniPCCoefficients:
  """Host-side float64 UniPC-bh2 scalars for the float32 sigma grid ``sigmas`` ((K+1,), last entry 0)."""
  sig = np.asarray(sigmas, dtype=np.float32).astype(np.float64)
  if sig.ndim != 1 or sig.shape[0] < 2:
    raise ValueError(f"unipc_coefficients: sigmas must be 1-D with >= 2 entries, got shape {sig.shape}")
  if sig[-1] != 0.0 or np.any(sig[:-1] <= 0.0) or np.any(sig[:-1] >= 1.0):
    raise ValueError("unipc_coefficients: sigmas must lie in (0, 1) and end with 0")
  num = sig.shape[0] - 1
  alpha = 1.0 - sig
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sig)  # lambda_K = +inf
  order = unipc_orders(num)
  z = np.zeros(num)
  c_ratio, c_m, c_d1, c_dt = z.copy(), z.copy(), z.copy(), z.copy()
  p_ratio, p_m, p_d1 = z.copy(), z.copy(), z.copy()
  use_corrector = np.arange(num) >= 1
  for k in range(num):
    # Predictor k -> k+1 (at the last step sigma_{k+1} = 0, h = inf, phi = -1: x_{k+1} = m_k).
    h = lam[k + 1] - lam[k]
    phi = np.expm1(-h)
    p_ratio[k] = sig[k + 1] / sig[k]
    p_m[k] = alpha[k + 1] * phi
    if order[k] == 2:
      r = (lam[k - 1] - lam[k]) / h
      p_d1[k] = alpha[k + 1] * phi * 0.5 / r  # bh2 order-2 predictor: fixed rho = 1/2
    # Corrector at step k, using the predictor order of step k-1.
    if k >= 1:
      h = lam[k] - lam[k - 1]
      phi = np.expm1(-h)
      b_h = phi  # bh2
      c_ratio[k] = sig[k] / sig[k - 1]
      c_m[k] = alpha[k] * phi
      if order[k - 1] == 1:
        rho_t = 0.5
      else:
        r = (lam[k - 2] - lam[k - 1]) / h
        h_phi_1 = phi / (-h) - 1.0
        b = np.array([h_phi_1 / b_h, 2.0 * (h_phi_1 / (-h) - 0.5) / b_h])
        rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), b)
        c_d1[k] = alpha[k] * b_h * rho[0] / r
        rho_t = rho[1]
      c_dt[k] = alpha[k] * b_h * rho_t
  return UniPCCoefficients(
      sigma=sig[:-1], use_corrector=use_corrector, c_ratio=c_ratio, c_m=c_m, c_d1=c_d1, c_dt=c_dt,
      p_ratio=p_ratio, p_m=p_m, p_d1=p_d1, order=order)


def _device_coefficients(coeffs: UniPCCoefficients, dtype) -> UniPCCoefficients:
  return UniPCCoefficients(*[
      jnp.asarray(c) if c.dtype.kind in "bi" else jnp.asarray(c, dtype=dtype) for c in coeffs])


def init_state(x_init: Array) -> UniPCState:
  """Solver state before the first step (x = initial noise; history unused at k = 0)."""
  zeros = jnp.zeros_like(x_init)
  return UniPCState(x=x_init, last_sample=zeros, m_prev=zeros, m_prev2=zeros)


def unipc_update(state: UniPCState, v: Array, c: UniPCCoefficients) -> tuple[UniPCState, tuple[Array, Array]]:
  """One UniPC step given the (guided) velocity ``v`` at ``state.x``; ``c`` holds step-k scalars.

  Returns the next state and (m_k, x_k after the corrector).
  """
  x = state.x
  m = x - c.sigma * v
  x_corr = (c.c_ratio * state.last_sample - c.c_m * state.m_prev
            - c.c_d1 * (state.m_prev2 - state.m_prev) - c.c_dt * (m - state.m_prev))
  x = jnp.where(c.use_corrector, x_corr, x)
  x_next = c.p_ratio * x - c.p_m * m - c.p_d1 * (state.m_prev - m)
  return UniPCState(x=x_next, last_sample=x, m_prev=m, m_prev2=state.m_prev), (m, x)


class UniPCTrajectory(NamedTuple):
  """Per-step records (leading axis K), matching the fixture arrays ``x``, ``v``, ``x0pred``, ``x_corrected``."""

  x: Array  # where the model was evaluated at step k
  v: Array
  x0pred: Array
  x_corrected: Array


def unipc_sample(
    velocity_fn: VelocityFn,
    x_init: Array,
    schedule: RFSchedule,
    *,
    return_trajectory: bool = False,
) -> Array | tuple[Array, UniPCTrajectory]:
  """Integrates the flow ODE from ``x_init`` (sigma_0) to sigma = 0 with UniPC.

  Args:
    velocity_fn: (x [B, ...], timesteps [B, 1] float32 trunc(1000 sigma_k)) -> velocity, same shape as x.
      Guidance and conditional-frame handling live inside it (see ``samplers.generate_latents``).
    x_init: [B, ...] initial sample (the noise; batch axis first).
    schedule: from ``timesteps.rf_unipc_schedule``.
    return_trajectory: also return the per-step records (for tests and debugging).

  Returns:
    The final sample (dtype of x_init), and the trajectory if requested.
  """
  coeffs = _device_coefficients(unipc_coefficients(schedule.sigmas), x_init.dtype)
  timesteps = jnp.asarray(np.asarray(schedule.timesteps, dtype=np.float32))
  batch = x_init.shape[0]

  def body(state: UniPCState, xs):
    tau, c = xs
    v = velocity_fn(state.x, jnp.full((batch, 1), tau, dtype=jnp.float32))
    new_state, (m, x_corr) = unipc_update(state, v.astype(state.x.dtype), c)
    rec = UniPCTrajectory(x=state.x, v=v, x0pred=m, x_corrected=x_corr) if return_trajectory else None
    return new_state, rec

  final_state, traj = jax.lax.scan(body, init_state(x_init), (timesteps, coeffs))
  if return_trajectory:
    return final_state.x, traj
  return final_state.x
