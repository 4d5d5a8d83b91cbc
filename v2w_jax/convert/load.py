"""Model weights from any form they come in, loaded into a given abstract tree.

``load_weights(path, abstract, torch_to_params, what=...)`` is the one loader the trainer
(``checkpoint.load_path``, ``vae.checkpoint_path``) and inference (``generate``) share. ``path`` may be

(a) a reference PyTorch checkpoint (``*_ema_bf16.pt``, ``Wan2.1_VAE.pth``), read without torch and
    mapped to the port's tree by ``torch_to_params``;
(b) a params-only orbax folder written by ``tools/convert_torch_ckpt.py`` (``<path>/params``);
(c) a training checkpoint of this trainer (the job folder, its ``checkpoints`` folder = latest step,
    a step folder or its ``state`` item): only the EMA subtree (or ``params``) is read.

``abstract`` gives every leaf's shape and dtype and, optionally, its sharding: leaves with a sharding
come back as ``jax.Array`` placed straight into it (each device receives only its shards), the others
as numpy arrays. A tree that does not fit the model fails with :class:`WeightsError`, naming the path
and listing every missing, unexpected and mis-shaped leaf.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from v2w_jax.convert import infer
from v2w_jax.convert import params_io
from v2w_jax.convert import torch_pt
from v2w_jax.user_errors import UserError

_log = logging.getLogger(__name__)


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
STATE_ITEM = "state"
META_ITEM = "meta"


class WeightsError(UserError, ValueError):
  """A checkpoint cannot be used for this model; the message names the path and the problem."""


def _is_orbax_tree_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and ((path / "_METADATA").exists() or (path / "manifest.ocdbt").exists()
                            or (path / "_sharding").exists())


def _step_dirs(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit() and (p / STATE_ITEM).is_dir()),
                key=lambda p: int(p.name))


def resolve_train_state_dir(path: str | os.PathLike) -> pathlib.Path | None:
  """The ``state`` item folder of a training checkpoint at ``path``, or None if it is not one.

  ``path`` may be the job folder, ``<job>/checkpoints`` (latest step), ``<job>/checkpoints/<step>`` or
  ``<job>/checkpoints/<step>/state``.
  """
  p = pathlib.Path(path)
  if not p.is_dir():
    return None
  if p.name == STATE_ITEM and _is_orbax_tree_dir(p):
    return p
  if (p / STATE_ITEM).is_dir():
    return p / STATE_ITEM
  for folder in (p, p / "checkpoints"):
    if folder.is_dir():
      steps = _step_dirs(folder)
      if steps:
        return steps[-1] / STATE_ITEM
  return None


def checkpoint_kind(path: str | os.PathLike) -> str:
  """'torch' (a .pt/.pth file), 'params' (params_io folder) or 'train' (training checkpoint)."""
  p = pathlib.Path(path)
  if not p.exists():
    raise WeightsError(f"{p}: checkpoint does not exist")
  if p.is_file():
    if p.suffix.lower() in TORCH_SUFFIXES or torch_pt.zipfile.is_zipfile(p):
      return "torch"
    raise WeightsError(f"{p}: a file that is not a PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)})")
  if (p / params_io.PARAMS_ITEM).is_dir():
    return "params"
  if resolve_train_state_dir(p) is not None:
    return "train"
  raise WeightsError(f"{p}: not a checkpoint: expected a .pt/.pth file, a params folder (with 'params/', "
                     "from tools/convert_torch_ckpt.py) or a training checkpoint (<job>/checkpoints/<step>/state)")


def train_checkpoint_meta(state_dir: str | os.PathLike) -> dict:
  """The ``meta`` item saved beside a training state (step, seed, the run's config); {} if absent."""
  meta_dir = pathlib.Path(state_dir).absolute().parent / META_ITEM
  if not meta_dir.is_dir():
    return {}
  try:
    meta = ocp.JsonCheckpointHandler().restore(epath.Path(meta_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"{meta_dir}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e
  return dict(meta or {})


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): v
          for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_tree(where: str, got: Any, want: Any) -> None:
  g, w = _flat(got), _flat(want)
  missing = sorted(k for k in w if k not in g)
  unexpected = sorted(k for k in g if k not in w)
  shapes = sorted(f"{k}: checkpoint {tuple(g[k].shape)} vs model {tuple(w[k].shape)}"
                  for k in w if k in g and tuple(g[k].shape) != tuple(w[k].shape))
  if missing or unexpected or shapes:
    lines = [f"{where}: parameters do not match the model config ({len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped)"]
    lines += [f"  missing: {k}" for k in missing[:50]]
    lines += [f"  unexpected: {k}" for k in unexpected[:50]]
    lines += [f"  shape: {s}" for s in shapes[:50]]
    raise WeightsError("\n".join(lines))


def _orbax_pytree_metadata(state_dir: pathlib.Path) -> Any:
  # The handler reads an item folder of a CheckpointManager step directly (a Checkpointer would
  # look for a step-level _CHECKPOINT_METADATA file that item folders do not have).
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir).absolute())
  return getattr(meta, "tree", meta)


