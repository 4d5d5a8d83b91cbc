"""LoRA adapters in the DiT (models/lora.py): targets, layout, init, sharding names and the forward.

The port's LoRA forward must equal the forward of the merged weights W + (alpha/r)·A·B (float32,
tiny model), and fresh adapters (B = 0) must leave the base model's output bit for bit.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from v2w_jax.models import dit, lora
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.parallel import rules as R

TINY = DiTConfig(model_channels=64, num_heads=2, num_blocks=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                 crossattn_proj_in_channels=24, dtype="float32", attention_backend="xla", remat_policy="none")
SPEC = lora.LoRASpec(4, 8.0)
SHAPE = dict(frames=2, height=4, width=4, text_len=3)


def _inputs(cfg):
  return tuple(jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(dit.dummy_inputs(cfg, **SHAPE)))


def _trained_adapters(adapters, seed=1):
  """Adapters as after some training: B no longer zero."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_targets_follow_peft_module_name_rule():
  spec = lora.LoRASpec(4, 4.0, ("q_proj", "mlp.layer1"))
  assert spec.matches(("blocks", "self_attn", "q_proj")) and spec.matches(("blocks", "cross_attn", "q_proj"))
  assert spec.matches(("blocks_3", "mlp", "layer1"))
  assert not spec.matches(("blocks", "mlp", "layer2")) and not spec.matches(("blocks", "self_attn", "k_proj"))
  assert not lora.LoRASpec(4, 4.0, ("layer",)).matches(("blocks", "mlp", "layer1"))  # whole names only
  assert lora.parse_targets(" q_proj, ,mlp.layer2 ") == ("q_proj", "mlp.layer2")
  with pytest.raises(ValueError, match="rank"):
    lora.LoRASpec(0, 4.0)
  with pytest.raises(ValueError, match="targets"):
    lora.LoRASpec(4, 4.0, ", ")


@pytest.mark.parametrize("scan_blocks", [True, False], ids=["scan", "loop"])
def test_reference_targets_adapt_every_attention_projection_and_mlp_layer(scan_blocks):
  cfg = TINY.replace(lora=SPEC, scan_blocks=scan_blocks)
  base, adapters = lora.split_params(dit.abstract_params(cfg))
  layers = {lora.module_name(p) for p in lora.adapter_layers(adapters)}
  assert layers == {f"{a}.{m}" for a in ("self_attn", "cross_attn")
                    for m in ("q_proj", "k_proj", "v_proj", "output_proj")} | {"mlp.layer1", "mlp.layer2"}
  assert jax.tree.structure(base) == jax.tree.structure(dit.abstract_params(TINY.replace(scan_blocks=scan_blocks)))
  block = adapters["blocks"] if scan_blocks else adapters["blocks_0"]
  lead = (cfg.num_blocks,) if scan_blocks else ()
  kv = block["cross_attn"]["k_proj"]
  assert kv["lora_a"].shape == lead + (cfg.crossattn_emb_channels, 4)  # A [in, r]
  assert kv["lora_b"].shape == lead + (4, cfg.model_channels)  # B [r, out]
  assert block["mlp"]["layer1"]["lora_b"].shape == lead + (4, cfg.mlp_hidden)


def test_adapters_share_their_base_layers_axis_names():
  specs = nn.get_partition_spec(dit.abstract_variables(TINY.replace(lora=SPEC)))["params"]["blocks"]
  for module, (a_in, b_out) in {("self_attn", "q_proj"): (R.EMBED, R.HEADS),
                                ("cross_attn", "k_proj"): (R.CROSS_EMBED, R.EMBED),
                                ("self_attn", "output_proj"): (R.HEADS, R.EMBED),
                                ("mlp", "layer2"): (R.MLP, R.EMBED)}.items():
    layer = specs[module[0]][module[1]]
    assert tuple(layer["kernel"]) == (R.LAYERS, a_in, b_out)
    assert tuple(layer["lora_a"]) == (R.LAYERS, a_in, R.LORA_RANK)
    assert tuple(layer["lora_b"]) == (R.LAYERS, R.LORA_RANK, b_out)
  assert (R.LORA_RANK, None) in R.DEFAULT_RULES


def test_fresh_adapters_kaiming_uniform_a_zero_b():
  params = dit.init_params(TINY.replace(lora=lora.LoRASpec(32, 32.0)), jax.random.key(0))
  a = np.asarray(params["blocks"]["mlp"]["layer2"]["lora_a"])  # in = mlp_hidden = 256
  bound = 1.0 / np.sqrt(a.shape[1])  # torch kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
  np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.05)
  assert not np.array_equal(a[0], a[1])  # each block draws its own
  _, adapters = lora.split_params(params)
  for _, b in lora.adapter_layers(adapters).values():
    assert not np.any(np.asarray(b))


def test_fresh_adapters_leave_the_base_output_exactly():
  cfg = TINY.replace(lora=SPEC)
  params = dit.init_params(cfg, jax.random.key(0))
  base, _ = lora.split_params(params)
  inputs = _inputs(cfg)
  np.testing.assert_array_equal(np.asarray(dit.apply_fn(cfg)(params, *inputs)),
                                np.asarray(dit.apply_fn(TINY)(base, *inputs)))


def test_lora_forward_equals_merged_forward():
  cfg = TINY.replace(lora=SPEC)
  base, adapters = lora.split_params(dit.init_params(cfg, jax.random.key(0)))
  adapters = _trained_adapters(adapters)
  inputs = _inputs(cfg)
  got = np.asarray(dit.apply_fn(cfg)(lora.join_params(base, adapters), *inputs))
  merged = lora.merge_adapters(jax.tree.map(np.asarray, base), [(jax.tree.map(np.asarray, adapters), SPEC.scale)])
  want = np.asarray(dit.apply_fn(cfg.replace(lora=None))(merged, *inputs))
  unadapted = np.asarray(dit.apply_fn(cfg.replace(lora=None))(base, *inputs))
  assert np.abs(want - unadapted).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_merge_adapters_blends_several_with_their_factors():
  cfg = TINY.replace(lora=SPEC)
  base, adapters = lora.split_params(jax.tree.map(np.asarray, dit.init_params(cfg, jax.random.key(0))))
  one = jax.tree.map(np.asarray, _trained_adapters(adapters, 1))
  two = jax.tree.map(np.asarray, _trained_adapters(adapters, 2))
  merged = lora.merge_adapters(base, [(one, 0.5), (two, -2.0)])
  a1, b1 = one["blocks"]["self_attn"]["v_proj"].values()
  a2, b2 = two["blocks"]["self_attn"]["v_proj"].values()
  w = base["blocks"]["self_attn"]["v_proj"]["kernel"]
  for i in range(cfg.num_blocks):
    np.testing.assert_allclose(merged["blocks"]["self_attn"]["v_proj"]["kernel"][i],
                               w[i] + 0.5 * a1[i] @ b1[i] - 2.0 * a2[i] @ b2[i], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(merged["blocks"]["self_attn"]["q_norm"]["scale"],
                                base["blocks"]["self_attn"]["q_norm"]["scale"])
  assert lora.join_params(*lora.split_params(merged)) == merged
  with pytest.raises(ValueError, match="base model does not have"):
    lora.merge_adapters({"blocks": {}}, [(one, 1.0)])
