"""Tests for the torch-free checkpoint reader/writer, checked against torch itself."""

from __future__ import annotations

import os
import pathlib
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from v2w_jax.convert import torch_pt

torch = pytest.importorskip("torch")

_CHECKPOINTS = ["dit_tiny/model_ema_bf16.pt", "dit_tiny/model_ema_fp32.pt", "wan_vae_tiny/weights.pt"]


def _torch_to_numpy(t) -> np.ndarray:
  """Exact numpy copy of a torch tensor (bf16 via its bit pattern)."""
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _numpy_to_torch(a: np.ndarray):
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


def _assert_bit_equal(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
  assert actual.shape == expected.shape, name
  assert actual.dtype == expected.dtype, name
  assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), name


@pytest.mark.parametrize("rel", _CHECKPOINTS)
def test_fixture_checkpoints_match_torch(fixtures_dir: pathlib.Path, rel: str):
  path = fixtures_dir / rel
  ck = torch_pt.load(path)
  ref = torch.load(path, weights_only=True, map_location="cpu")
  assert list(ck) == list(ref)
  assert ck.unwrapped_from is None
  n_empty = 0
  for name, tensor in ref.items():
    lazy = ck[name]
    expected = _torch_to_numpy(tensor)
    assert lazy.shape == tuple(tensor.shape)
    assert lazy.dtype == expected.dtype
    assert lazy.numel == tensor.numel()
    _assert_bit_equal(np.asarray(lazy), expected, name)
    _assert_bit_equal(lazy.numpy(copy=True), expected, name)
    n_empty += tensor.numel() == 0
  if rel.startswith("dit_tiny"):
    assert n_empty > 0  # The `_extra_state` empties are exercised.


def test_contiguous_tensors_are_read_only_views(fixtures_dir: pathlib.Path):
  ck = torch_pt.load(fixtures_dir / _CHECKPOINTS[1])
  name, lazy = max(ck.items(), key=lambda kv: kv[1].numel)
  view = np.asarray(lazy)
  assert not view.flags.writeable  # A view into the read-only mmap, not a copy.
  copy = lazy.numpy(copy=True)
  assert copy.flags.writeable and not np.shares_memory(copy, view), name


def test_views_sharing_one_storage(tmp_path: pathlib.Path):
  base = torch.arange(60, dtype=torch.float32) * 0.5
  sd = {
      "base": base,
      "slice_offset": base[7:19],
      "strided": base[3:50:4],
      "matrix_t": base[:48].view(6, 8).t(),
      "block": base.view(6, 10)[1:4, 2:7],
      "expanded": base[5:8].view(3, 1).expand(3, 4),
      "scalar_view": base[11],
      "empty_view": base[4:4],
      "bf16_t": (torch.arange(24, dtype=torch.bfloat16) - 7).view(4, 6).t(),
  }
  path = tmp_path / "views.pt"
  torch.save(sd, path)
  ck = torch_pt.load(path)
  assert ck["matrix_t"].stride == (1, 8) and ck["slice_offset"]._offset == 7
  for name, tensor in sd.items():
    _assert_bit_equal(np.asarray(ck[name]), _torch_to_numpy(tensor), name)


