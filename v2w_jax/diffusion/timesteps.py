"""Sigma / timestep grids of the inference samplers (host-side numpy, built once per run).

Grids are computed in float64 exactly as the reference does and rounded once, so the integer timesteps
handed to the net and the float32 solver sigmas are bit-identical to the PyTorch reference
(``training_spec.md`` §11, fixtures ``samplers/README.md`` §1 and §3).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# The reference builds its FlowUniPC scheduler with shift 1, so the top of its sigma grid is
# float32(0.999) = 0.9990000128746033 (not 0.999 exactly).
RF_SIGMA_MAX = float(np.float32(0.999))
# Karras grid of the EDM family the rectified-flow checkpoint descends from (sigma_EDM 200 -> 0.01).
RF_KARRAS_SIGMA_MAX = 200.0
RF_KARRAS_SIGMA_MIN = 0.01
KARRAS_RHO = 7.0


class RFSchedule(NamedTuple):
  """A rectified-flow UniPC schedule.

  Attributes:
    timesteps: (K,) int64, trunc(1000 sigma_k): what the net receives (it multiplies by 0.001).
    sigmas: (K+1,) float32, the solver sigmas with a final 0 appended.
  """

  timesteps: np.ndarray
  sigmas: np.ndarray

  @property
  def num_evaluations(self) -> int:
    """Model evaluations per CFG branch (N, or N+1 for the Karras grid)."""
    return int(self.timesteps.shape[0])


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
  """Karras et al. (2022) grid: (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

  Returns (num_steps + 1,) float64 values from sigma_max down to sigma_min.
  """
  if num_steps < 1:
    raise ValueError(f"karras_sigmas: num_steps must be >= 1, got {num_steps}")
  if not 0.0 < sigma_min < sigma_max:
    raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
  ramp = np.arange(num_steps + 1, dtype=np.float64) / num_steps  # i / N, the reference's op order
  max_inv_rho = sigma_max ** (1.0 / rho)
  min_inv_rho = sigma_min ** (1.0 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
  """Rectified-flow time shift s u / (1 + (s - 1) u) (multiplies the odds sigma / (1 - sigma) by s)."""
  return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def rf_unipc_schedule(
    num_steps: int,
    shift: float = 5.0,
    *,
    use_karras_sigmas: bool = False,
    sigma_max: float = RF_SIGMA_MAX,
    karras_sigma_max: float = RF_KARRAS_SIGMA_MAX,
    karras_sigma_min: float = RF_KARRAS_SIGMA_MIN,
    rho: float = KARRAS_RHO,
) -> RFSchedule:
  """The reference FlowUniPC ``set_timesteps`` grid.

  Default: u = linspace(sigma_max, 0, N+1)[:-1], sigma = shift(u), N evaluations.
  Karras (``use_kerras_sigma_at_inference``; shift ignored): varsigma = Karras(200 -> 0.01, N intervals, rho),
  sigma = varsigma / (1 + varsigma), N+1 evaluations. In both cases timesteps = int64(1000 sigma)
  (truncation in float64) and sigmas = float32([sigma..., 0]).

  Note: the reference locates the first timestep by value and breaks when it is repeated (its quirk 7);
  this port always starts at index 0.
  """
  if num_steps < 1:
    raise ValueError(f"rf_unipc_schedule: num_steps must be >= 1, got {num_steps}")
  if use_karras_sigmas:
    edm_sigmas = karras_sigmas(karras_sigma_max, karras_sigma_min, num_steps, rho)
    sigmas = edm_sigmas / (1.0 + edm_sigmas)
  else:
    if shift <= 0:
      raise ValueError(f"rf_unipc_schedule: shift must be > 0, got {shift}")
    sigmas = np.linspace(sigma_max, 0.0, num_steps + 1, dtype=np.float64)[:-1]
    sigmas = shift_sigmas(sigmas, shift)
  timesteps = (sigmas * 1000.0).astype(np.int64)
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  return RFSchedule(timesteps=timesteps, sigmas=sigmas)


def edm_karras_sigmas(num_steps: int, sigma_max: float = 80.0, sigma_min: float = 0.0002,
                      rho: float = KARRAS_RHO) -> np.ndarray:
  """The EDM sampler's grid: (num_steps + 1,) float64 Karras sigmas from sigma_max to sigma_min."""
  return karras_sigmas(sigma_max, sigma_min, num_steps, rho)
