"""Shardings: logical axis specs → ``NamedSharding`` via the rules, batch and replicated shardings,
train-state shardings and born-sharded creation.

* :func:`logical_to_mesh_sharding` maps a tree of logical ``PartitionSpec`` (names from ``rules.py``)
  to ``NamedSharding`` with ``config.mesh.rules``; with ``shapes`` given, a dimension that a mesh axis
  does not divide is replicated instead (so a tiny model still runs on a big mesh).
* :func:`batch_sharding`: the leading (batch) dim over ('data', 'fsdp'), the rest replicated.
* :func:`train_state_shardings`: parameter shardings for params and EMA, the matching shardings for
  optimizer moments (via ``optax.tree_map_params``), replicated scalars.
* :func:`create_sharded`: ``jax.jit(init_fn, out_shardings=...)`` so the state is born sharded and
  never materialised whole on one device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from v2w_jax.parallel.rules import DEFAULT_RULES

BATCH_AXES = ("data", "fsdp")


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int] | None, mesh: jax.sharding.Mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (or that the array does not have)."""
  if shape is None:
    return spec
  out = []
  for i, axes in enumerate(tuple(spec)):
    if axes is None or i >= len(shape):
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in names]))
    out.append(axes if shape[i] % size == 0 else None)
  return PartitionSpec(*out)


def logical_to_mesh_sharding(
    logical_spec_tree: Any,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]] | None = None,
    shapes: Any | None = None,
) -> Any:
  """Logical ``PartitionSpec`` tree → ``NamedSharding`` tree (same structure).

  Args:
    logical_spec_tree: e.g. ``nn.get_partition_spec(abstract_boxed_params)``.
    mesh: the device mesh.
    rules: (logical name, mesh axis | tuple | None) pairs; default ``rules.DEFAULT_RULES``.
    shapes: optional tree of the same structure with ``.shape`` leaves (arrays or ShapeDtypeStructs);
      mesh axes that do not divide a dimension are then dropped for that dimension.
  """
  rules = tuple(tuple(r) for r in (DEFAULT_RULES if rules is None else rules))
  mesh_specs = nn.logical_to_mesh(logical_spec_tree, rules)
  if shapes is None:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs, is_leaf=_is_spec)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit_spec(s, tuple(x.shape), mesh)),
                      mesh_specs, shapes, is_leaf=_is_spec)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """First dim over ('data', 'fsdp'); the other dims replicated. Applies to every batch leaf."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shardings_for(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Per-leaf batch shardings; leaves whose first dim the batch axes do not divide are replicated."""
  size = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

  def one(x):
    shape = np.shape(x)
    if len(shape) == 0 or shape[0] % size:
      return replicated(mesh)
    return batch_sharding(mesh)

  return jax.tree.map(one, batch)


def param_shardings_from_boxed(abstract_boxed: Any, mesh: jax.sharding.Mesh, rules=None) -> Any:
  """Shardings for the *unboxed* tree of a boxed (``nn.Partitioned``) abstract parameter tree."""
  specs = nn.get_partition_spec(abstract_boxed)
  shapes = nn.meta.unbox(abstract_boxed)
  return logical_to_mesh_sharding(specs, mesh, rules, shapes=shapes)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                        mesh: jax.sharding.Mesh) -> Any:
  """Optimizer-state shardings: per-parameter leaves follow their parameter, the rest replicated."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  rep = replicated(mesh)
  return optax.tree_map_params(
      tx,
      lambda _, s: s,
      abstract_state,
      param_shardings,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, NamedSharding),
  )


def train_state_shardings(abstract_state: Any, param_shardings: Any, tx: optax.GradientTransformation,
                          mesh: jax.sharding.Mesh, ema_memory_kind: str | None = None) -> Any:
  """Shardings of a ``TrainState``: step replicated, params and EMA like ``param_shardings``, optimizer
  moments like their parameters. ``ema_memory_kind`` (e.g. 'pinned_host') places the EMA there."""
  ema = param_shardings
  if ema_memory_kind is not None:
    ema = jax.tree.map(lambda s: s.with_memory_kind(ema_memory_kind), param_shardings,
                       is_leaf=lambda x: isinstance(x, NamedSharding))
  return abstract_state.replace(
      step=replicated(mesh),
      params=param_shardings,
      opt_state=opt_state_shardings(tx, abstract_state.params, param_shardings, mesh),
      ema_params=None if abstract_state.ema_params is None else ema,
  )


def create_sharded(init_fn: Callable[..., Any], out_shardings: Any, *args: Any) -> Any:
  """Runs ``init_fn(*args)`` under ``jax.jit`` with ``out_shardings``: born-sharded outputs."""
  return jax.jit(init_fn, out_shardings=out_shardings)(*args)
