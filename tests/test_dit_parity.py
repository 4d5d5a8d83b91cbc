"""Parity of the Flax DiT with the reference PyTorch forward (golden fixtures, float32).

Goes through the user's path: reference ``.pt`` → ``torch_pt.load`` → ``convert.dit.torch_to_params`` →
``DiT.apply``. Every size comes from the fixture folder (config.json, array shapes); every folder
under the fixtures root whose config.json names ``MinimalV1LVGDiT`` is tested.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np
import pytest

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import torch_pt
from v2w_jax.models.dit import DiT
from v2w_jax.models.dit_config import DiTConfig

from conftest import fixtures_root

MAX_ABS = 5e-5
REL_L2 = 5e-6


def _dit_fixture_dirs() -> list[pathlib.Path]:
  root = fixtures_root()
  found = []
  for cfg_file in sorted(root.glob("*/config.json")) if root.is_dir() else []:
    try:
      ref = json.loads(cfg_file.read_text()).get("reference_class", "")
    except (OSError, json.JSONDecodeError):
      continue
    if ref.endswith("MinimalV1LVGDiT"):
      found.append(cfg_file.parent)
  return found


FIXTURES = _dit_fixture_dirs()


def _errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max()), float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _assert_close(got, want, what: str, max_abs: float = MAX_ABS, rel_l2: float = REL_L2) -> None:
  err_abs, err_rel = _errors(got, want)
  assert err_abs <= max_abs and err_rel <= rel_l2, (
      f"{what}: max-abs {err_abs:.3g} (tol {max_abs:g}), rel-L2 {err_rel:.3g} (tol {rel_l2:g})")


class Fixture:
  """One golden DiT folder, loaded lazily and cached."""

  def __init__(self, folder: pathlib.Path):
    self.folder = folder
    self.net = json.loads((folder / "config.json").read_text())["net"]
    self.inputs = dict(np.load(folder / "inputs.npz"))
    self.outputs = dict(np.load(folder / "outputs.npz"))

  def config(self, **options) -> DiTConfig:
    options.setdefault("dtype", "float32")
    options.setdefault("param_dtype", "float32")
    options.setdefault("remat_policy", "none")
    options.setdefault("attention_backend", "xla")  # fp32 attention (cuDNN would run it in bf16)
    return DiTConfig.from_reference_kwargs(self.net, **options)

  @functools.cache
  def state_dict(self, weights: str):
    return torch_pt.load(self.folder / f"model_ema_{weights}.pt")

  def params(self, cfg: DiTConfig, weights: str):
    return convert_dit.torch_to_params(self.state_dict(weights), cfg)

  def args(self, timesteps_key: str = "timesteps_B_T"):
    i = self.inputs
    return (i["x_B_C_T_H_W"], i[timesteps_key], i["crossattn_emb"], i["condition_video_input_mask_B_C_T_H_W"],
            i["padding_mask"])

  def run(self, cfg: DiTConfig, weights: str, timesteps_key: str = "timesteps_B_T") -> np.ndarray:
    params = self.params(cfg, weights)
    with jax.default_matmul_precision("highest"):
      return np.asarray(_jitted_apply(cfg)(params, *self.args(timesteps_key)))


@functools.cache
def _jitted_apply(cfg: DiTConfig):
  """One compiled forward per config (shared by the tests)."""
  return jax.jit(lambda p, *a: DiT(cfg).apply({"params": p}, *a))


@pytest.fixture(scope="module", params=FIXTURES, ids=[f.name for f in FIXTURES])
def fixture(request) -> Fixture:
  return Fixture(request.param)


def test_fixtures_found(fixtures_dir):
  assert FIXTURES, f"no DiT fixture folder (config.json with reference_class MinimalV1LVGDiT) in {fixtures_dir}"


# (rope_bf16_exponents, weights file, timesteps input, golden output key)
CASES = [
    (False, "fp32", "timesteps_B_T", "output"),
    (False, "fp32", "timesteps_B_1", "output_timesteps_B_1"),
    (True, "fp32", "timesteps_B_T", "output_bf16_rope_buffers"),
    (True, "bf16", "timesteps_B_T", "output_bf16_weights"),
]


@pytest.mark.parametrize("scan_blocks", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("bf16_rope,weights,timesteps,golden", CASES, ids=[c[3] for c in CASES])
def test_output_parity(fixture, scan_blocks, bf16_rope, weights, timesteps, golden):
  if not scan_blocks and golden != "output":
    pytest.skip("loop layout checked on the main case only")
  cfg = fixture.config(rope_bf16_exponents=bf16_rope, scan_blocks=scan_blocks)
  out = fixture.run(cfg, weights, timesteps)
  assert out.dtype == np.float32
  _assert_close(out, fixture.outputs[golden], f"{fixture.folder.name}/{golden}")


def test_remat_and_timestep_shapes_do_not_change_output(fixture):
  """Remat is numerically inert; [B] timesteps equal [B, 1]; None padding equals an all-zero mask."""
  base = fixture.config(rope_bf16_exponents=False)
  ref = fixture.outputs["output_timesteps_B_1"]
  for policy in ("full", "save_attention"):
    out = fixture.run(base.replace(remat_policy=policy), "fp32", "timesteps_B_1")
    _assert_close(out, ref, f"remat={policy}")
  params = fixture.params(base, "fp32")
  x, t1, text, cond, pad = fixture.args("timesteps_B_1")
  fn = _jitted_apply(base)
  with jax.default_matmul_precision("highest"):
    flat_t = np.asarray(fn(params, x, t1[:, 0], text, cond, pad))
    no_pad = np.asarray(fn(params, x, t1, text, cond, None))
    zero_pad = np.asarray(fn(params, x, t1, text, cond, np.zeros_like(pad)))
  np.testing.assert_allclose(flat_t, ref, atol=MAX_ABS)
  np.testing.assert_array_equal(no_pad, zero_pad)


def test_is_image_uses_a_zero_condition_channel(fixture):
  cfg = fixture.config(rope_bf16_exponents=False)
  params = fixture.params(cfg, "fp32")
  x, t, text, cond, pad = fixture.args()
  fn = jax.jit(lambda p, c, img: DiT(cfg).apply({"params": p}, x, t, text, c, pad, is_image=img),
               static_argnums=2)
  with jax.default_matmul_precision("highest"):
    as_image = np.asarray(fn(params, cond, True))
    zero_cond = np.asarray(fn(params, np.zeros_like(cond), False))
    video = np.asarray(fn(params, cond, False))
  np.testing.assert_array_equal(as_image, zero_cond)
  assert np.abs(as_image - video).max() > 1e-3


def test_negative_controls_exceed_tolerance(fixture):
  """The criterion can fail: a wrong RoPE exponent choice or a wrong timestep layout is detected."""
  exact = fixture.run(fixture.config(rope_bf16_exponents=False), "fp32")
  rounded = fixture.run(fixture.config(rope_bf16_exponents=True), "fp32")
  err_abs, err_rel = _errors(exact, fixture.outputs["output_bf16_rope_buffers"])
  assert err_abs > 2 * MAX_ABS and err_rel > 2 * REL_L2, (err_abs, err_rel)
  err_abs, err_rel = _errors(rounded, fixture.outputs["output"])
  assert err_abs > 2 * MAX_ABS and err_rel > 2 * REL_L2, (err_abs, err_rel)
  err_abs, _ = _errors(exact, fixture.outputs["output_timesteps_B_1"])
  assert err_abs > 2 * MAX_ABS


# intermediates.npz key -> path into the sown 'intermediates' collection (unscanned layout).
def _intermediate_paths(names: list[str], num_blocks: int) -> dict[str, tuple[str, ...]]:
  fixed = {
      "x_embedder_in_B_C_T_H_W": ("x_embedder_in",),
      "x_embedder_out_B_T_H_W_D": ("x_embedder_out",),
      "rope_angles_L_Dh": ("rope_angles",),
      "crossattn_proj_out_B_N_Cc": ("crossattn_proj_out",),
      "t_sinusoid_B_T_D": ("t_sinusoid",),
      "adaln_lora_B_T_3D": ("adaln_lora",),
      "t_embedding_B_T_D": ("t_embedding",),
      "final_adaln_noLoRA_B_T_2D": ("final_layer", "adaln_noLoRA"),
      "final_layer_out_B_T_H_W_O": ("final_layer", "out"),
  }
  for i in range(num_blocks):
    for branch in ("self_attn", "cross_attn", "mlp"):
      fixed[f"block{i}_adaln_{branch}_noLoRA_B_T_3D"] = (f"blocks_{i}", f"adaln_modulation_{branch}_noLoRA")
    fixed[f"block{i}_self_attn_out_B_L_D"] = (f"blocks_{i}", "self_attn_out")
    fixed[f"block{i}_cross_attn_out_B_L_D"] = (f"blocks_{i}", "cross_attn_out")
    fixed[f"block{i}_mlp_out_B_T_H_W_D"] = (f"blocks_{i}", "mlp_out")
    fixed[f"block{i}_out_B_T_H_W_D"] = (f"blocks_{i}", "out")
  unknown = [n for n in names if n not in fixed and n != "output_B_C_T_H_W"]
  assert not unknown, f"intermediates without a mapping: {unknown}"
  return {n: fixed[n] for n in names if n in fixed}


def test_intermediates(fixture):
  golden = dict(np.load(fixture.folder / "intermediates.npz"))
  cfg = fixture.config(rope_bf16_exponents=False, scan_blocks=False)
  params = fixture.params(cfg, "fp32")
  fn = jax.jit(lambda p, *a: DiT(cfg).apply({"params": p}, *a, mutable=["intermediates"]))
  with jax.default_matmul_precision("highest"):
    out, state = fn(params, *fixture.args())
  sown = state["intermediates"]
  for name, path in _intermediate_paths(sorted(golden), cfg.num_blocks).items():
    node = sown
    for k in path:
      node = node[k]
    (value,) = node
    _assert_close(np.asarray(value), golden[name], name)
  if "output_B_C_T_H_W" in golden:
    _assert_close(np.asarray(out), golden["output_B_C_T_H_W"], "output_B_C_T_H_W")


def test_bf16_compute_is_close_and_returns_fp32(fixture):
  """Default mixed precision (bf16 compute, fp32 islands) stays near the fp32 reference."""
  cfg = fixture.config(rope_bf16_exponents=True, dtype="bfloat16", param_dtype="bfloat16")
  out = fixture.run(cfg, "bf16")
  assert out.dtype == np.float32
  _, err_rel = _errors(out, fixture.outputs["output_bf16_weights"])
  assert err_rel < 3e-2, err_rel
