"""The FlashAttention-3 backend: selection, fallback, numerics of the wiring, and what remat keeps.

CPU part: ``auto``/``fa3`` resolution with faked devices and package availability; the model wired to
a CPU stand-in of the kernel (``fa3_fake.py``: same primitive name and VJP shape) on one device and
inside the context-parallel shard_map; the remat policies keep the kernel's outputs exactly once.
GPU part (skipped without a Hopper GPU and the package): the real kernel against cuDNN, and the
compiled program runs its forward once per attention under ``save_attention``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import ad_checkpoint as ad_checkpoint_internal

import fa3_fake
from v2w_jax.models import attention, dit, fa3, remat
from v2w_jax.models.dit_config import DiTConfig

# head_dim 128: the only one the FA3 wheel supports.
TINY = DiTConfig(model_channels=256, num_heads=2, num_blocks=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                 crossattn_proj_in_channels=24, dtype="bfloat16", attention_backend="fa3")
SHAPE = dict(frames=2, height=4, width=4, text_len=3)


@dataclasses.dataclass
class _Device:
  platform: str
  device_kind: str
  compute_capability: str | None = None


H200 = _Device("gpu", "NVIDIA H200", "9.0")
A100 = _Device("gpu", "NVIDIA A100-SXM4-80GB", "8.0")
CPU = _Device("cpu", "cpu")


def _package(monkeypatch, importable: bool):
  result = (fa3_fake.flash_mha, None) if importable else (None, "ModuleNotFoundError: no flash_attn3_jax")
  monkeypatch.setattr(fa3, "_load", lambda: result)


def test_hopper_detection():
  assert fa3.is_hopper(H200)
  assert fa3.is_hopper(_Device("gpu", "NVIDIA H100 80GB HBM3"))  # no compute capability reported
  assert not fa3.is_hopper(A100)
  assert not fa3.is_hopper(_Device("gpu", "NVIDIA B200", "10.0"))
  assert not fa3.is_hopper(CPU)


def test_auto_keeps_cudnn_on_gpus_and_fa3_is_opt_in(monkeypatch):
  _package(monkeypatch, importable=True)
  assert attention.resolve_backend("auto", device=H200) == "cudnn"  # FA3 measured slower in the full step
  assert attention.resolve_backend("fa3", device=H200) == "fa3"
  assert attention.resolve_backend("auto", device=A100) == "cudnn"
  assert attention.resolve_backend("auto", device=CPU) == "xla"
  assert attention.resolve_backend("cudnn", device=H200) == "cudnn"
  assert attention.resolve_backend("xla", device=H200) == "xla"
  _package(monkeypatch, importable=False)
  assert attention.resolve_backend("auto", device=H200) == "cudnn"
  assert attention.resolve_backend("auto", device=CPU) == "xla"


def test_explicit_fa3_that_cannot_run_says_why(monkeypatch):
  _package(monkeypatch, importable=False)
  with pytest.raises(ValueError, match="does not import.*pip install '.\\[fa3\\]'"):
    attention.resolve_backend("fa3", device=H200)
  _package(monkeypatch, importable=True)
  with pytest.raises(ValueError, match="needs a Hopper"):
    attention.resolve_backend("fa3", device=A100)
  assert attention.resolve_backend("fa3", device=H200) == "fa3"
  # This machine's real devices: a CPU never runs FA3, whatever is installed.
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs a Hopper"):
      attention.resolve_backend("fa3")


def test_unsupported_head_dim_falls_back_under_auto_only(monkeypatch):
  fa3_fake.install(monkeypatch)
  monkeypatch.setattr(attention, "resolve_backend", lambda backend, *a, **k: "fa3")
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  assert attention.kernel_for("auto", q, q, q) == "cudnn"
  with pytest.raises(ValueError, match="head dims"):
    attention.kernel_for("fa3", q, q, q)
  q = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
  assert attention.kernel_for("auto", q, q[:, :3], q[:, :3]) == "fa3"  # different kv length: fine


def _qkv(lq, lk, seed=0, h=2, d=128):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((2, n, h, d)), jnp.bfloat16) for n in (lq, lk, lk))


@pytest.mark.parametrize("lq,lk", [(12, 12), (12, 5)], ids=["self", "cross"])
def test_fa3_path_matches_xla_values_and_gradients(monkeypatch, lq, lk):
  """The model's fa3 path (bf16 cast, scale, layout) computes the XLA path's attention."""
  fa3_fake.install(monkeypatch)
  q, k, v = _qkv(lq, lk)
  cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def run(backend):
    f = lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, backend=backend).astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*(a.astype(jnp.float32) for a in (q, k, v)))

  (val_fa3, grads_fa3), (val_xla, grads_xla) = run("fa3"), run("xla")
  np.testing.assert_allclose(val_fa3, val_xla, rtol=2e-2, atol=2e-2)
  for g_fa3, g_xla in zip(grads_fa3, grads_xla):
    assert g_fa3.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g_fa3), np.asarray(g_xla), rtol=5e-2, atol=3e-2)


def _stacked_attention_residuals(cfg: DiTConfig) -> dict[str, int]:
  params = dit.abstract_params(cfg)
  inputs = dit.dummy_inputs(cfg, **SHAPE)
  loss = lambda p: dit.DiT(cfg).apply({"params": p}, *inputs).sum()
  tokens = SHAPE["frames"] * SHAPE["height"] * SHAPE["width"] // cfg.patch_spatial**2
  out_shape = (cfg.num_blocks, 1, tokens, cfg.num_heads, cfg.head_dim)
  lse_shape = (cfg.num_blocks, 1, cfg.num_heads, tokens)
  res = ad_checkpoint_internal.saved_residuals(loss, params)
  return {"out": sum(tuple(a.shape) == out_shape for a, _ in res),
          "lse": sum(tuple(a.shape) == lse_shape for a, _ in res),
          "named": sum(f"named '{attention.ATTENTION_OUT_NAME}'" in d for _, d in res)}


def test_remat_keeps_each_fa3_output_once(monkeypatch):
  """save_attention keeps the kernel's output and LSE of self- and cross-attention, stacked over the
  blocks, once each (no named copy); full keeps none."""
  fa3_fake.install(monkeypatch)
  got = {p: _stacked_attention_residuals(TINY.replace(remat_policy=p)) for p in ("full", "save_attention", "save_dots")}
  assert got["full"] == {"out": 0, "lse": 0, "named": 0}
  assert got["save_attention"] == {"out": 2, "lse": 2, "named": 0}
  assert got["save_dots"]["out"] == 2 and got["save_dots"]["lse"] == 2


def _count_primitive(jaxpr, name: str) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for sub in _subjaxprs(eqn.params):
      n += _count_primitive(sub, name)
  return n


def _subjaxprs(params):
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x


def test_fa3_forward_not_recomputed_under_save_attention(monkeypatch):
  """In the gradient program the FA3 forward runs in the forward scan only (2 per block body) under
  save_attention, and again in the backward's recompute (4) under full."""
  fa3_fake.install(monkeypatch)
  inputs = dit.dummy_inputs(TINY, **SHAPE)
  counts = {}
  for policy in ("full", "save_attention"):
    cfg = TINY.replace(remat_policy=policy)
    loss = lambda p, cfg=cfg: dit.DiT(cfg).apply({"params": p}, *inputs).sum()
    counts[policy] = _count_primitive(jax.make_jaxpr(jax.grad(loss))(dit.abstract_params(cfg)).jaxpr,
                                      fa3.FWD_PRIMITIVE)
  assert counts == {"full": 4, "save_attention": 2}, counts