def test_parameters_and_nested_wrapper(tmp_path: pathlib.Path):
  sd = {"w": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.zeros(4)}
  path = tmp_path / "wrapped.pt"
  torch.save({"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
  ck = torch_pt.load(path)
  assert ck.unwrapped_from == "model"
  assert set(ck) == {"w", "b"}
  _assert_bit_equal(np.asarray(ck["w"]), _torch_to_numpy(sd["w"]), "w")

  torch.save({"model": sd, "ema": sd}, path)
  with pytest.raises(torch_pt.TorchCheckpointError, match="key="):
    torch_pt.load(path)
  assert set(torch_pt.load(path, key="ema")) == {"w", "b"}

  torch.save({"w": torch.ones(2), "step": 7}, path)
  with pytest.raises(torch_pt.TorchCheckpointError, match=r"'step': int"):
    torch_pt.load(path)


class _Evil:
  """Pickles to a call of os.system that would create a marker file."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: pathlib.Path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  torch.save({"w": torch.ones(2), "x": _Evil(marker)}, path)
  with pytest.raises(torch_pt.UnsafeCheckpointError) as info:
    torch_pt.load(path)
  assert str(path) in str(info.value)
  assert "system" in str(info.value)
  assert not marker.exists()


def test_malicious_raw_pickle_in_zip_is_refused(tmp_path: pathlib.Path):
  marker = tmp_path / "pwned2"
  code = f"open({str(marker)!r}, 'w')".encode()
  payload = b"\x80\x02cbuiltins\nexec\nX" + struct.pack("<I", len(code)) + code + b"\x85R."
  path = tmp_path / "evil_raw.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil_raw/data.pkl", payload)
    z.writestr("evil_raw/version", "3\n")
  with pytest.raises(torch_pt.UnsafeCheckpointError, match="builtins.exec"):
    torch_pt.load(path)
  assert not marker.exists()


def test_legacy_format_gives_clear_error(tmp_path: pathlib.Path):
  path = tmp_path / "legacy.pt"
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(torch_pt.TorchCheckpointError, match="legacy torch format not supported"):
    torch_pt.load(path)
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"not a checkpoint at all")
  with pytest.raises(torch_pt.TorchCheckpointError, match="not a torch.save zip"):
    torch_pt.load(junk)


def _all_dtype_arrays() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      "f32": rng.standard_normal((3, 5)).astype(np.float32),
      "f32_special": np.array([np.inf, -np.inf, np.nan, -0.0, 1e-45], np.float32),
      # Every bf16 bit pattern (incl. NaN payloads, subnormals, -0).
      "bf16_all_bits": np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16),
      "f16": rng.standard_normal((2, 2, 2)).astype(np.float16),
      "f64": rng.standard_normal(4),
      "i64": np.array([[-(2**62), 0, 2**62 + 5]], np.int64),
      "i32": np.array([-7, 2**31 - 1], np.int32),
      "u8": np.arange(256, dtype=np.uint8),
      "bool": np.array([True, False, True]),
      "scalar_f32": np.array(3.25, np.float32),
      "scalar_bf16": np.array(-1.5, ml_dtypes.bfloat16),
      "scalar_i64": np.array(42, np.int64),
      "empty_f32": np.zeros((0,), np.float32),
      "empty_bf16_2d": np.zeros((4, 0), ml_dtypes.bfloat16),
      "non_contiguous": rng.standard_normal((4, 6)).astype(np.float32).T,
      "big_endian": np.array([1.0, 2.5], ">f4"),
  }


def test_save_roundtrip_through_torch(tmp_path: pathlib.Path):
  arrays = _all_dtype_arrays()
  path = tmp_path / "out.pt"
  torch_pt.save(path, arrays)
  ref = torch.load(path, weights_only=True)
  assert list(ref) == list(arrays)
  for name, arr in arrays.items():
    expected = arr.astype(arr.dtype.newbyteorder("=")) if not arr.dtype.isnative else arr
    _assert_bit_equal(_torch_to_numpy(ref[name]), expected, name)
  # mmap loading requires the 64-byte alignment torch uses.
  ref_mmap = torch.load(path, weights_only=True, mmap=True)
  _assert_bit_equal(_torch_to_numpy(ref_mmap["bf16_all_bits"]), arrays["bf16_all_bits"], "mmap")
  # And our own reader.
  ck = torch_pt.load(path)
  for name, arr in arrays.items():
    expected = arr.astype(arr.dtype.newbyteorder("=")) if not arr.dtype.isnative else arr
    _assert_bit_equal(np.asarray(ck[name]), expected, name)


def test_saved_entries_are_aligned(tmp_path: pathlib.Path):
  path = tmp_path / "aligned.pt"
  torch_pt.save(path, _all_dtype_arrays())
  data = path.read_bytes()
  with zipfile.ZipFile(path) as z:
    for info in z.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
      if "/data/" in info.filename:
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_save_streams_lazy_values_and_torch_reads_them(fixtures_dir: pathlib.Path, tmp_path: pathlib.Path):
  src = fixtures_dir / _CHECKPOINTS[0]
  path = tmp_path / "resaved.pt"
  torch_pt.save(path, torch_pt.load(src))  # LazyTensor values, materialised one at a time.
  ref = torch.load(src, weights_only=True)
  got = torch.load(path, weights_only=True)
  assert list(got) == list(ref)
  for name in ref:
    assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name


def test_save_reads_torch_saved_values_back(tmp_path: pathlib.Path):
  tensors = {"a": torch.randn(2, 3).to(torch.bfloat16), "b": torch.arange(5)}
  path = tmp_path / "from_torch.pt"
  torch_pt.save(path, {k: _torch_to_numpy(v) for k, v in tensors.items()})
  for k, v in torch.load(path, weights_only=True).items():
    assert torch.equal(v, tensors[k]), k


def test_save_is_atomic_on_error(tmp_path: pathlib.Path):
  path = tmp_path / "keep.pt"
  torch_pt.save(path, {"w": np.ones(3, np.float32)})
  before = path.read_bytes()

  class _Broken:
    shape = (3,)
    dtype = np.dtype(np.float32)

    def __array__(self, dtype=None, copy=None):
      raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    torch_pt.save(path, {"w": np.zeros(3, np.float32), "bad": _Broken()})
  with pytest.raises(TypeError, match="unsupported dtype"):
    torch_pt.save(path, {"s": np.array(["x"])})
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt"]


def test_zip64_entries_roundtrip(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
  """Shrinks the zip64 threshold so the >2 GiB code path (zip64 headers + alignment) runs on tiny data."""
  monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 4096)
  rng = np.random.default_rng(1)
  arrays = {f"w{i}": rng.standard_normal((300 + i,)).astype(np.float32) for i in range(12)}
  arrays["small"] = np.arange(3, dtype=np.int64)
  path = tmp_path / "zip64.pt"
  torch_pt.save(path, arrays)
  monkeypatch.undo()
  ref = torch.load(path, weights_only=True)
  ck = torch_pt.load(path)
  for name, arr in arrays.items():
    _assert_bit_equal(_torch_to_numpy(ref[name]), arr, name)
    _assert_bit_equal(np.asarray(ck[name]), arr, name)


def test_compressed_entries_fall_back_to_reading(fixtures_dir: pathlib.Path, tmp_path: pathlib.Path):
  src = fixtures_dir / _CHECKPOINTS[0]
  path = tmp_path / "deflated.pt"
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
      zout.writestr(info.filename, zin.read(info.filename))
  ref = torch.load(src, weights_only=True)
  ck = torch_pt.load(path)
  for name, tensor in ref.items():
    _assert_bit_equal(np.asarray(ck[name]), _torch_to_numpy(tensor), name)
