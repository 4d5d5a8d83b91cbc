"""Context parallelism on GPUs (issue 7/10): equivalence, compiled program, saved residuals, timing.

Needs 2 GPUs (kind nvidia-h200-x2). Checks, in order:
1. float32 with XLA attention: context 2 equals one device (output and every gradient);
2. bf16 with cuDNN attention inside ``shard_map``: context 2 vs one device, under the
   ``save_attention`` and ``full`` remat policies; the compiled program's all-to-alls and cuDNN calls;
3. the residuals ``save_attention`` keeps under context parallelism;
4. timing of two blocks at the 2B width and the recipe's 84,480 tokens, context 1 vs 2.

    python3 -m benchmarks.context_parallel            # on 2 GPUs
    CPU_DRY=1 XLA_FLAGS=--xla_force_host_platform_device_count=2 python3 -m benchmarks.context_parallel
"""

from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from v2w_jax.models import dit
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.parallel.mesh import make_mesh


def setup(cfg, b, t, h, w, n, seed=0):
  rng = np.random.default_rng(seed)
  inputs = (rng.standard_normal((b, cfg.in_channels, t, h, w)).astype(np.float32),
            rng.uniform(0, 1000, (b, 1)).astype(np.float32),
            rng.standard_normal((b, n, cfg.text_in_channels)).astype(np.float32),
            np.ones((b, 1, t, h, w), np.float32) * (np.arange(t) < 1)[None, None, :, None, None])
  ct = rng.standard_normal((b, cfg.out_channels, t, h, w)).astype(np.float32)
  return inputs, ct

def run(cfg, params, inputs, ct, sizes, ndev, reps=0):
  mesh = make_mesh(sizes, devices=jax.devices()[:ndev])
  specs = nn.get_partition_spec(dit.abstract_variables(cfg))["params"]
  p = jax.device_put(params, nn.logical_to_mesh_sharding(specs, mesh, cfg.logical_axis_rules))
  args = jax.device_put(inputs, NamedSharding(mesh, P(("data", "fsdp"))))
  ctd = jax.device_put(ct, NamedSharding(mesh, P(("data", "fsdp"))))
  f = dit.apply_fn(cfg)
  def loss(p, c, *a):
    out = f(p, *a)
    return jnp.sum(out * c), out
  g = jax.jit(jax.grad(loss, has_aux=True))
  with jax.set_mesh(mesh):
    t0 = time.time(); comp = g.lower(p, ctd, *args).compile(); tc = time.time() - t0
    grads, out = comp(p, ctd, *args); jax.block_until_ready(out)
    times = []
    for _ in range(reps):
      t0 = time.perf_counter(); r = comp(p, ctd, *args); jax.block_until_ready(r); times.append(time.perf_counter() - t0)
  hlo = comp.as_text()
  info = dict(compile_s=round(tc, 1), a2a=sum(1 for l in hlo.splitlines() if "all-to-all(" in l and "self_attn" in l),
              cudnn=hlo.count("__cudnn$fmha"), step_ms=[round(1e3 * x, 2) for x in times])
  return jax.tree.map(np.asarray, grads), np.asarray(out), info

def rel(a, b):
  a = np.asarray(a, np.float64); b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

def compare(tag, r0, r1):
  g0, o0, _ = r0; g1, o1, i1 = r1
  ge = max((rel(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))), key=lambda x: x[0])
  print(tag, "out rel(l2,max)", rel(o1, o0), "worst grad rel", ge, i1, flush=True)

def main():
  print(jax.__version__, jax.devices(), flush=True)
  small = DiTConfig(model_channels=256, num_heads=4, num_blocks=2, adaln_lora_dim=32, crossattn_emb_channels=64,
                    crossattn_proj_in_channels=96, param_dtype="float32", scan_blocks=True)
  inputs, ct = setup(small, 2, 8, 32, 32, 16)
  leaves, td = jax.tree.flatten(dit.abstract_params(small))
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(td, [(0.05 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves])

  # 1) float32 xla: CP must equal unsharded on GPU too.
  with jax.default_matmul_precision("highest"):
    c = small.replace(dtype="float32", attention_backend="xla", remat_policy="none")
    r0 = run(c, params, inputs, ct, dict(data=1, fsdp=1, context=1), 1)
    compare("fp32 xla cp2", r0, run(c, params, inputs, ct, dict(data=1, fsdp=1, context=2), 2))
  if os.environ.get("CPU_DRY"):  # the CPU part only (2 fake devices)
    return
  # 2) bf16 cudnn, save_attention remat: CP vs unsharded, and vs no-remat.
  c = small.replace(dtype="bfloat16", attention_backend="cudnn", remat_policy="save_attention")
  r0 = run(c, params, inputs, ct, dict(data=1, fsdp=1, context=1), 1)
  print("ref cudnn", r0[2])
  compare("bf16 cudnn cp2 save_attention", r0, run(c, params, inputs, ct, dict(data=1, fsdp=1, context=2), 2))
  def unstack(tree, n):
    out = {k: v for k, v in tree.items() if k != "blocks"}
    out.update({f"blocks_{i}": jax.tree.map(lambda a, i=i: a[i], tree["blocks"]) for i in range(n)})
    return out
  r1 = run(c.replace(remat_policy="full", scan_blocks=False), unstack(params, 2), inputs, ct,
           dict(data=1, fsdp=1, context=2), 2)
  compare("bf16 cudnn cp2 full/noscan", (unstack(r0[0], 2), r0[1], r0[2]), r1)
  # residuals saved under save_attention with CP
  mesh = make_mesh(dict(data=1, fsdp=1, context=2), devices=jax.devices()[:2])
  c1 = c.replace(scan_blocks=False, num_blocks=1)
  p1 = unstack(params, 1)
  with jax.set_mesh(mesh):
    print_saved_residuals(lambda p: jnp.sum(dit.apply_fn(c1)(p, *inputs)), p1)

  # 3) timing at the 2B width and the recipe's token count (2 blocks), cp=1 vs cp=2.
  big = DiTConfig(num_blocks=2, attention_backend="cudnn", remat_policy="save_attention")
  inputs, ct = setup(big, 1, 24, 88, 160, 512)
  leaves, td = jax.tree.flatten(dit.abstract_params(big))
  params = jax.tree.unflatten(td, [(0.02 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves])
  del leaves
  for sizes, nd in ((dict(data=1, fsdp=1, context=1), 1), (dict(data=1, fsdp=1, context=2), 2)):
    _, _, info = run(big, params, inputs, ct, sizes, nd, reps=5)
    print("2B-width 2 blocks", sizes, info, flush=True)


if __name__ == "__main__":
  main()
