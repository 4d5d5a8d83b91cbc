"""Params-only orbax checkpoints for converted weights.

Why: the converters turn a PyTorch checkpoint into a nested dict of arrays once; training and inference
then restore it straight into their (sharded) parameter layout without torch and without holding the full
model on one host. A checkpoint is an orbax composite directory with two items, written atomically
(orbax writes a temporary directory and renames it when complete)::

  <path>/params/    the array tree (orbax PyTree / OCDBT format)
  <path>/metadata/  small JSON dict (source file, kind, dtype, config, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from v2w_jax.user_errors import UserError

__all__ = ["ParamsMismatchError", "abstract_from_checkpoint", "fingerprint", "load_metadata", "load_params",
           "save_params"]

PARAMS_ITEM = "params"
METADATA_ITEM = "metadata"


class ParamsMismatchError(UserError, ValueError):
  """The checkpoint's tree does not match the requested abstract tree."""


def _epath(path: str | os.PathLike) -> epath.Path:
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(
          **{PARAMS_ITEM: ocp.PyTreeCheckpointHandler(), METADATA_ITEM: ocp.JsonCheckpointHandler()}))


def _key_name(entry: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def key_str(key_path: tuple[Any, ...]) -> str:
  """``('a', 'b', 0)`` key path -> ``"a/b/0"`` (readable in error messages)."""
  return "/".join(_key_name(e) for e in key_path)


def _to_saveable(path: epath.Path, params: Any) -> Any:
  """Plain nested dicts of numpy / jax arrays (Mappings become dicts; other leaves go through numpy)."""

  def convert(node: Any, where: str) -> Any:
    if isinstance(node, Mapping):
      out = {}
      for k, v in node.items():
        if not isinstance(k, str):
          raise TypeError(f"{path}: params keys must be str, got {k!r} under {where or '<root>'}")
        out[k] = convert(v, f"{where}/{k}" if where else k)
      return out
    if isinstance(node, jax.Array):
      return node
    arr = np.asarray(node)
    if arr.dtype == object:
      raise TypeError(f"{path}: params leaf {where or '<root>'} is not an array ({type(node).__name__})")
    return arr

  if not isinstance(params, Mapping):
    raise TypeError(f"{path}: params must be a nested dict of arrays, got {type(params).__name__}")
  return convert(params, "")


def fingerprint(params: Any) -> str:
  """A sha256 hex digest of a parameter tree: every leaf's path, dtype, shape and bytes, by path.

  Identical weights give the same digest whatever their source (a ``.pth``, a converted folder, a
  seeded random init) or placement; a jax.Array must be replicated (the local copy is hashed), as the
  VAE's are. Used to tell whether latents were encoded with the weights a run uses.
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for key_path, leaf in sorted(leaves, key=lambda kv: key_str(kv[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_replicated:
      raise ValueError(f"fingerprint: leaf {key_str(key_path)} is sharded; replicate it first")
    arr = np.ascontiguousarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f"{key_str(key_path)}|{arr.dtype.str}|{arr.shape}|".encode())
    digest.update(arr.reshape(-1).view(np.uint8).data)
  return digest.hexdigest()


def save_params(path: str | os.PathLike, params: Mapping[str, Any], *, metadata: dict | None = None,
                overwrite: bool = False) -> epath.Path:
  """Saves a nested dict of arrays (numpy or jax, possibly sharded) plus JSON metadata, atomically.

  In multi-process runs every process must call this with its (globally sharded) arrays.

  Args:
    path: checkpoint directory to create.
    params: nested dict ``name -> array``.
    metadata: JSON-serialisable dict (e.g. ``{"source": ..., "kind": "dit", "dtype": "bfloat16"}``).
    overwrite: replace an existing checkpoint at ``path`` instead of raising.

  Returns:
    The checkpoint directory.
  """
  directory = _epath(path)
  meta = dict(metadata or {})
  try:
    json.dumps(meta)
  except TypeError as e:
    raise TypeError(f"{directory}: metadata is not JSON-serialisable ({e})") from e
  tree = _to_saveable(directory, params)
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory}: checkpoint already exists (pass overwrite=True to replace it)")
  with _checkpointer() as ckptr:
    ckptr.save(directory,
               args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.PyTreeSave(tree),
                                          METADATA_ITEM: ocp.args.JsonSave(meta)}),
               force=overwrite)
  return directory


def load_metadata(path: str | os.PathLike) -> dict:
  """Returns the JSON metadata dict stored by :func:`save_params`."""
  directory = _check_checkpoint(_epath(path))
  with _checkpointer() as ckptr:
    restored = ckptr.restore(directory, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
  return dict(restored[METADATA_ITEM] or {})


def _check_checkpoint(directory: epath.Path) -> epath.Path:
  if not directory.exists():
    raise FileNotFoundError(f"{directory}: no such params checkpoint")
  if not (directory / PARAMS_ITEM).exists():
    raise ValueError(f"{directory}: not a params checkpoint (no '{PARAMS_ITEM}' item; written by save_params?)")
  return directory


def _stored_tree(directory: epath.Path) -> Any:
  """The checkpoint's tree of orbax ``ArrayMetadata`` (shape, dtype per leaf)."""
  with _checkpointer() as ckptr:
    meta = ckptr.metadata(directory).item_metadata[PARAMS_ITEM]
  if meta is None:
    raise ValueError(f"{directory}: cannot read the params tree metadata")
  return getattr(meta, "tree", meta)


def abstract_from_checkpoint(path: str | os.PathLike) -> Any:
  """Nested dict of ``jax.ShapeDtypeStruct`` (no sharding) describing the stored params."""
  stored = _stored_tree(_check_checkpoint(_epath(path)))
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), stored)


