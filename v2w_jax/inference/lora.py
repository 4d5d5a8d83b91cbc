"""Generation with LoRA adapters: several adapters, each with its scale, merged once into the weights.

``--lora=PATH[:SCALE][,PATH[:SCALE]...]``: each PATH is a LoRA run's training checkpoint (its EMA
adapters), an adapters ``.pt`` (peft layout, e.g. from ``tools/convert_torch_ckpt.py --lora=adapters``)
or a reference LoRA net's ``.pt``; SCALE (default 1) multiplies the adapter's alpha/r. Before
sampling, every adapted kernel becomes W + sum_k SCALE_k·(alpha_k/r_k)·A_k·B_k (float32, rounded once
to the parameter dtype), so sampling runs the plain DiT at full speed.

A ``--checkpoint`` that holds base weights *and* adapters (a reference LoRA ``.pt``, a LoRA params
folder) gives its base, with its own adapters merged at scale 1. An adapter that recorded the
fingerprint of its base weights is checked against the base in use; a different base is allowed
(adapters do transfer) but logged as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from v2w_jax.convert import lora_load
from v2w_jax.convert.fingerprint import fingerprint
from v2w_jax.models import dit as dit_lib
from v2w_jax.models import lora as lora_lib
from v2w_jax.models.dit_config import DiTConfig

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AdapterRequest:
  path: str
  scale: float = 1.0


def parse_lora_flag(text: str) -> list[AdapterRequest]:
  """``"a.pt:0.8,run/checkpoints"`` -> [AdapterRequest('a.pt', 0.8), AdapterRequest('run/checkpoints', 1.0)]."""
  requests = []
  for item in (t.strip() for t in (text or "").split(",")):
    if not item:
      continue
    path, scale = item, 1.0
    head, sep, tail = item.rpartition(":")
    if sep and not os.path.exists(item):  # an existing path may contain ':' itself
      try:
        path, scale = head, float(tail)
      except ValueError:
        path = item  # a ':' inside the path, no scale
    if not path:
      raise ValueError(f"--lora: '{item}' has no path (expected PATH[:SCALE])")
    if not os.path.exists(path):
      raise ValueError(f"--lora: {path} does not exist")
    requests.append(AdapterRequest(path, scale))
  return requests


def _merge(base: Any, cfg: DiTConfig, sets: Sequence[tuple[lora_load.Adapters, float]]) -> Any:
  prints: dict[str, str] = {}
  for adapters, scale in sets:
    if adapters.base_fingerprint:
      dtype = adapters.base_dtype or "bfloat16"
      if dtype not in prints:
        prints[dtype] = fingerprint(base, dtype)
      if prints[dtype] != adapters.base_fingerprint:
        _log.warning("%s was trained on other base weights (%s) than the ones in use", adapters.source,
                     adapters.base_path or "?")
    _log.info("LoRA %s: rank %d, alpha %g, scale %g -> factor %g", adapters.source, adapters.spec.rank,
              adapters.spec.alpha, scale, scale * adapters.scale)
  return lora_lib.merge_adapters(base, [(a.tree, scale * a.scale) for a, scale in sets])


def load_dit_params(path: str, cfg: DiTConfig, requests: Sequence[AdapterRequest] = (), *, use_ema: bool = True,
                    alpha: float = lora_lib.REFERENCE_ALPHA, base: Any = None) -> tuple[Any, list[dict]]:
  """DiT params (numpy, ``cfg.param_dtype``) from ``path`` with every requested adapter merged in.

  Args:
    path: the base weights (any checkpoint ``convert/load.py`` reads; with adapters of its own, those
      are merged at scale 1). Ignored when ``base`` is given.
    cfg: the plain DiT config (no LoRA spec).
    requests: adapters to blend, with their scales.
    alpha: for adapter files that do not record their alpha (the config's ``lora.alpha``).
    base: already loaded base weights (random weights of a smoke run).

  Returns:
    (params, one record per merged adapter: source, rank, alpha, scale).
  """
  sets: list[tuple[lora_load.Adapters, float]] = []
  if base is None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, cfg.np_param_dtype), dit_lib.abstract_params(cfg))
    base, own = lora_load.read_base_and_adapters(path, cfg, abstract, alpha=alpha, use_ema=use_ema)
    if own is not None:
      sets.append((own, 1.0))
  for req in requests:
    sets.append((lora_load.read_adapters(req.path, cfg, alpha=alpha, use_ema=use_ema), float(req.scale)))
  if not sets:
    return base, []
  params = _merge(jax.tree.map(np.asarray, base), cfg, sets)
  records = [dict(source=a.source, rank=a.spec.rank, alpha=a.spec.alpha, scale=s) for a, s in sets]
  return params, records