def test_offload_attention_moves_the_kept_outputs_to_host_and_changes_no_number(monkeypatch):
  """offload_attention keeps what save_attention keeps, but in pinned host memory: the gradient
  program gains host transfers (on CPU they are no-ops) and the gradients are identical."""
  fa3_fake.install(monkeypatch)
  inputs = dit.dummy_inputs(TINY, **SHAPE)
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal(inputs[0].shape, np.float32), inputs[1] + 300.0,
            rng.standard_normal(inputs[2].shape, np.float32)) + inputs[3:]
  params = dit.init_params(TINY, jax.random.key(0), frames=2, height=4, width=4)
  grads, transfers = {}, {}
  for policy in ("save_attention", "offload_attention"):
    cfg = TINY.replace(remat_policy=policy)
    loss = lambda p, cfg=cfg: jnp.mean(dit.DiT(cfg).apply({"params": p}, *inputs) ** 2)
    transfers[policy] = str(jax.make_jaxpr(jax.grad(loss))(params)).count("Host")
    grads[policy] = jax.jit(jax.grad(loss))(params)
  assert transfers["save_attention"] == 0 and transfers["offload_attention"] >= 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               grads["save_attention"], grads["offload_attention"])


def test_policy_names_cover_fa3():
  assert fa3.FWD_PRIMITIVE in remat.ATTENTION_KERNEL_FWD_PRIMITIVES
  assert remat.save_attention_kernel_outputs(fa3_fake.fwd_p)


_CP_WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
import fa3_fake
from jax._src import ad_checkpoint as adc
from v2w_jax.models import dit, fa3
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.parallel import mesh as mesh_lib
fa3._load = lambda: (fa3_fake.flash_mha, None)
fa3.is_hopper = lambda device: True
base = DiTConfig(model_channels=256, num_heads=2, num_blocks=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                 crossattn_proj_in_channels=24, dtype="bfloat16", remat_policy="save_attention")
inputs = dit.dummy_inputs(base, frames=2, height=4, width=4, text_len=3)
rng = np.random.default_rng(0)
inputs = (rng.standard_normal(inputs[0].shape, np.float32), inputs[1] + 300.0,
          rng.standard_normal(inputs[2].shape, np.float32)) + inputs[3:]
