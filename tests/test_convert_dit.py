"""DiT checkpoint mapping: round trips, the reference bf16 conversion rule, strict errors, the CLI."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import torch_pt
from v2w_jax.models import dit
from v2w_jax.models.dit_config import DiTConfig

COUNTERS = tuple(f"net.{k}" for k in convert_dit._COUNTERS)


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
  folder = fixtures_dir / "dit_tiny"
  net = json.loads((folder / "config.json").read_text())["net"]
  return folder, net


def _cfg(net, **kw) -> DiTConfig:
  kw.setdefault("dtype", "float32")
  return DiTConfig.from_reference_kwargs(net, **kw)


def _materialise(state) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in state.items()}


@pytest.mark.parametrize("scan_blocks", [True, False], ids=["scan", "loop"])
def test_round_trip_fp32(tiny, scan_blocks):
  folder, net = tiny
  cfg = _cfg(net, scan_blocks=scan_blocks)
  original = _materialise(torch_pt.load(folder / "model_ema_fp32.pt"))
  params = convert_dit.torch_to_params(original, cfg)
  # Same tree as the model's own params.
  want = jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), dit.abstract_params(cfg))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want
  back = convert_dit.params_to_torch(params, cfg)
  assert set(back) == set(original)
  for key, value in original.items():
    if key in COUNTERS:
      assert back[key].shape == value.shape and not back[key].any(), key  # counters are reset
      continue
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_export_bf16_follows_reference_conversion_rule(tiny):
  """fp32 file → params → bf16 export equals the reference's own bf16 file (buffers rounded too)."""
  folder, net = tiny
  cfg = _cfg(net)
  params = convert_dit.torch_to_params(torch_pt.load(folder / "model_ema_fp32.pt"), cfg)
  exported = convert_dit.params_to_torch(params, cfg, dtype=ml_dtypes.bfloat16, lazy=True)
  reference = torch_pt.load(folder / "model_ema_bf16.pt")
  assert set(exported) == set(reference)
  for key in reference:
    if key in COUNTERS:
      continue
    got, want = np.asarray(exported[key]), np.asarray(reference[key])
    assert exported[key].shape == want.shape and np.dtype(exported[key].dtype) == want.dtype, key
    assert got.dtype == want.dtype, key
    np.testing.assert_array_equal(got.view(np.uint16) if got.dtype.itemsize == 2 else got,
                                  want.view(np.uint16) if want.dtype.itemsize == 2 else want, err_msg=key)


def test_bf16_file_loads_into_fp32_params_exactly(tiny):
  folder, net = tiny
  cfg = _cfg(net)
  sd = torch_pt.load(folder / "model_ema_bf16.pt")
  params = convert_dit.torch_to_params(sd, cfg)
  kernel = params["x_embedder"]["proj"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, np.asarray(sd["net.x_embedder.proj.1.weight"]).astype(np.float32).T)
  as_bf16 = convert_dit.torch_to_params(sd, cfg, dtype=ml_dtypes.bfloat16)
  assert as_bf16["blocks"]["mlp"]["layer1"]["kernel"].dtype == ml_dtypes.bfloat16


def test_optional_keys_and_single_read(tiny):
  """_extra_state / accum_* may be absent; each tensor is materialised exactly once."""
  folder, net = tiny
  cfg = _cfg(net)
  sd = torch_pt.load(folder / "model_ema_fp32.pt")
  reads: dict[str, int] = {}

  class Counting:
    def __init__(self, key, value):
      self.key, self.value, self.shape, self.dtype = key, value, value.shape, value.dtype

    def __array__(self, dtype=None, copy=None):
      reads[self.key] = reads.get(self.key, 0) + 1
      return np.asarray(self.value)

  lean = {k: Counting(k, v) for k, v in sd.items() if not (k.endswith("_extra_state") or k in COUNTERS)}
  convert_dit.torch_to_params(lean, cfg)
  table = convert_dit.key_table(cfg)
  assert all(reads.get("net." + k) == 1 for k in table), reads
  assert max(reads.values()) == 1


