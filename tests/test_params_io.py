"""Tests for params-only orbax checkpoints (round trip, dtype cast, sharded restore, mismatch errors)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from v2w_jax.convert import params_io


def _params() -> dict:
  rng = np.random.default_rng(0)
  return {
      "embed": {"kernel": rng.standard_normal((8, 4)).astype(np.float32),
                "bias": rng.standard_normal((4,)).astype(np.float32)},
      "blocks": {"0": {"w": jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16)}},
      "scale": np.array(0.5, np.float32),
      "steps": np.arange(3, dtype=np.int64),
  }


def _bits(a) -> bytes:
  return np.ascontiguousarray(np.asarray(a)).tobytes()


def test_roundtrip_numpy_and_metadata(tmp_path: pathlib.Path):
  params = _params()
  meta = {"source": "/x/model_ema_bf16.pt", "kind": "dit", "dtype": "bfloat16", "config": {"d": 128}}
  path = tmp_path / "ckpt"
  params_io.save_params(path, params, metadata=meta)
  assert params_io.load_metadata(path) == meta
  restored = params_io.load_params(path)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want)
    assert _bits(got) == _bits(want)
  abstract = params_io.abstract_from_checkpoint(path)
  assert abstract["blocks"]["0"]["w"] == jax.ShapeDtypeStruct((4, 6), jnp.bfloat16)


def test_save_refuses_existing_unless_overwrite(tmp_path: pathlib.Path):
  path = tmp_path / "ckpt"
  params_io.save_params(path, {"a": np.zeros(2, np.float32)})
  with pytest.raises(FileExistsError, match=str(path)):
    params_io.save_params(path, {"a": np.ones(2, np.float32)})
  params_io.save_params(path, {"a": np.ones(2, np.float32)}, metadata={"v": 2}, overwrite=True)
  assert np.array_equal(params_io.load_params(path)["a"], np.ones(2, np.float32))
  assert params_io.load_metadata(path) == {"v": 2}


def test_dtype_cast_and_single_device_sharding(tmp_path: pathlib.Path):
  params = _params()
  path = tmp_path / "ckpt"
  params_io.save_params(path, params)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.bfloat16 if np.asarray(x).dtype ==
                                                         np.float32 else np.asarray(x).dtype, sharding=device),
                          params)
  abstract["steps"] = jax.ShapeDtypeStruct((3,), np.int32)  # No sharding -> numpy, cast to int32.
  restored = params_io.load_params(path, abstract)
  kernel = restored["embed"]["kernel"]
  assert isinstance(kernel, jax.Array) and kernel.dtype == jnp.bfloat16 and kernel.sharding == device
  expected = params["embed"]["kernel"].astype(ml_dtypes.bfloat16)  # Round-to-nearest-even, like XLA.
  assert _bits(kernel) == _bits(expected)
  assert restored["scale"].shape == () and float(restored["scale"]) == 0.5
  assert isinstance(restored["steps"], np.ndarray) and restored["steps"].dtype == np.int32
  assert restored["steps"].tolist() == [0, 1, 2]


def test_mismatch_error_lists_every_difference(tmp_path: pathlib.Path):
  path = tmp_path / "ckpt"
  params_io.save_params(path, {"a": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)},
                               "extra": np.zeros(1, np.float32)})
  abstract = {"a": {"w": jax.ShapeDtypeStruct((3, 2), np.float32), "b": jax.ShapeDtypeStruct((3,), np.float32)},
              "new": jax.ShapeDtypeStruct((5,), np.float32)}
  with pytest.raises(params_io.ParamsMismatchError) as info:
    params_io.load_params(path, abstract)
  msg = str(info.value)
  assert str(path) in msg
  assert "missing in checkpoint (1)" in msg and "new" in msg
  assert "unexpected in checkpoint (1)" in msg and "extra" in msg
  assert "a/w: checkpoint (2, 3) vs requested (3, 2)" in msg
  assert "a/b" not in msg


def test_bad_paths_and_inputs(tmp_path: pathlib.Path):
  with pytest.raises(FileNotFoundError, match="nope"):
    params_io.load_params(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a params checkpoint"):
    params_io.load_params(tmp_path / "empty")
  with pytest.raises(TypeError, match="JSON"):
    params_io.save_params(tmp_path / "x", {"a": np.zeros(1)}, metadata={"bad": object()})
  with pytest.raises(TypeError, match="not an array"):
    params_io.save_params(tmp_path / "x", {"a": object()})
  assert not (tmp_path / "x").exists()


_SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, ml_dtypes
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from v2w_jax.convert import params_io
    assert jax.device_count() == 4, jax.devices()
    path = sys.argv[1]
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((8, 12)).astype(np.float32),
              "b": rng.standard_normal((12,)).astype(np.float32)}
    params_io.save_params(path, params, metadata={"kind": "test"})
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    abstract = {"w": jax.ShapeDtypeStruct((8, 12), jnp.bfloat16, sharding=NamedSharding(mesh, P("data", "model"))),
                "b": jax.ShapeDtypeStruct((12,), jnp.float32, sharding=NamedSharding(mesh, P("model")))}
    out = params_io.load_params(path, abstract)
    for k in ("w", "b"):
      assert out[k].sharding == abstract[k].sharding, (k, out[k].sharding)
      assert out[k].dtype == abstract[k].dtype, (k, out[k].dtype)
    assert {s.data.shape for s in out["w"].addressable_shards} == {(4, 6)}
    assert {s.data.shape for s in out["b"].addressable_shards} == {(6,)}
    want_w = params["w"].astype(ml_dtypes.bfloat16)
    for s in out["w"].addressable_shards:
      assert np.asarray(s.data).tobytes() == np.ascontiguousarray(want_w[s.index]).tobytes(), s.index
    assert np.asarray(out["b"]).tobytes() == params["b"].tobytes()
    print("SHARDED_OK")
""")


def test_restore_into_sharded_mesh_subprocess(tmp_path: pathlib.Path, repo_root: pathlib.Path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path / "ckpt")], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
