"""The inference pipeline on a device mesh (4 forced CPU devices) matches the single-device result.

Runs in a subprocess because the CPU device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from configs import tiny
    from v2w_jax.inference import weights
    from v2w_jax.inference.pipeline import GenerationRequest, Video2WorldPipeline
    from v2w_jax.models.dit_config import DiTConfig
    from v2w_jax.models.vae import VAEConfig
    from v2w_jax.parallel.mesh import make_mesh
    assert jax.device_count() == 4, jax.devices()
    c = tiny.get_config()
    dcfg, vcfg = DiTConfig.from_config(c.model), VAEConfig.from_config(c.vae)
    dp, vp = weights.random_dit_params(dcfg, 0), weights.random_vae_params(vcfg, 0)
    rng = np.random.default_rng(0)
    text, neg = (rng.standard_normal((16, dcfg.text_in_channels)).astype(np.float32) for _ in range(2))
    cond = rng.integers(0, 256, (3, 1, 32, 48), dtype=np.uint8)
    req = GenerationRequest(text, neg, cond, 1, 9, (32, 48), seed=0, guidance=7.0, num_steps=2)
    ref = Video2WorldPipeline(dcfg, vcfg, dp, vp).generate(req).latents
    mesh = make_mesh({"data": 2, "fsdp": 1, "context": 2})
    got = Video2WorldPipeline(dcfg, vcfg, dp, vp, mesh=mesh).generate(req).latents
    err = float(np.abs(got - ref).max())
    print("max_abs_err", err)
    assert err < 1e-4, err
""")


def test_mesh_matches_single_device(repo_root):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo_root),
             XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
  r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=repo_root, env=env, capture_output=True, text=True,
                     timeout=600, check=False)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert "max_abs_err" in r.stdout
