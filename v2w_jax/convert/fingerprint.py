"""A short fingerprint of a weights tree, equal wherever and however the weights are held.

Why: a LoRA checkpoint keeps only the adapters; the base weights come from ``checkpoint.load_path``
again at resume (and at generation). The fingerprint recorded beside the adapters tells whether the
base given then is the one the adapters were trained on.

How: each leaf is cast to ``dtype`` (the bf16 the LoRA base is held in) and its bit patterns, as
unsigned integers, are summed twice over the whole array, plainly and weighted by an odd function of
the element's position, modulo 2^32. Integer sums do not depend on the order of summation, so the
result is the same on any mesh or sharding, on CPU or GPU, from numpy or from device arrays. The
per-leaf sums, with the leaf's path, shape and dtype, are hashed with SHA-256 on the host.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_MULTIPLIER = np.uint32(0x9E3779B1)  # odd: position weights 2·k·m + 1 stay odd, never 0
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_sums(x: jax.Array, dtype: Any) -> jax.Array:
  x = x.astype(dtype)
  bits = jax.lax.bitcast_convert_type(x, _UINT[jnp.dtype(dtype).itemsize]).astype(jnp.uint32)
  position = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):  # the flat (row-major) index, without reshaping a sharded array
    position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= x.shape[axis]
  weight = position * jnp.uint32(2 * int(_MULTIPLIER) % 2**32) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _sums_program(dtype: np.dtype, out_sharding: jax.sharding.Sharding | None):
  """One jitted program per (dtype, output sharding); jit caches its compilations per tree structure."""
  return jax.jit(lambda leaves: [_leaf_sums(x, dtype) for x in leaves], out_shardings=out_sharding)


def _paths(tree: Any) -> list[str]:
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)
          for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def fingerprint(tree: Any, dtype: Any = jnp.bfloat16) -> str:
  """Hex SHA-256 of the tree's paths, shapes and per-leaf integer sums of ``dtype`` bit patterns.

  ``tree`` may hold numpy arrays or (sharded) jax arrays; one jitted program sums every leaf.
  """
  dtype = jnp.dtype(dtype)
  leaves = jax.tree.leaves(tree)
  out_shardings = None
  first = getattr(leaves[0], "sharding", None) if leaves else None
  if isinstance(first, jax.sharding.NamedSharding):  # replicated scalars, readable on every process
    out_shardings = jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
  sums = _sums_program(dtype, out_shardings)(leaves)
  record = [[path, list(np.shape(x)), dtype.name, [int(v) for v in np.asarray(s)]]
            for path, x, s in zip(_paths(tree), leaves, sums)]
  return hashlib.sha256(json.dumps(record).encode()).hexdigest()
