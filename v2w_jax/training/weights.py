"""Loading pretrained weights into sharded parameters: DiT and VAE, from ``.pt`` or orbax.

``load_path`` may be a reference checkpoint (``*_ema_bf16.pt``, ``Wan2.1_VAE.pth``), converted on
the fly with the torch-free reader, or a params-only orbax folder written by
``tools/convert_torch_ckpt.py``. Only model weights are loaded, as the reference does: the optimizer,
schedule and step start fresh. Every leaf is placed directly into its target sharding, so each
device receives only its own shard.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping

import jax
import numpy as np

from v2w_jax.convert import params_io, torch_pt
from v2w_jax.inference.weights import checkpoint_kind


def place(np_params: Any, shardings: Any, dtypes: Any) -> Any:
  """Host numpy tree -> jax.Arrays in `shardings`, cast to `dtypes` (each device gets its shard)."""

  def one(x, sharding, dtype):
    x = np.asarray(x).astype(dtype, copy=False)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(one, np_params, shardings, dtypes)


def load_params(
    path: str | pathlib.Path,
    abstract: Any,
    torch_to_params: Callable[[Mapping[str, Any]], Any],
    *,
    what: str,
) -> Any:
  """Loads `path` into the shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs).

  Args:
    path: a reference ``.pt``/``.pth`` file or a params-only orbax folder.
    abstract: target tree of ``jax.ShapeDtypeStruct`` with ``.sharding``.
    torch_to_params: maps a reference state dict to the port's numpy params tree (strict).
    what: "DiT" or "VAE", for error messages.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
  if checkpoint_kind(path) == "torch":  # the one place that tells checkpoint formats apart
    try:
      np_params = torch_to_params(torch_pt.load(path))
    except ValueError as e:  # strict key/shape report: say which file it is about
      raise ValueError(f"{what} checkpoint {path} does not fit the configured model: {e}") from e
    want = jax.tree.map(lambda a: a.shape, abstract)
    got = jax.tree.map(lambda a: tuple(np.shape(a)), np_params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise ValueError(f"{what} checkpoint {path} does not fit the configured model "
                       f"(check config.model / config.vae sizes)")
    return place(np_params, jax.tree.map(lambda a: a.sharding, abstract),
                 jax.tree.map(lambda a: a.dtype, abstract))
  return params_io.load_params(path, abstract)
