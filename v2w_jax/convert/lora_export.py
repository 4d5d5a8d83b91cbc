"""Files for the reference from a LoRA run, and a reference LoRA ``.pt`` for this port.

* :func:`export_adapters`: the adapters alone in peft's layout with the ``net.`` prefix
  (``net.blocks.0.self_attn.q_proj.lora_A.default.weight`` [r, in], ``lora_B…`` [out, r]), float32,
  and a ``<file>.json`` sidecar (rank, alpha, targets, the base weights' fingerprint and path);
* :func:`export_merged`: the whole model with the adapters merged, W + (alpha/r)·B·A, as a
  ``*_ema_bf16.pt`` that the reference's plain (non-LoRA) inference loads;
* :func:`import_lora_pt`: a reference LoRA net's ``.pt`` (``….base_layer.weight`` + adapters) as a
  params folder holding base and adapters, for ``checkpoint.load_path`` or ``generate --checkpoint``.

The source of an export is a LoRA training checkpoint (its EMA adapters by default) or a LoRA params
folder. Merging needs the base weights: those the run recorded, or ``base``; a base whose fingerprint
differs from the recorded one is refused.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import lora as convert_lora
from v2w_jax.convert import lora_load, params_io, torch_pt
from v2w_jax.convert.fingerprint import fingerprint
from v2w_jax.convert.load import WeightsError
from v2w_jax.models import dit as dit_lib
from v2w_jax.models import lora as lora_lib
from v2w_jax.models.dit_config import DiTConfig


def _check_output(output: pathlib.Path, overwrite: bool) -> None:
  if output.exists() and not overwrite:
    raise FileExistsError(f"{output}: exists (pass --overwrite to replace it)")


def export_adapters(source: str | os.PathLike, output: str | os.PathLike, base_cfg: DiTConfig, *,
                    alpha: float | None = None, use_ema: bool = True, overwrite: bool = False) -> pathlib.Path:
  """Writes the adapters of ``source`` as a peft-layout ``.pt`` (float32) plus its JSON sidecar."""
  out = pathlib.Path(output)
  _check_output(out, overwrite)
  adapters = lora_load.read_adapters(source, base_cfg, alpha=alpha, use_ema=use_ema)
  tensors = convert_lora.adapters_to_torch(adapters.tree, base_cfg.replace(lora=adapters.spec))
  torch_pt.save(out, tensors)
  convert_lora.write_sidecar(out, adapters.spec, base_fingerprint=adapters.base_fingerprint,
                             base_dtype=adapters.base_dtype, base_path=adapters.base_path, source=adapters.source)
  return out


def base_for(adapters: lora_load.Adapters, base_cfg: DiTConfig, base: str | os.PathLike | None = None) -> Any:
  """The base weights (float32 numpy) the adapters belong to: ``base`` or the recorded path; checked
  against the recorded fingerprint."""
  path = str(base or adapters.base_path or "")
  if not path:
    raise WeightsError(f"{adapters.source}: the run recorded no base weights path (random base?); pass --base")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), dit_lib.abstract_params(base_cfg))
  weights, _ = lora_load.read_base_and_adapters(path, base_cfg, abstract)
  if adapters.base_fingerprint:
    got = fingerprint(weights, adapters.base_dtype or "bfloat16")
    if got != adapters.base_fingerprint:
      raise WeightsError(f"{path}: not the base weights the adapters of {adapters.source} were trained on "
                         f"(fingerprint {got[:16]}, recorded {adapters.base_fingerprint[:16]} for "
                         f"{adapters.base_path or '?'})")
  return weights


def export_merged(source: str | os.PathLike, output: str | os.PathLike, base_cfg: DiTConfig, *,
                  base: str | os.PathLike | None = None, alpha: float | None = None, use_ema: bool = True,
                  dtype: Any = None, overwrite: bool = False) -> pathlib.Path:
  """Writes base + (alpha/r)·B·A as a reference state dict (bf16 by default), one tensor at a time."""
  out = pathlib.Path(output)
  _check_output(out, overwrite)
  adapters = lora_load.read_adapters(source, base_cfg, alpha=alpha, use_ema=use_ema)
  weights = base_for(adapters, base_cfg, base)
  import ml_dtypes  # pylint: disable=import-outside-toplevel

  mapping = convert_lora.merged_to_torch(weights, adapters.tree, base_cfg.replace(lora=adapters.spec),
                                         dtype=np.dtype(dtype) if dtype is not None else np.dtype(ml_dtypes.bfloat16))
  torch_pt.save(out, mapping)
  return out


def import_lora_pt(source: str | os.PathLike, output: str | os.PathLike, base_cfg: DiTConfig, *,
                   alpha: float, dtype: Any = None, overwrite: bool = False, metadata: dict | None = None) -> pathlib.Path:
  """A reference LoRA ``.pt`` (base_layer weights + adapters) -> a params folder with both.

  Base weights are stored in ``dtype`` (default: the config's param dtype), adapters in float32; the
  metadata records rank, alpha and targets, so the folder loads as base + adapters.
  """
  src = pathlib.Path(source)
  state_dict = torch_pt.load(src)
  base_state, adapter_state = convert_lora.split_state_dict(state_dict)
  if not adapter_state:
    raise WeightsError(f"{src}: no LoRA adapters in this file")
  if not any(k.startswith(convert_lora.PREFIX + "x_embedder.") for k in base_state):
    raise WeightsError(f"{src}: adapters only, no base weights: use it as generate --lora or "
                       "--config.lora.init_path, with the base model as the weights")
  adapters = lora_load.read_adapters(src, base_cfg, alpha=alpha)
  base = convert_dit.torch_to_params(base_state, base_cfg, dtype=dtype)
  spec = adapters.spec
  return pathlib.Path(params_io.save_params(
      output, lora_lib.join_params(base, adapters.tree), overwrite=overwrite,
      metadata={**(metadata or {}), "kind": "dit", "source": str(src),
                "lora": {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)}}))
