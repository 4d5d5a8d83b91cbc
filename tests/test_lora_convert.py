"""LoRA interchange with the reference (convert/lora.py, lora_load.py, lora_export.py).

* the peft layout of the 2B LoRA net, built from the released key list, is what the port writes and reads;
* a merged export is exactly base + (alpha/r)·B·A (float32 math, then one rounding);
* adapters and a reference LoRA ``.pt`` (base_layer + adapters) round-trip bit for bit;
* the weights fingerprint is the same however the weights are held, and changes with one element.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from test_dit_2b_shapes import _reference_keys
from configs import nemo
from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import lora as convert_lora
from v2w_jax.convert import lora_export, lora_load, params_io, torch_pt
from v2w_jax.convert.fingerprint import fingerprint
from v2w_jax.convert.load import WeightsError
from v2w_jax.inference.weights import random_params_like
from v2w_jax.models import dit, lora
from v2w_jax.models.dit_config import DiTConfig

TINY = DiTConfig(model_channels=32, num_heads=2, num_blocks=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                 crossattn_proj_in_channels=24, dtype="float32", attention_backend="xla", remat_policy="none")
SPEC = lora.LoRASpec(4, 8.0)
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def weights():
  """Tiny base weights and trained-looking adapters (numpy)."""
  params = random_params_like(dit.abstract_params(TINY.replace(lora=SPEC)), seed=0)
  return lora.split_params(params)


def _peft_rule(module: str, targets) -> bool:
  return any(module == t or module.endswith("." + t) for t in targets)


def test_peft_layout_of_the_2b_net_from_the_released_key_list(reference_file):
  """Every weight of a targeted layer becomes base_layer + lora_A [32, in] + lora_B [out, 32]."""
  released = _reference_keys(reference_file("dit_2b_keys.txt"))
  params = convert_dit.key_table(DiTConfig.from_config(nemo.model_2b()))
  expected = {}
  for key, (shape, _) in released.items():
    short = key[len("net."):]
    if short not in params:  # buffers, TE extra state, counters
      continue
    module = short[: -len(".weight")] if short.endswith(".weight") else None
    if module is not None and _peft_rule(module, lora.REFERENCE_TARGETS):
      out_features, in_features = shape
      expected[f"{module}.base_layer.weight"] = shape
      expected[f"{module}.lora_A.default.weight"] = (32, in_features)
      expected[f"{module}.lora_B.default.weight"] = (out_features, 32)
    else:
      expected[short] = shape
  cfg = DiTConfig.from_config(nemo.model_2b(), lora=lora.LoRASpec(32, 32.0))
  got = convert_lora.peft_key_table(cfg)
  assert got == expected
  adapters = convert_lora.adapter_key_table(cfg)
  assert len(adapters) == 28 * 10 * 2  # 28 blocks x (4 self + 4 cross + 2 MLP) x (A, B)
  assert "blocks.27.cross_attn.k_proj.lora_A.default.weight" in adapters
  assert adapters["blocks.27.cross_attn.k_proj.lora_A.default.weight"].torch_shape == (32, 1024)


def test_adapters_round_trip_through_a_pt_file_bitwise(weights, tmp_path):
  _, adapters = weights
  cfg = TINY.replace(lora=SPEC)
  tensors = convert_lora.adapters_to_torch(adapters, cfg)
  a = tensors["net.blocks.1.mlp.layer1.lora_A.default.weight"]
  b = tensors["net.blocks.1.mlp.layer1.lora_B.default.weight"]
  assert a.shape == (4, 32) and b.shape == (128, 4) and a.dtype == np.float32
  np.testing.assert_array_equal(a, adapters["blocks"]["mlp"]["layer1"]["lora_a"][1].T)
  path = tmp_path / "adapters.pt"
  torch_pt.save(path, tensors)
  convert_lora.write_sidecar(path, SPEC)
  read = lora_load.read_adapters(path, TINY)
  assert read.spec.rank == 4 and read.spec.alpha == 8.0
  for x, y in zip(jax.tree.leaves(read.tree), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(x, y)
  # peft's own adapter files drop the adapter name: read the same.
  plain = {k.replace(".default.", "."): v for k, v in tensors.items()}
  torch_pt.save(tmp_path / "plain.pt", plain)
  read = lora_load.read_adapters(tmp_path / "plain.pt", TINY, alpha=8.0)
  for x, y in zip(jax.tree.leaves(read.tree), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(WeightsError, match="alpha unknown"):
    lora_load.read_adapters(tmp_path / "plain.pt", TINY)


def test_bad_adapter_files_fail_naming_the_keys(weights, tmp_path):
  _, adapters = weights
  tensors = convert_lora.adapters_to_torch(adapters, TINY.replace(lora=SPEC))
  del tensors["net.blocks.0.self_attn.q_proj.lora_B.default.weight"]
  tensors["net.blocks.0.self_attn.k_proj.lora_A.default.weight"] = np.zeros((4, 31), np.float32)
  with pytest.raises(ValueError) as e:
    convert_lora.torch_to_adapters(tensors, TINY.replace(lora=SPEC))
  assert "missing: net.blocks.0.self_attn.q_proj.lora_B.default.weight" in str(e.value)
  assert "bad: net.blocks.0.self_attn.k_proj.lora_A.default.weight: shape [4, 31]" in str(e.value)
  tensors = convert_lora.adapters_to_torch(adapters, TINY.replace(lora=SPEC))
  tensors["net.blocks.0.mlp.layer1.lora_A.default.weight"] = np.zeros((8, 32), np.float32)
  with pytest.raises(ValueError, match="different ranks"):
    convert_lora.infer_spec(tensors, 8.0)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
def test_merged_export_is_base_plus_scaled_b_times_a_exactly(weights, dtype):
  base, adapters = weights
  cfg = TINY.replace(lora=SPEC)
  merged = {k: np.asarray(v) for k, v in convert_lora.merged_to_torch(base, adapters, cfg, dtype=dtype).items()}
  plain = convert_dit.params_to_torch(base, TINY, dtype=np.float32)
  lora_tensors = convert_lora.adapters_to_torch(adapters, cfg)
  assert merged.keys() == plain.keys()
  adapted = 0
  for key, w in plain.items():
    a_key = key[: -len(".weight")] + ".lora_A.default.weight"
    if a_key in lora_tensors:
      adapted += 1
      b = lora_tensors[a_key.replace(".lora_A.", ".lora_B.")]
      want = (w.astype(np.float32) + np.float32(SPEC.scale) * (b @ lora_tensors[a_key])).astype(dtype)
      assert not np.array_equal(want, w.astype(dtype))
    else:
      want = w.astype(dtype) if w.dtype.kind == "f" else w
    np.testing.assert_array_equal(merged[key], want, err_msg=key)
  assert adapted == TINY.num_blocks * 10


def test_reference_lora_pt_imports_as_base_and_adapters(weights, tmp_path):
  """A reference LoRA net's state dict (base_layer + adapters) -> params folder -> the same tensors."""
  base, adapters = weights
  cfg = TINY.replace(lora=SPEC)
  lora_tensors = convert_lora.adapters_to_torch(adapters, cfg)
  state = {}
  for key, w in convert_dit.params_to_torch(base, TINY, dtype=BF16).items():
    a_key = key[: -len(".weight")] + ".lora_A.default.weight"
    state[key.replace(".weight", ".base_layer.weight") if a_key in lora_tensors else key] = w
  state.update(lora_tensors)
  assert set(state) == {"net." + k for k in convert_lora.peft_key_table(cfg)} | {
      k for k in state if "_extra_state" in k or "pos_embedder" in k or "accum_" in k}
  pt = tmp_path / "reference_lora.pt"
  torch_pt.save(pt, state)
  folder = lora_export.import_lora_pt(pt, tmp_path / "folder", TINY, alpha=SPEC.alpha, dtype=np.float32)
  assert params_io.load_metadata(folder)["lora"] == {"rank": 4, "alpha": 8.0, "targets": sorted(
      {lora.module_name(p) for p in lora.adapter_layers(adapters)})}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), dit.abstract_params(TINY))
  for source in (pt, folder):
    got_base, got_adapters = lora_load.read_base_and_adapters(source, TINY, abstract, alpha=SPEC.alpha)
    for x, y in zip(jax.tree.leaves(got_base), jax.tree.leaves(base)):
      np.testing.assert_array_equal(x, y.astype(BF16).astype(np.float32))
    for x, y in zip(jax.tree.leaves(got_adapters.tree), jax.tree.leaves(adapters)):
      np.testing.assert_array_equal(x, y)
  # A plain checkpoint has base weights and no adapters.
  torch_pt.save(tmp_path / "plain.pt", convert_dit.params_to_torch(base, TINY, dtype=np.float32))
  got_base, none = lora_load.read_base_and_adapters(tmp_path / "plain.pt", TINY, abstract)
  assert none is None
  for x, y in zip(jax.tree.leaves(got_base), jax.tree.leaves(base)):
    np.testing.assert_array_equal(x, y)


def test_fingerprint_depends_on_the_values_not_on_how_they_are_held(weights):
  base, _ = weights
  ref = fingerprint(base)
  assert ref == fingerprint(jax.tree.map(jnp.asarray, base))  # device arrays
  assert ref == fingerprint(jax.tree.map(lambda x: x.astype(BF16), base))  # already bf16
  changed = jax.tree.map(np.copy, base)
  kernel = changed["blocks"]["mlp"]["layer2"]["kernel"]
  kernel[1, 3, 5] = np.float32(kernel[1, 3, 5]) * 2 + 1
  assert fingerprint(changed) != ref
  swapped = jax.tree.map(np.copy, base)
  swapped["blocks"]["mlp"]["layer2"]["kernel"] = base["blocks"]["mlp"]["layer2"]["kernel"][::-1].copy()
  assert fingerprint(swapped) != ref  # same values, other places
  assert fingerprint(base, jnp.float32) != ref and len(ref) == 64
