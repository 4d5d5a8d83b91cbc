"""Mesh construction from config.mesh and logical → mesh shardings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import nemo
from v2w_jax.parallel import rules as R
from v2w_jax.parallel import sharding as S
from v2w_jax.parallel.mesh import make_mesh, resolve_mesh_shape


@pytest.mark.parametrize(
    "cfg, n, want",
    [
        (dict(data=1, fsdp=-1, context=1), 8, (1, 8, 1)),
        (dict(data=2, fsdp=-1, context=1), 8, (2, 4, 1)),
        (dict(data=-1, fsdp=2, context=2), 8, (2, 2, 2)),
        (dict(data=2, fsdp=2, context=2), 8, (2, 2, 2)),
        (dict(data=1, fsdp=-1, context=1), 1, (1, 1, 1)),
        (dict(fsdp=-1), 4, (1, 4, 1)),  # missing axes default to 1
    ],
)
def test_resolve_mesh_shape(cfg, n, want):
  assert resolve_mesh_shape(cfg, n) == want


@pytest.mark.parametrize(
    "cfg, n, msg",
    [
        (dict(data=3, fsdp=-1, context=1), 8, "does not divide the 8 available devices"),
        (dict(data=2, fsdp=2, context=1), 8, "multiply to 4 but 8 devices"),
        (dict(data=-1, fsdp=-1, context=1), 8, "at most one axis may be -1"),
        (dict(data=0, fsdp=-1, context=1), 8, "positive or -1"),
        (dict(data=-2, fsdp=1, context=1), 8, "positive or -1"),
    ],
)
def test_resolve_mesh_shape_errors(cfg, n, msg):
  with pytest.raises(ValueError, match=msg):
    resolve_mesh_shape(cfg, n)


def test_make_mesh_single_device_from_config():
  mesh = make_mesh(nemo.get_config().mesh)
  assert mesh.axis_names == R.MESH_AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "context": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_mesh_sharding_and_batch():
  mesh = make_mesh(dict(data=1, fsdp=-1, context=1))
  specs = {"w": P(R.EMBED, R.MLP), "t": P(R.TEXT_IN, R.CROSS_EMBED), "b": P(R.MLP), "s": P()}
  out = S.logical_to_mesh_sharding(specs, mesh, R.DEFAULT_RULES)
  assert out["w"] == NamedSharding(mesh, P("fsdp", None))
  assert out["t"] == NamedSharding(mesh, P("fsdp", None))
  assert out["b"].spec == P(None) and out["s"].spec == P()
  assert S.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert S.replicated(mesh).spec == P()
  # Custom rules are honoured (e.g. pure data parallel: nothing sharded).
  out = S.logical_to_mesh_sharding(specs, mesh, ((R.EMBED, None), (R.TEXT_IN, None)))
  assert out["w"].spec == P(None, None)


_WORKER = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from v2w_jax.parallel.mesh import make_mesh
    from v2w_jax.parallel import sharding as S
    from v2w_jax.parallel import rules as R
    out = {"devices": jax.device_count()}
    for name, cfg in {"d2": dict(data=2, fsdp=-1, context=1), "f8": dict(data=1, fsdp=-1, context=1),
                      "c2": dict(data=2, fsdp=2, context=2)}.items():
      out[name] = dict(make_mesh(cfg).shape)
    try:
      make_mesh(dict(data=3, fsdp=-1, context=1))
    except ValueError as e:
      out["error"] = str(e)
    mesh = make_mesh(dict(data=2, fsdp=-1, context=1))
    # Non-dividing dims are replicated when shapes are given: 12 % 4 == 0, 6 % 4 != 0.
    specs = {"a": P(R.EMBED, None), "b": P(R.EMBED, None)}
    shapes = {"a": jax.ShapeDtypeStruct((12, 3), jnp.float32), "b": jax.ShapeDtypeStruct((6, 3), jnp.float32)}
    sh = S.logical_to_mesh_sharding(specs, mesh, R.DEFAULT_RULES, shapes=shapes)
    out["fit"] = [str(sh["a"].spec), str(sh["b"].spec)]
    x = jax.device_put(jnp.arange(16.0).reshape(8, 2), S.batch_sharding(mesh))
    out["batch_shard_rows"] = sorted({s.data.shape[0] for s in x.addressable_shards})
    print("RESULT" + json.dumps(out))
    """
)


def test_mesh_on_8_fake_devices(repo_root):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(repo_root))
  proc = subprocess.run([sys.executable, "-c", _WORKER], cwd=repo_root, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  assert out["devices"] == 8
  assert out["d2"] == {"data": 2, "fsdp": 4, "context": 1}
  assert out["f8"] == {"data": 1, "fsdp": 8, "context": 1}
  assert out["c2"] == {"data": 2, "fsdp": 2, "context": 2}
  assert "does not divide the 8 available devices" in out["error"]
  assert out["fit"] == [str(P("fsdp", None)), str(P(None, None))]
  assert out["batch_shard_rows"] == [1]  # 8 rows over data×fsdp = 8 devices
