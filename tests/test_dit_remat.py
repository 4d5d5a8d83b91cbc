"""Remat policies of the DiT blocks: what each one saves for the backward pass.

CPU part: the policy logic (names, primitive names) and the residuals ``jax.checkpoint`` keeps.
GPU part (skipped without a GPU): the compiled HLO runs the cuDNN attention forward once per
attention under ``save_attention`` (no recompute) and twice under ``full`` (perf_notes.md); under
``save_self_attention`` only the cross-attention forward runs twice.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax._src import ad_checkpoint as ad_checkpoint_internal

from v2w_jax.models import dit, remat
from v2w_jax.models.attention import ATTENTION_OUT_NAME
from v2w_jax.models.dit_config import DiTConfig

TINY = DiTConfig(model_channels=64, num_heads=2, num_blocks=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                 crossattn_proj_in_channels=24, dtype="float32", attention_backend="xla")
SHAPE = dict(frames=2, height=4, width=4, text_len=3)


class _Prim:
  def __init__(self, name):
    self.name = name


def test_policy_logic():
  policy = remat.checkpoint_policy("save_attention")
  aval = jax.core.ShapedArray((2, 3), jnp.float32)
  assert policy(ad_checkpoint_internal.name_p, aval, name=ATTENTION_OUT_NAME)
  assert not policy(ad_checkpoint_internal.name_p, aval, name="something_else")
  for name in remat.CUDNN_ATTENTION_FWD_PRIMITIVES:
    assert policy(_Prim(name), aval)
  assert not policy(_Prim("dot_product_attention_bwd_wrapper"), aval)
  assert not policy(jax.lax.dot_general_p, aval, aval)
  full = remat.checkpoint_policy("full")
  assert not full(_Prim("dot_product_attention_fwd_wrapper"), aval)
  assert not full(ad_checkpoint_internal.name_p, aval, name=ATTENTION_OUT_NAME)
  assert remat.checkpoint_policy("none") is None
  # save_self_attention: only the cuDNN call whose keys are the queries' tokens (not the text).
  self_only = remat.checkpoint_policy("save_self_attention")
  video = jax.core.ShapedArray((1, 96, 4, 32), jnp.bfloat16)
  text = jax.core.ShapedArray((1, 7, 4, 32), jnp.bfloat16)
  for name in remat.CUDNN_ATTENTION_FWD_PRIMITIVES:
    assert self_only(_Prim(name), video, video, video)
    assert not self_only(_Prim(name), video, text, text)
  assert not self_only(ad_checkpoint_internal.name_p, video, name=ATTENTION_OUT_NAME)
  assert not self_only(jax.lax.dot_general_p, video, video)
  with pytest.raises(ValueError):
    remat.checkpoint_policy("bogus")
  # offload_attention: the same values as save_attention, sent to pinned host memory; the rest recomputed.
  offload = remat.checkpoint_policy("offload_attention")
  for prim, kw in ((_Prim("flash_mha_fwd"), {}), (_Prim("dot_product_attention_fwd_wrapper"), {}),
                   (ad_checkpoint_internal.name_p, {"name": ATTENTION_OUT_NAME})):
    decision = offload(prim, aval, **kw)
    assert isinstance(decision, jax.ad_checkpoint.Offloadable) and decision.dst == "pinned_host"
  assert offload(jax.lax.dot_general_p, aval, aval) is jax.ad_checkpoint.Recompute


def test_cudnn_primitive_names_exist_in_jax():
  """Guards against a jax upgrade renaming the primitive the policy keys on."""
  from jax._src.cudnn import fused_attention_stablehlo as fa

  assert fa._dot_product_attention_fwd_p_wrapper.name in remat.CUDNN_ATTENTION_FWD_PRIMITIVES
  assert fa._dot_product_attention_fwd_p.name in remat.CUDNN_ATTENTION_FWD_PRIMITIVES


def _residuals(cfg: DiTConfig):
  params = dit.abstract_params(cfg)
  inputs = dit.dummy_inputs(cfg, **SHAPE)
  loss = lambda p: dit.DiT(cfg).apply({"params": p}, *inputs).sum()
  return ad_checkpoint_internal.saved_residuals(loss, params)


def test_loop_residuals_name_attention_outputs():
  named = {}
  for policy in ("full", "save_attention"):
    res = _residuals(TINY.replace(scan_blocks=False, remat_policy=policy))
    named[policy] = [d for _, d in res if f"named '{ATTENTION_OUT_NAME}'" in d]
  assert named["full"] == []
  assert len(named["save_attention"]) == 2 * TINY.num_blocks  # self + cross per block


def test_scan_residuals_keep_stacked_attention_outputs():
  cfg = TINY.replace(scan_blocks=True)
  tokens = SHAPE["frames"] * SHAPE["height"] * SHAPE["width"] // cfg.patch_spatial**2
  attn_shape = (cfg.num_blocks, 1, tokens, cfg.num_heads, cfg.head_dim)
  counts = {}
  dots = {}
  for policy in ("none", "full", "save_attention", "save_self_attention", "save_dots"):
    res = _residuals(cfg.replace(remat_policy=policy))
    counts[policy] = (len(res), sum(tuple(a.shape) == attn_shape for a, _ in res))
    dots[policy] = sum("from the argument" not in d and a.shape[:1] == (cfg.num_blocks,) for a, d in res)
  assert counts["full"][1] == 0
  assert counts["save_self_attention"] == counts["full"]  # no cuDNN call to keep on CPU: as full
  assert counts["save_attention"][1] == 2  # self- and cross-attention output, stacked over blocks
  assert counts["save_attention"][0] == counts["full"][0] + 2
  assert counts["none"][0] > counts["save_attention"][0]
  # save_dots adds the blocks' matmul outputs (q/k/v/out of both attentions, MLP, AdaLN) to save_attention.
  assert counts["save_dots"][1] == 2
  assert dots["save_dots"] >= dots["save_attention"] + 9


_FWD = re.compile(r'custom_call_target="__cudnn\$fmhaSoftmax"')
_BWD = re.compile(r'custom_call_target="__cudnn\$fmhaSoftmaxBackward"')


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU with cuDNN")
@pytest.mark.parametrize("scan_blocks", [True, False], ids=["scan", "loop"])
def test_cudnn_forward_not_recomputed_under_save_attention(scan_blocks):
  cfg = TINY.replace(model_channels=256, num_heads=4, dtype="bfloat16", attention_backend="cudnn",
                     scan_blocks=scan_blocks)
  inputs = dit.dummy_inputs(cfg, frames=2, height=16, width=16, text_len=8)
  params = dit.init_params(cfg, jax.random.key(0))
  counts = {}
  for policy in ("full", "save_attention", "save_self_attention"):
    c = cfg.replace(remat_policy=policy)
    loss = lambda p, c=c: dit.DiT(c).apply({"params": p}, *inputs).sum()
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    counts[policy] = (len(_FWD.findall(hlo)), len(_BWD.findall(hlo)))
  per_stack = 1 if scan_blocks else cfg.num_blocks  # a scan body holds one block
  assert counts["save_attention"] == (2 * per_stack, 2 * per_stack), counts
  assert counts["full"] == (4 * per_stack, 2 * per_stack), counts
  # Only the cross-attention forward runs again.
  assert counts["save_self_attention"] == (3 * per_stack, 2 * per_stack), counts