def test_strict_errors_list_every_bad_key(tiny):
  folder, net = tiny
  cfg = _cfg(net)
  sd = _materialise(torch_pt.load(folder / "model_ema_fp32.pt"))
  del sd["net.blocks.1.mlp.layer2.weight"]
  del sd["net.t_embedding_norm.weight"]
  sd["net.blocks.0.cross_attn.k_proj.weight"] = sd["net.blocks.0.cross_attn.k_proj.weight"].T.copy()
  sd["net.blocks.9.mlp.layer1.weight"] = np.zeros((4, 4), np.float32)
  sd["net_ema.x_embedder.proj.1.weight"] = np.zeros((4, 4), np.float32)
  sd["net.pos_embedder.dim_spatial_range"] = sd["net.pos_embedder.dim_spatial_range"] * 2
  with pytest.raises(ValueError) as err:
    convert_dit.torch_to_params(sd, cfg)
  msg = str(err.value)
  for key in ("missing: net.blocks.1.mlp.layer2.weight", "missing: net.t_embedding_norm.weight",
              "bad: net.blocks.0.cross_attn.k_proj.weight", "unknown: net.blocks.9.mlp.layer1.weight",
              "unknown: net_ema.x_embedder.proj.1.weight", "bad: net.pos_embedder.dim_spatial_range"):
    assert key in msg, (key, msg)
  assert len(msg.splitlines()) == 7, msg


def test_params_to_torch_is_strict(tiny):
  _, net = tiny
  cfg = _cfg(net)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dit.abstract_params(cfg))
  del params["final_layer"]["linear"]
  params["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  params["x_embedder"]["proj"]["kernel"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError) as err:
    convert_dit.params_to_torch(params, cfg)
  msg = str(err.value)
  assert "missing param final_layer/linear/kernel" in msg
  assert "unknown param extra/kernel" in msg
  assert "param x_embedder/proj/kernel: shape [3, 3]" in msg


def test_cli_round_trip(tiny, tmp_path):
  """fp32 .pt → orbax (CLI) → bf16 .pt (CLI) equals the reference bf16 file; torch can read it."""
  from tools import convert_torch_ckpt as cli

  folder, _ = tiny
  config = str(folder / "config.json")
  orbax_dir = tmp_path / "orbax"
  cli.main(["--input", str(folder / "model_ema_fp32.pt"), "--output", str(orbax_dir), "--config", config])
  out = tmp_path / "back.pt"
  cli.main(["--input", str(orbax_dir), "--output", str(out), "--config", config, "--dtype", "bfloat16"])
  got, want = torch_pt.load(out), torch_pt.load(folder / "model_ema_bf16.pt")
  assert set(got) == set(want)
  for key in want:
    if key not in COUNTERS:
      np.testing.assert_array_equal(np.asarray(got[key]).view(np.uint16) if want[key].dtype.itemsize == 2
                                    else np.asarray(got[key]),
                                    np.asarray(want[key]).view(np.uint16) if want[key].dtype.itemsize == 2
                                    else np.asarray(want[key]), err_msg=key)
  torch = pytest.importorskip("torch")
  loaded = torch.load(out, map_location="cpu", weights_only=True)
  assert loaded["net.blocks.0.mlp.layer1.weight"].dtype == torch.bfloat16
  assert cli.main(["--input", str(orbax_dir), "--output", str(out), "--config", config]) == 2  # exists


def test_cli_detects_kind():
  from tools import convert_torch_ckpt as cli

  assert cli.detect_kind(["net.x_embedder.proj.1.weight", "net.blocks.0.mlp.layer1.weight"]) == "dit"
  assert cli.detect_kind(["encoder.conv1.weight", "decoder.head.2.bias"]) == "vae"
