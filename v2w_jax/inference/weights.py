"""DiT and VAE weights for inference, from whatever form they are in.

``load_dit_params(path, cfg)`` accepts:

(a) a training checkpoint written by ``training/checkpoint.py`` — the job folder, its ``checkpoints``
    folder (latest step), a step folder ``checkpoints/<step>`` or its ``state`` item. Only the EMA
    subtree (``ema_params``) of the saved ``TrainState`` is read (``use_ema=False``: ``params``);
(b) a params-only orbax folder written by ``convert/params_io.save_params`` (``<path>/params``);
(c) a reference PyTorch ``.pt`` (``*_ema_bf16.pt``), converted on the fly with the torch-free reader.

``load_vae_params(path, cfg)`` accepts a ``Wan2.1_VAE.pth`` or a params-only orbax folder.
Everything comes back as a nested dict of numpy arrays in the model's parameter dtype; the tree is
checked against the model (missing / unexpected / mis-shaped leaves are all listed in one error).
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import params_io
from v2w_jax.convert import torch_pt
from v2w_jax.convert import vae as convert_vae
from v2w_jax.models import dit as dit_lib
from v2w_jax.models import vae as vae_lib
from v2w_jax.models.dit_config import DiTConfig

_log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
STATE_ITEM = "state"


class WeightsError(ValueError):
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
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from etils import epath  # pylint: disable=import-outside-toplevel

  # The handler reads an item folder of a CheckpointManager step directly (a Checkpointer would
  # look for a step-level _CHECKPOINT_METADATA file that item folders do not have).
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir).absolute())
  return getattr(meta, "tree", meta)


def load_train_state_params(state_dir: str | os.PathLike, abstract: Any, *, use_ema: bool = True) -> Any:
  """Restores only the ``ema_params`` (or ``params``) subtree of a saved TrainState, cast to ``abstract``.

  ``abstract`` leaves give shape and dtype, and optionally ``sharding`` (then restored as sharded
  ``jax.Array``; else numpy). Nothing else of the state (optimizer moments) is read.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

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


def load_dit_params(path: str | os.PathLike, cfg: DiTConfig, *, use_ema: bool = True) -> Any:
  """DiT params (nested dict of numpy arrays in ``cfg.param_dtype``) from any supported checkpoint."""
  p = pathlib.Path(path)
  kind = checkpoint_kind(p)
  abstract = dit_lib.abstract_params(cfg)
  _log.info("loading DiT weights (%s) from %s", kind, p)
  if kind == "torch":
    try:
      state_dict = torch_pt.load(p)
    except torch_pt.TorchCheckpointError as e:
      raise WeightsError(str(e)) from e
    try:
      return convert_dit.torch_to_params(state_dict, cfg)
    except ValueError as e:
      raise WeightsError(f"{p}: {e}") from e
  if kind == "params":
    try:
      return params_io.load_params(p, abstract)
    except params_io.ParamsMismatchError as e:
      raise WeightsError(str(e)) from e
  return load_train_state_params(resolve_train_state_dir(p), abstract, use_ema=use_ema)


def load_vae_params(path: str | os.PathLike, cfg: vae_lib.VAEConfig) -> Any:
  """VAE params (fp32 numpy arrays) from a ``Wan2.1_VAE.pth`` or a params-only orbax folder."""
  p = pathlib.Path(path)
  kind = checkpoint_kind(p)
  _log.info("loading VAE weights (%s) from %s", kind, p)
  if kind == "torch":
    try:
      state_dict = torch_pt.load(p)
      return convert_vae.torch_to_params(state_dict, cfg)
    except (torch_pt.TorchCheckpointError, ValueError) as e:
      raise WeightsError(f"{p}: {e}") from e
  if kind == "params":
    abstract = jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, np.float32), vae_lib.abstract_params(cfg))
    try:
      return params_io.load_params(p, abstract)
    except params_io.ParamsMismatchError as e:
      raise WeightsError(str(e)) from e
  raise WeightsError(f"{p}: a training checkpoint holds no VAE weights; pass the Wan2.1_VAE.pth or a "
                     "converted VAE params folder")


def random_params_like(abstract: Any, seed: int = 0, *, stacked: tuple[str, ...] = ("blocks",)) -> Any:
  """Random numpy params shaped like ``abstract`` without compiling the model's init (fast on CPU).

  ``kernel`` leaves ~ N(0, 1/fan_in) (fan_in = product of all but the last axis, not counting the leading
  layer axis of subtrees named in ``stacked``), ``bias`` zeros, ``scale`` ones, anything else N(0, 0.02^2).
  For tests, smoke runs and benchmarks only: the outputs are noise.
  """
  rng = np.random.default_rng(seed)

  def fill(kp, leaf):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in kp]
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    if names[-1] == "bias":
      return np.zeros(shape, dtype)
    if names[-1] == "scale":
      return np.ones(shape, dtype)
    if names[-1] == "kernel" and len(shape) >= 2:
      dims = shape[1:-1] if names[0] in stacked else shape[:-1]
      std = 1.0 / np.sqrt(max(1, int(np.prod(dims))))
    else:
      std = 0.02
    arr = rng.standard_normal(shape, dtype=np.float32)
    arr *= np.float32(std)
    return arr.astype(dtype, copy=False)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_dit_params(cfg: DiTConfig, seed: int = 0) -> Any:
  """Random DiT params in ``cfg.param_dtype`` (tests, smoke runs and benchmarks only)."""
  return random_params_like(dit_lib.abstract_params(cfg), seed, stacked=("blocks",) if cfg.scan_blocks else ())


def random_vae_params(cfg: vae_lib.VAEConfig, seed: int = 0) -> Any:
  """Random fp32 VAE params (tests, smoke runs and benchmarks only)."""
  return random_params_like(vae_lib.abstract_params(cfg), seed, stacked=())