def load_train_state_params(state_dir: str | os.PathLike, abstract: Any, *, use_ema: bool = True) -> Any:
  """Restores only the ``ema_params`` (or ``params``) subtree of a saved TrainState, cast to ``abstract``.

  ``abstract`` leaves give shape and dtype, and optionally ``sharding`` (then restored as sharded
  ``jax.Array``; else numpy). Nothing else of the state (optimizer moments) is read.
  """
  state_dir = pathlib.Path(state_dir).absolute()  # orbax's OCDBT reader needs absolute paths
  try:
    tree = _orbax_pytree_metadata(state_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"{state_dir}: cannot read the training-state metadata ({type(e).__name__}: {e})") from e
  if not isinstance(tree, dict) or ("params" not in tree and "ema_params" not in tree):
    keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise WeightsError(f"{state_dir}: not a TrainState checkpoint (top-level keys {keys}; expected "
                       "'params' / 'ema_params')")
  key = "ema_params" if use_ema else "params"
  if use_ema and not tree.get("ema_params"):
    _log.warning("%s: the checkpoint has no EMA parameters (ema.enabled was False); using 'params'", state_dir)
    key = "params"
  stored = tree[key]
  _check_tree(f"{state_dir} [{key}]", stored, abstract)

  def args_for(leaf):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(leaf.dtype))
    return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding, global_shape=tuple(leaf.shape),
                                dtype=np.dtype(leaf.dtype))

  item = {key: jax.tree.map(lambda l: np.zeros((0,), np.dtype(l.dtype)), abstract)}
  restore_args = {key: jax.tree.map(args_for, abstract)}
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  out = restored[key]
  _check_tree(f"{state_dir} [{key}] (restored)", out, abstract)
  return out


def _place(np_params: Any, abstract: Any) -> Any:
  """Numpy tree -> the dtypes of `abstract`, as jax.Arrays in its shardings where it has them."""

  def one(x, leaf):
    x = np.asarray(x).astype(np.dtype(leaf.dtype), copy=False)
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      return x
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(one, np_params, abstract)


def load_weights(path: str | os.PathLike, abstract: Any,
                 torch_to_params: Callable[[Mapping[str, Any]], Any], *, what: str,
                 use_ema: bool = True, training_checkpoints: bool = True) -> Any:
  """Loads the weights at `path` (any supported form) into the shapes/dtypes/shardings of `abstract`.

  Args:
    path: a reference ``.pt``/``.pth``, a params folder, or a training checkpoint.
    abstract: the target tree (``jax.ShapeDtypeStruct`` or arrays; ``sharding`` optional).
    torch_to_params: maps a reference state dict to the port's numpy params tree.
    what: "DiT" or "VAE", for messages.
    use_ema: from a training checkpoint, read ``ema_params`` (else ``params``).
    training_checkpoints: whether a training checkpoint can hold these weights (not the VAE's).
  """
  p = pathlib.Path(path)
  kind = checkpoint_kind(p)
  _log.info("loading %s weights (%s) from %s", what, kind, p)
  if kind == "torch":
    state_dict = torch_pt.load(p)
    found = infer.detect_kind(state_dict)
    if found is not None and infer.KIND_NAMES[found] != what:
      raise WeightsError(f"{p}: this looks like a {infer.KIND_NAMES[found]} checkpoint, not a {what} one: "
                         f"give it as the {infer.KIND_NAMES[found]}'s weights")
    try:
      np_params = torch_to_params(state_dict)
    except (torch_pt.TorchCheckpointError, ValueError) as e:
      raise WeightsError(f"{what} checkpoint {p} does not fit the configured model: {e}") from e
    _check_tree(f"{what} checkpoint {p}", np_params, abstract)
    return _place(np_params, abstract)
  if kind == "params":
    try:
      return params_io.load_params(p, abstract)
    except params_io.ParamsMismatchError as e:
      raise WeightsError(f"{what} checkpoint: {e}") from e
  if not training_checkpoints:
    raise WeightsError(f"{p}: a training checkpoint holds no {what} weights; pass the reference file or a "
                       f"converted {what} params folder")
  return load_train_state_params(resolve_train_state_dir(p), abstract, use_ema=use_ema)
