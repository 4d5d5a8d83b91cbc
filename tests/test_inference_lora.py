"""Generation with LoRA adapters (inference/lora.py): the --lora flag and blending into the weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import lora as convert_lora
from v2w_jax.convert import torch_pt
from v2w_jax.inference import lora as inference_lora
from v2w_jax.inference.weights import random_params_like
from v2w_jax.models import dit, lora
from v2w_jax.models.dit_config import DiTConfig

TINY = DiTConfig(model_channels=32, num_heads=2, num_blocks=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                 crossattn_proj_in_channels=24)


def test_parse_lora_flag(tmp_path):
  a, b = tmp_path / "a.pt", tmp_path / "run:1"
  a.write_bytes(b"")
  b.mkdir()
  assert inference_lora.parse_lora_flag(f"{a}:0.8, {b}") == [
      inference_lora.AdapterRequest(str(a), 0.8), inference_lora.AdapterRequest(str(b), 1.0)]
  assert inference_lora.parse_lora_flag(f"{a}:-1e-1") == [inference_lora.AdapterRequest(str(a), -0.1)]
  assert inference_lora.parse_lora_flag("") == []
  with pytest.raises(ValueError, match="does not exist"):
    inference_lora.parse_lora_flag(f"{tmp_path / 'nope.pt'}:0.5")
  with pytest.raises(ValueError, match="no path"):
    inference_lora.parse_lora_flag(":0.5")


def _adapters_pt(path, spec, seed):
  cfg = TINY.replace(lora=spec)
  _, adapters = lora.split_params(random_params_like(dit.abstract_params(cfg), seed=seed))
  torch_pt.save(path, convert_lora.adapters_to_torch(adapters, cfg))
  convert_lora.write_sidecar(path, spec)
  return adapters


def test_several_adapters_blend_with_their_scales(tmp_path):
  base = random_params_like(dit.abstract_params(TINY), seed=0)
  torch_pt.save(tmp_path / "base.pt", convert_dit.params_to_torch(base, TINY))
  one = _adapters_pt(tmp_path / "one.pt", lora.LoRASpec(4, 8.0), seed=1)  # factor 2
  two = _adapters_pt(tmp_path / "two.pt", lora.LoRASpec(2, 2.0, ("mlp.layer2",)), seed=2)  # factor 1, MLP only
  requests = inference_lora.parse_lora_flag(f"{tmp_path / 'one.pt'}:0.5,{tmp_path / 'two.pt'}:-1.5")
  params, records = inference_lora.load_dit_params(str(tmp_path / "base.pt"), TINY, requests)
  assert [(r["rank"], r["alpha"], r["scale"]) for r in records] == [(4, 8.0, 0.5), (2, 2.0, -1.5)]
  want = lora.merge_adapters(base, [(one, 0.5 * 2.0), (two, -1.5 * 1.0)])
  for got, w in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, w)
  k = lambda p: p["blocks"]["mlp"]["layer2"]["kernel"]  # noqa: E731
  a1, b1 = one["blocks"]["mlp"]["layer2"].values()
  a2, b2 = two["blocks"]["mlp"]["layer2"].values()
  np.testing.assert_allclose(k(params)[0], k(base)[0] + 1.0 * a1[0] @ b1[0] - 1.5 * a2[0] @ b2[0], atol=1e-5)
  np.testing.assert_array_equal(params["blocks"]["self_attn"]["q_proj"]["kernel"],
                                lora.merge_adapters(base, [(one, 1.0)])["blocks"]["self_attn"]["q_proj"]["kernel"])


def test_a_reference_lora_pt_as_checkpoint_merges_its_own_adapters(tmp_path):
  spec = lora.LoRASpec(4, 4.0)
  cfg = TINY.replace(lora=spec)
  base, adapters = lora.split_params(random_params_like(dit.abstract_params(cfg), seed=5))
  tensors = convert_lora.adapters_to_torch(adapters, cfg)
  state = {}
  for key, w in convert_dit.params_to_torch(base, TINY).items():
    stem = key[: -len(".weight")]
    state[f"{stem}.base_layer.weight" if f"{stem}.lora_A.default.weight" in tensors else key] = w
  state.update(tensors)
  torch_pt.save(tmp_path / "reference_lora.pt", state)
  params, records = inference_lora.load_dit_params(str(tmp_path / "reference_lora.pt"), TINY, alpha=4.0)
  assert records[0]["scale"] == 1.0
  want = lora.merge_adapters(base, [(adapters, spec.scale)])
  for got, w in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, w)
