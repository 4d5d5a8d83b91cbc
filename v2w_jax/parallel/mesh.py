"""Device mesh from ``config.mesh``: axes (data, fsdp, context), −1 = the rest of the devices.

``make_mesh(config.mesh)`` resolves the sizes against the device count and builds a
``jax.sharding.Mesh`` with ``Auto`` axis types (shardings are propagated by the compiler from the
in/out shardings and the logical constraints). Nothing here knows about the model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from v2w_jax.parallel.rules import MESH_AXES


def _get(mesh_config: Any, name: str) -> int:
  if isinstance(mesh_config, Mapping):
    return int(mesh_config.get(name, 1))
  return int(getattr(mesh_config, name, 1))


def resolve_mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, context) with at most one −1 replaced by what is left of ``num_devices``.

  Raises:
    ValueError: a size is 0 or < −1, more than one −1, or the sizes do not multiply to the device count.
  """
  sizes = [_get(mesh_config, a) for a in MESH_AXES]
  desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {desc}")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {desc}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: {desc}: the fixed sizes multiply to {fixed}, which does not divide "
                       f"the {num_devices} available devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"config.mesh: {desc} multiply to {fixed} but {num_devices} devices are available "
                     "(use -1 on one axis for 'the rest')")
  return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, context) mesh over ``devices`` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
