"""LoRA weights from any form they come in: adapters alone, or base weights with adapters.

Sources (each names itself in errors):

* a LoRA training checkpoint of this trainer (the job folder, ``checkpoints``, a step, or its
  ``state``): the adapters (EMA by default) and, from the step's metadata, rank, alpha, targets, the
  base weights' fingerprint and path. It holds no base weights;
* a reference ``.pt`` (torch zip): peft adapter tensors, alone (an adapters export, with its
  ``<file>.json`` sidecar if written here) or inside a whole LoRA net (``….base_layer.weight`` +
  adapters); a plain ``.pt`` has base weights only;
* a params folder (``tools/convert_torch_ckpt.py``): with adapters when its metadata has ``lora``.

Alpha is not part of a peft state dict: it comes from the sidecar or metadata, else from the
caller (the config's ``lora.alpha``).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import numpy as np

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import load as load_lib
from v2w_jax.convert import lora as convert_lora
from v2w_jax.convert import params_io, torch_pt
from v2w_jax.models import lora as lora_lib
from v2w_jax.models.dit_config import DiTConfig


@dataclasses.dataclass
class Adapters:
  """One set of adapters (Flax layout, numpy float32) and what is known about it."""

  tree: dict
  spec: lora_lib.LoRASpec
  source: str
  base_fingerprint: str | None = None
  base_dtype: str | None = None
  base_path: str | None = None

  @property
  def scale(self) -> float:
    return self.spec.scale


def lora_train_meta(path: str | os.PathLike) -> dict | None:
  """``meta['lora']`` of the training checkpoint at ``path``, or None (not one, or not a LoRA run)."""
  state_dir = load_lib.resolve_train_state_dir(path)
  if state_dir is None:
    return None
  return load_lib.train_checkpoint_meta(state_dir).get("lora")


def _stored_adapters_abstract(tree: Any) -> Any:
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.float32), tree)


def _spec_from_meta(meta: dict, where: str) -> lora_lib.LoRASpec:
  try:
    return lora_lib.LoRASpec(int(meta["rank"]), float(meta["alpha"]), tuple(meta["targets"]))
  except (KeyError, TypeError, ValueError) as e:
    raise load_lib.WeightsError(f"{where}: incomplete LoRA metadata {meta} ({e})") from e


def _from_train_checkpoint(path: pathlib.Path, meta: dict, use_ema: bool) -> Adapters:
  state_dir = load_lib.resolve_train_state_dir(path)
  stored = load_lib._orbax_pytree_metadata(state_dir)  # pylint: disable=protected-access
  key = "ema_params" if use_ema and stored.get("ema_params") else "params"
  abstract = _stored_adapters_abstract(stored[key])
  tree = load_lib.load_train_state_params(state_dir, abstract, use_ema=use_ema)
  return Adapters(tree, _spec_from_meta(meta, str(path)), f"{state_dir} [{key}]", meta.get("base_fingerprint"),
                  meta.get("base_dtype"), meta.get("base_path"))


def _from_torch(path: pathlib.Path, state_dict: Any, base_cfg: DiTConfig, alpha: float | None) -> Adapters:
  _, adapter_state = convert_lora.split_state_dict(state_dict)
  if not adapter_state:
    raise load_lib.WeightsError(f"{path}: no LoRA adapters in this file (keys '*.lora_A.default.weight')")
  sidecar = convert_lora.read_sidecar(path) or {}
  alpha = sidecar.get("lora_alpha", alpha)
  if alpha is None:
    raise load_lib.WeightsError(f"{path}: LoRA alpha unknown (no {path.name}{convert_lora.SIDECAR_SUFFIX}); "
                                "pass it (config lora.alpha)")
  alpha = float(alpha)
  try:
    spec = convert_lora.infer_spec(adapter_state, alpha)
    tree = convert_lora.torch_to_adapters(adapter_state, base_cfg.replace(lora=spec))
  except ValueError as e:
    raise load_lib.WeightsError(f"{path}: {e}") from e
  if "r" in sidecar and int(sidecar["r"]) != spec.rank:
    raise load_lib.WeightsError(f"{path}: rank {spec.rank} in the tensors, {sidecar['r']} in its sidecar")
  return Adapters(tree, spec, str(path), sidecar.get("base_fingerprint"), sidecar.get("base_dtype"),
                  sidecar.get("base_path"))


def _params_folder_lora(path: pathlib.Path) -> dict | None:
  return params_io.load_metadata(path).get("lora")


def read_adapters(path: str | os.PathLike, base_cfg: DiTConfig, *, alpha: float | None = None,
                  use_ema: bool = True) -> Adapters:
  """The adapters stored at ``path`` (any source above). ``alpha``: for files that do not record it."""
  p = pathlib.Path(path)
  kind = load_lib.checkpoint_kind(p)
  if kind == "train":
    meta = lora_train_meta(p)
    if meta is None:
      raise load_lib.WeightsError(f"{p}: a training checkpoint of a full fine-tune, not of a LoRA run "
                                  "(no adapters; use it as the base weights)")
    return _from_train_checkpoint(p, meta, use_ema)
  if kind == "torch":
    return _from_torch(p, torch_pt.load(p), base_cfg, alpha)
  meta = _params_folder_lora(p)
  if meta is None:
    raise load_lib.WeightsError(f"{p}: a params folder without LoRA adapters (its metadata has no 'lora')")
  return _from_params_folder(p, meta, params_io.load_params(p))[1]


def _from_params_folder(path: pathlib.Path, meta: dict, stored: Any) -> tuple[Any, Adapters]:
  base, adapters = lora_lib.split_params(stored)
  adapters = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
  return base, Adapters(adapters, _spec_from_meta(meta, str(path)), str(path), meta.get("base_fingerprint"),
                        meta.get("base_dtype"), meta.get("base_path"))


def read_base_and_adapters(path: str | os.PathLike, base_cfg: DiTConfig, abstract_base: Any, *,
                           alpha: float | None = None, use_ema: bool = True) -> tuple[Any, Adapters | None]:
  """Base weights (in the dtypes / shardings of ``abstract_base``) and the adapters stored with them.

  A plain checkpoint gives (base, None); a reference LoRA ``.pt`` or a LoRA params folder gives both.
  A LoRA training checkpoint holds no base weights: WeightsError saying what to pass instead.
  """
  p = pathlib.Path(path)
  kind = load_lib.checkpoint_kind(p)
  if kind == "train" and lora_train_meta(p) is not None:
    raise load_lib.WeightsError(
        f"{p}: a LoRA training checkpoint holds only adapters, not base weights. Give the base model "
        "(the run's checkpoint.load_path) as the weights and this checkpoint as the adapters "
        "(--config.lora.init_path to continue training from them, --lora to generate with them), or "
        "export a merged model with tools/convert_torch_ckpt.py --lora=merged")
  adapters = None
  if kind == "torch":
    state_dict = torch_pt.load(p)
    if convert_lora.is_lora_state_dict(state_dict.keys()):
      adapters = _from_torch(p, state_dict, base_cfg, alpha)
  elif kind == "params" and _params_folder_lora(p) is not None:
    stored_base, adapters = _from_params_folder(p, _params_folder_lora(p), params_io.load_params(p))
    load_lib._check_tree(f"DiT checkpoint {p}", stored_base, abstract_base)  # pylint: disable=protected-access
    return load_lib._place(stored_base, abstract_base), adapters  # pylint: disable=protected-access
  base = load_lib.load_weights(
      p, abstract_base,
      lambda sd: convert_dit.torch_to_params(convert_lora.split_state_dict(sd)[0], base_cfg), what="DiT",
      use_ema=use_ema)
  return base, adapters