def _mismatches(directory: epath.Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
  missing = [k for k in wanted if k not in stored]
  unexpected = [k for k in stored if k not in wanted]
  shapes = [f"{k}: checkpoint {tuple(stored[k].shape)} vs requested {tuple(wanted[k].shape)}"
            for k in wanted if k in stored and tuple(stored[k].shape) != tuple(wanted[k].shape)]
  if not (missing or unexpected or shapes):
    return
  lines = [f"{directory}: params tree does not match the requested abstract params"]
  for title, items in (("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
                       ("shape mismatch", shapes)):
    if items:
      lines.append(f"  {title} ({len(items)}):")
      lines.extend(f"    {item}" for item in items)
  raise ParamsMismatchError("\n".join(lines))


def load_params(path: str | os.PathLike, abstract_params: Any = None) -> Any:
  """Restores params saved by :func:`save_params`.

  Args:
    path: checkpoint directory.
    abstract_params: optional pytree whose leaves have ``shape`` / ``dtype`` and optionally ``sharding``
      (``jax.ShapeDtypeStruct``, ``jax.Array`` or numpy arrays). Leaves with a sharding are restored as
      ``jax.Array`` directly in that sharding (each process reads only the shards it holds); leaves
      without one come back as numpy arrays. Every leaf is cast to the requested dtype. The tree must
      match the checkpoint exactly (same keys and shapes), else :class:`ParamsMismatchError` lists all
      differences.

  Returns:
    The params: a pytree with the structure of ``abstract_params``, or without it the stored nested dict
    of numpy arrays (stored dtypes).
  """
  directory = _check_checkpoint(_epath(path))
  stored = _stored_tree(directory)
  stored_flat = {key_str(kp): m for kp, m in jax.tree_util.tree_flatten_with_path(stored)[0]}

  if abstract_params is None:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
  else:
    abstract_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    wanted = {key_str(kp): leaf for kp, leaf in abstract_leaves}
    if len(wanted) != len(abstract_leaves):
      raise ValueError(f"{directory}: abstract params have colliding key paths")
    _mismatches(directory, stored_flat, wanted)

    def args_for(key_path: tuple[Any, ...], _: Any) -> ocp.RestoreArgs:
      leaf = wanted[key_str(key_path)]
      dtype = np.dtype(leaf.dtype)
      sharding = getattr(leaf, "sharding", None)
      if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
      return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding, global_shape=tuple(leaf.shape),
                                  dtype=dtype)

    restore_args = jax.tree_util.tree_map_with_path(args_for, stored)

  with _checkpointer() as ckptr:
    restored = ckptr.restore(
        directory, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.PyTreeRestore(restore_args=restore_args)}))
  tree = restored[PARAMS_ITEM]
  if abstract_params is None:
    return tree
  by_key = {key_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return jax.tree_util.tree_unflatten(treedef, [by_key[key_str(kp)] for kp, _ in abstract_leaves])