params = dit.init_params(base.replace(attention_backend="xla"), jax.random.key(0), frames=2, height=4, width=4)
mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, context=2), devices=jax.devices()[:2])
out, grads = {}, {}
for backend in ("fa3", "xla"):
  cfg = base.replace(attention_backend=backend)
  loss = lambda p: jnp.mean(dit.DiT(cfg).apply({"params": p}, *inputs) ** 2)
  with jax.set_mesh(mesh):
    val, grads[backend] = jax.jit(jax.value_and_grad(loss))(params)
    res = adc.saved_residuals(loss, params)
    jaxpr = str(jax.make_jaxpr(loss)(params))
  out[backend] = {"loss": float(val), "lse": sum(a.dtype == jnp.float32 and a.shape[:1] == (2,) and a.ndim == 4 for a, _ in res),
                  "shard_map": jaxpr.count("shard_map"), "fa3_calls": jaxpr.count("flash_mha_fwd")}
rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)) / (np.linalg.norm(np.asarray(b, np.float32)) + 1e-12))
errs = jax.tree.map(rel, grads["fa3"], grads["xla"])
out["grad_rel_err"] = {jax.tree_util.keystr(k): e for k, e in jax.tree_util.tree_leaves_with_path(errs)}
print(json.dumps(out))
"""


def test_fa3_inside_context_parallel_shard_map(repo_root):
  """Context parallelism 2: FA3 runs inside the Ulysses/query-sharded shard_maps, its LSE is kept
  (stacked over blocks) and the loss and gradient norm equal the XLA kernel's."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _CP_WORKER], cwd=repo_root, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["fa3"]["shard_map"] >= 2 and out["fa3"]["fa3_calls"] == 2  # self + cross in the scanned block
  assert out["xla"]["fa3_calls"] == 0
  assert out["fa3"]["lse"] == 2
  assert out["fa3"]["loss"] == pytest.approx(out["xla"]["loss"], rel=2e-2)
  # Every parameter's gradient (a doubled or missing sum over the context axis would show in the
  # cross-attention k/v projections) agrees to bf16 precision.
  worst = max(out["grad_rel_err"].items(), key=lambda kv: kv[1])
  assert worst[1] < 5e-2, worst
  assert any("cross_attn" in k and "k_proj" in k for k in out["grad_rel_err"])


# ---- GPU (Hopper + flash-attn3-jax) ------------------------------------------------------------------

_ON_HOPPER = jax.default_backend() == "gpu" and fa3.unavailable_reason() is None


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.skipif(not _ON_HOPPER, reason="needs a Hopper GPU with flash-attn3-jax installed")
@pytest.mark.parametrize("lk", [4096, 512], ids=["self", "cross"])
def test_real_fa3_matches_cudnn(lk):
  q, k, v = _qkv(4096, lk, h=16)
  cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.bfloat16)

  def run(backend):
    f = lambda q, k, v: jnp.sum((attention.local_attention(q, k, v, backend=backend) * cot).astype(jnp.float32))
    out = jax.jit(lambda *a: attention.local_attention(*a, backend=backend))(q, k, v)
    return out, jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

  (out_fa3, g_fa3), (out_cudnn, g_cudnn) = run("fa3"), run("cudnn")
  assert out_fa3.dtype == jnp.bfloat16 and out_fa3.shape == q.shape
  assert _rel_l2(out_fa3, out_cudnn) < 1e-2
  for a, b in zip(g_fa3, g_cudnn):
    assert _rel_l2(a, b) < 2e-2


_FA3_FWD_CALL = re.compile(r'custom_call_target="flash_mha_fwd"')


@pytest.mark.skipif(not _ON_HOPPER, reason="needs a Hopper GPU with flash-attn3-jax installed")
def test_real_fa3_forward_runs_once_per_attention_under_save_attention():
  cfg = TINY.replace(model_channels=2048, num_heads=16)
  inputs = dit.dummy_inputs(cfg, frames=2, height=16, width=16, text_len=8)
  params = dit.init_params(cfg, jax.random.key(0))
  counts = {}
  for policy in ("full", "save_attention"):
    c = cfg.replace(remat_policy=policy)
    loss = lambda p, c=c: dit.DiT(c).apply({"params": p}, *inputs).sum()
    counts[policy] = len(_FA3_FWD_CALL.findall(jax.jit(jax.grad(loss)).lower(params).compile().as_text()))
  assert counts == {"full": 4, "save_attention": 2}, counts
