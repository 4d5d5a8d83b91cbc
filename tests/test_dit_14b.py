"""The 14B net of ``configs/nemo_14b.py`` against the reference net definition, abstractly (no weights).

``reference_layout`` writes out the state dict of a released ``*_ema_bf16.pt`` of the reference
``MinimalV1LVGDiT(**net)`` from its constructor kwargs, following the reference module tree
(``networks/minimal_v4_dit.py``: counters, patch embedding, RoPE buffers, timestep MLP, blocks, final
layer, timestep norm, text projection). It is proven on the 2B kwargs against the released 2B file's
key list (``dit_2b_keys.txt``), then gives the 14B list that the converter and ``jax.eval_shape`` of
the port's 14B model are checked against.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs import nemo, nemo_14b
from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import infer
from v2w_jax.models import dit
from v2w_jax.models.dit_config import DiTConfig

# ---- the reference's resolution of the two released nets (cosmos_predict2/_src/predict2/...) --------
# configs/video2world/defaults/net.py: COSMOS_V1_7B_NET_MININET, which the 2B and 14B nets copy.
_NET_7B = dict(
    max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16, patch_spatial=2,
    patch_temporal=1, model_channels=4096, num_blocks=28, num_heads=32, concat_padding_mask=True,
    pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop", use_adaln_lora=True,
    adaln_lora_dim=256, atten_backend="minimal_a2a", extra_per_block_abs_pos_emb=True,
    rope_h_extrapolation_ratio=1.0, rope_w_extrapolation_ratio=1.0, rope_t_extrapolation_ratio=2.0,
    sac_config={},
)
# Same file: COSMOS_V1_2B_NET_MININET / COSMOS_V1_14B_NET_MININET edits of the copy.
_NET_2B = {**_NET_7B, "model_channels": 2048, "num_heads": 16, "num_blocks": 28,
           "extra_per_block_abs_pos_emb": False, "rope_t_extrapolation_ratio": 1.0}
_NET_14B = {**_NET_7B, "model_channels": 5120, "num_heads": 40, "num_blocks": 36,
            "extra_per_block_abs_pos_emb": False, "rope_t_extrapolation_ratio": 1.0}
# configs/video2world/experiment/reason_embeddings/model_{2B,14b}_reason_1p1_rectified_flow.py: the
# model.config.net overrides of the released checkpoints' rectified-flow experiments.
_EXPERIMENT_NET = dict(
    rope_enable_fps_modulation=False, rope_h_extrapolation_ratio=3.0, rope_w_extrapolation_ratio=3.0,
    rope_t_extrapolation_ratio=24.0 / 24, timestep_scale=0.001, use_crossattn_projection=True,
    crossattn_proj_in_channels=100352, crossattn_emb_channels=1024, use_wan_fp32_strategy=True,
)
REFERENCE_2B = {**_NET_2B, **_EXPERIMENT_NET, "sac_config": {"mode": "predict2_2b_720_aggressive"}}
REFERENCE_14B = {**_NET_14B, **_EXPERIMENT_NET, "sac_config": {"mode": "predict2_14b_720_aggressive"}}

PARAM_COUNT_14B = 14_368_047_104
_LINE = re.compile(r"^(\S+) \[([0-9,]*)\] (\w+)$")


def reference_layout(net: dict) -> list[tuple[str, tuple[int, ...], str]]:
  """(key, shape, dtype) of every tensor of ``MinimalV1LVGDiT(**net)``'s bf16 release, in file order."""
  d, dh = net["model_channels"], net["model_channels"] // net["num_heads"]
  ctx, lora = net["crossattn_emb_channels"], net["adaln_lora_dim"]
  hidden = int(d * net.get("mlp_ratio", 4.0))  # constructor default 4.0
  pt, p = net["patch_temporal"], net["patch_spatial"]
  # + condition mask (MinimalV1LVGDiT adds it to in_channels) + padding mask (concat_padding_mask).
  in_features = (net["in_channels"] + 1 + int(net["concat_padding_mask"])) * pt * p * p
  dim_h = dh // 6 * 2
  dim_t = dh - 2 * dim_h
  rope_len = max(net["max_img_h"] // p, net["max_img_w"] // p, net["max_frames"] // pt)
  bf = "bfloat16"
  rows = [(f"accum_{n}", (), "int64") for n in ("video_sample_counter", "image_sample_counter", "iteration")]
  rows += [("accum_train_in_hours", (), bf), ("x_embedder.proj.1.weight", (d, in_features), bf),
           ("pos_embedder.seq", (rope_len,), bf), ("pos_embedder.dim_spatial_range", (dim_h // 2,), bf),
           ("pos_embedder.dim_temporal_range", (dim_t // 2,), bf),
           ("t_embedder.1.linear_1.weight", (d, d), bf), ("t_embedder.1.linear_2.weight", (3 * d, d), bf)]

  def attention(prefix: str, kv_in: int) -> list:
    out = []
    for name, fan_in in (("q", d), ("k", kv_in), ("v", kv_in)):
      out.append((f"{prefix}.{name}_proj.weight", (d, fan_in), bf))
      if name != "v":  # v_norm is an Identity; the q/k norms are TransformerEngine RMSNorms
        out += [(f"{prefix}.{name}_norm.weight", (dh,), bf), (f"{prefix}.{name}_norm._extra_state", (0,), bf)]
    return out + [(f"{prefix}.output_proj.weight", (d, d), bf)]

  for i in range(net["num_blocks"]):
    b = f"blocks.{i}"
    rows += attention(f"{b}.self_attn", d) + attention(f"{b}.cross_attn", ctx)
    rows += [(f"{b}.mlp.layer1.weight", (hidden, d), bf), (f"{b}.mlp.layer2.weight", (d, hidden), bf)]
    for m in ("self_attn", "cross_attn", "mlp"):
      rows += [(f"{b}.adaln_modulation_{m}.1.weight", (lora, d), bf),
               (f"{b}.adaln_modulation_{m}.2.weight", (3 * d, lora), bf)]
  rows += [("final_layer.linear.weight", (p * p * pt * net["out_channels"], d), bf),
           ("final_layer.adaln_modulation.1.weight", (lora, d), bf),
           ("final_layer.adaln_modulation.2.weight", (2 * d, lora), bf),
           ("t_embedding_norm.weight", (d,), bf), ("t_embedding_norm._extra_state", (0,), bf)]
  if net["use_crossattn_projection"]:
    rows += [("crossattn_proj.0.weight", (ctx, net["crossattn_proj_in_channels"]), bf),
             ("crossattn_proj.0.bias", (ctx,), bf)]
  return [("net." + k, s, t) for k, s, t in rows]


def _parameter_count(layout) -> int:
  """Trainable tensors only: not the counters, RoPE buffers or TransformerEngine metadata."""
  return sum(int(np.prod(s)) for k, s, _ in layout
             if not (k.startswith(("net.accum_", "net.pos_embedder.")) or k.endswith("._extra_state")))


def _release_file(path) -> list[tuple[str, tuple[int, ...], str]]:
  rows = []
  for line in path.read_text().splitlines():
    if line.strip():
      m = _LINE.match(line.strip())
      assert m, line
      rows.append((m.group(1), tuple(int(s) for s in m.group(2).split(",") if s), m.group(3)))
  return rows


def _port_options(cfg: DiTConfig) -> dict:
  """The config's fields that are not reference kwargs (dtypes, remat, ...)."""
  reference = set(REFERENCE_2B) | {"mlp_ratio"}
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in reference}


class _Shape:
  def __init__(self, shape):
    self.shape = shape


def _fake_release(net: dict, cfg: DiTConfig) -> dict:
  """The layout as tensors with shapes only, and the RoPE buffers with the bf16 file's values."""
  fake = {k: _Shape(s) for k, s, _ in reference_layout(net)}
  for name, value in convert_dit.rope_buffers(cfg).items():
    fake[convert_dit.PREFIX + name] = value.astype(ml_dtypes.bfloat16)
  return fake


@pytest.fixture(scope="module")
def cfg_14b() -> DiTConfig:
  return DiTConfig.from_config(nemo_14b.get_config().model)


@pytest.fixture(scope="module")
def params_14b(cfg_14b):
  return dit.abstract_params(cfg_14b)


def test_generator_reproduces_the_released_2b_file(reference_file):
  assert reference_layout(REFERENCE_2B) == _release_file(reference_file("dit_2b_keys.txt"))


@pytest.mark.parametrize("config_model, reference",
                         [(nemo.model_2b, REFERENCE_2B), (nemo_14b.model_14b, REFERENCE_14B)], ids=["2b", "14b"])
def test_configs_resolve_the_reference_nets(config_model, reference):
  """configs/ hold exactly the reference kwargs of each released net (port options aside)."""
  cfg = DiTConfig.from_config(config_model())
  assert DiTConfig.from_reference_kwargs(reference, **_port_options(cfg)) == cfg


def test_14b_recipe_is_the_2b_recipe_with_high_sigma():
  c2, c14 = nemo.get_config().to_dict(), nemo_14b.get_config().to_dict()
  differ = sorted(k for k in c2 if c2[k] != c14[k])
  assert differ == ["job", "mesh", "model", "objective"], differ
  assert c14["objective"]["rectified_flow"] == {**c2["objective"]["rectified_flow"], "use_high_sigma_strategy": True}
  assert {k: v for k, v in c14["objective"].items() if k != "rectified_flow"} == \
      {k: v for k, v in c2["objective"].items() if k != "rectified_flow"}


def test_14b_export_matches_the_reference_layout(cfg_14b, params_14b):
  """eval_shape params -> the converter's bf16 export: every reference key, shape and dtype, nothing else."""
  exported = convert_dit.params_to_torch(params_14b, cfg_14b, dtype=ml_dtypes.bfloat16)
  got = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in exported.items()}
  want = {k: (s, t) for k, s, t in reference_layout(REFERENCE_14B)}
  assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
  wrong = sorted(k for k in want if got[k] != want[k])
  assert not wrong, [(k, got[k], want[k]) for k in wrong[:5]]


def test_14b_import_accepts_the_reference_layout(cfg_14b):
  """torch_to_params' strict check passes on the 14B layout (shapes only; stops before reading data)."""
  fake = _fake_release(REFERENCE_14B, cfg_14b)
  assert infer.dit_config_from_shapes(fake) == cfg_14b.replace(
      remat_policy="save_attention", logical_axis_rules=DiTConfig().logical_axis_rules)
  del fake["net.final_layer.linear.weight"]
  with pytest.raises(ValueError) as err:
    convert_dit.torch_to_params(fake, cfg_14b)
  assert str(err.value).splitlines()[1:] == ["  missing: net.final_layer.linear.weight"]


def test_14b_file_with_the_2b_config_names_both_sizes(cfg_14b):
  with pytest.raises(ValueError) as err:
    convert_dit.torch_to_params(_fake_release(REFERENCE_14B, cfg_14b), DiTConfig.from_config(nemo.model_2b()))
  size_line = str(err.value).splitlines()[1]
  assert "model_channels=5120, num_heads=40, num_blocks=36" in size_line, size_line
  assert "model_channels=2048, num_heads=16, num_blocks=28" in size_line
  assert "configs/nemo_14b.py" in size_line


def test_14b_parameter_count(params_14b):
  assert dit.count_params(params_14b) == _parameter_count(reference_layout(REFERENCE_14B)) == PARAM_COUNT_14B


def test_14b_forward_shapes(cfg_14b, params_14b):
  """eval_shape of the 14B forward (no memory): a 720p-width latent row, the recipe's 512 text tokens."""
  inputs = dit.dummy_inputs(cfg_14b, frames=2, height=4, width=160, text_len=512)
  out = jax.eval_shape(dit.apply_fn(cfg_14b), params_14b, *inputs)
  assert out.shape == (1, 16, 2, 4, 160) and out.dtype == jnp.float32
