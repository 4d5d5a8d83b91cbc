"""Save the sharded 2B train state on N devices, restore it on M (issue 10, item 3).

Two processes, because a process's device count is fixed at start:

    python -m benchmarks.checkpoint_reshard save    --dir=/tmp/ck --fsdp=2 --json=save.json
    CUDA_VISIBLE_DEVICES=0 python -m benchmarks.checkpoint_reshard restore --dir=/tmp/ck --fsdp=1 --json=restore.json

``save`` builds the trainer's state on its mesh (already sharded), moves every leaf off its
initial value (so the Adam moments are not all zeros), saves it with the trainer's own
``Checkpointer`` (orbax, atomic step folder) and records a fingerprint of every leaf: a few
exact elements at fixed flat positions and the float64 sum. ``restore`` builds the abstract state
for *its* mesh, restores into those shardings (each device reads only its shards) and checks the
fingerprint: the exact elements must be equal bit for bit, the sums to float32 rounding. Both
report their times, the bytes on disk and the peak device memory. ``--tiny`` uses configs/tiny.py
(a CPU check of the same path).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import nemo, tiny
from v2w_jax.parallel import mesh as mesh_lib
from v2w_jax.training import checkpoint as ckpt_lib
from v2w_jax.training import optim as optim_lib
from v2w_jax.training import trainer

STEP = 7
SAMPLES = 8  # exact elements checked per leaf


def _setup(args):
  config = tiny.get_config() if args.tiny else nemo.get_config()
  for axis in ("data", "fsdp", "context"):
    config.mesh[axis] = getattr(args, axis)
  mesh = mesh_lib.make_mesh(config.mesh)
  tx = optim_lib.make_optimizer(config)
  abstract_state, state_sh, initial_state = trainer.build_state(config, mesh, trainer.dit_config(config), tx)
  return mesh, abstract_state, state_sh, initial_state


def _perturb(state, state_sh):
  """Every float leaf plus a leaf-specific pattern, computed in place on its shards."""

  def move(i, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x + 1
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), i), x.shape, jnp.float32)
    return (x.astype(jnp.float32) + 1e-3 * noise).astype(x.dtype)

  leaves, treedef = jax.tree.flatten(state)
  fn = jax.jit(lambda ls: [move(i, x) for i, x in enumerate(ls)],
               out_shardings=jax.tree.leaves(state_sh), donate_argnums=0)
  return jax.tree.unflatten(treedef, fn(leaves))


def _fingerprint(state) -> list[dict]:
  """Per leaf: the values at a few fixed flat positions and the float64 sum (one jitted program)."""
  paths, leaves = zip(*jax.tree.flatten_with_path(state)[0])
  positions = []
  for x in leaves:
    n = int(np.prod(x.shape))
    positions.append(sorted({0, n - 1, *np.random.default_rng(n).integers(0, max(n, 1), SAMPLES - 2).tolist()}))

  @jax.jit
  def probe(ls):
    return [(jnp.ravel(x)[np.asarray(i)], jnp.sum(x.astype(jnp.float32))) for x, i in zip(ls, positions)]

  probed = jax.device_get(probe(list(leaves)))
  return [{"leaf": jax.tree_util.keystr(path), "idx": idx, "values": np.asarray(v, np.float64).tolist(),
           "sum": float(total)} for path, idx, (v, total) in zip(paths, positions, probed)]


def _disk_bytes(folder: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save(args) -> dict:
  mesh, _, state_sh, initial_state = _setup(args)
  t0 = time.perf_counter()
  state = jax.block_until_ready(_perturb(initial_state(), state_sh))
  init_s = time.perf_counter() - t0
  prints = _fingerprint(state)
  ck = ckpt_lib.Checkpointer(args.dir, keep=2)
  t0 = time.perf_counter()
  ck.save(STEP, state, None, {"step": STEP, "mesh": dict(mesh.shape)}, force=True)
  blocking_s = time.perf_counter() - t0
  ck.close()
  total_s = time.perf_counter() - t0
  (pathlib.Path(args.dir) / "fingerprint.json").write_text(json.dumps(prints))
  return {"mode": "save", "mesh": dict(mesh.shape), "devices": mesh.size, "init_s": init_s,
          "save_blocking_s": blocking_s, "save_total_s": total_s, "leaves": len(prints),
          "disk_gib": _disk_bytes(pathlib.Path(args.dir) / str(STEP)) / 2**30,
          "peak_gib": common.peak_memory_gib()}


def restore(args) -> dict:
  mesh, abstract_state, _, _ = _setup(args)
  ck = ckpt_lib.Checkpointer(args.dir, keep=2)
  if ck.latest_step() != STEP:
    raise SystemExit(f"error: {args.dir} holds steps {ck.all_steps()}, expected {STEP} (run `save` first)")
  t0 = time.perf_counter()
  state, meta = ck.restore(STEP, abstract_state, None)
  state = jax.block_until_ready(state)
  restore_s = time.perf_counter() - t0
  ck.close()
  saved = json.loads((pathlib.Path(args.dir) / "fingerprint.json").read_text())
  now = _fingerprint(state)
  mismatched = [a["leaf"] for a, b in zip(saved, now, strict=True)
                if a["leaf"] != b["leaf"] or a["idx"] != b["idx"] or a["values"] != b["values"]
                or not np.isclose(a["sum"], b["sum"], rtol=1e-5, atol=1e-3)]
  shardings_ok = all(x.sharding == a.sharding for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)))
  return {"mode": "restore", "saved_on": meta["mesh"], "mesh": dict(mesh.shape), "devices": mesh.size,
          "restore_s": restore_s, "leaves": len(now), "mismatched_leaves": mismatched,
          "shardings_as_requested": shardings_ok, "equal": not mismatched and shardings_ok,
          "peak_gib": common.peak_memory_gib()}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("mode", choices=["save", "restore"])
  ap.add_argument("--dir", required=True, help="checkpoint folder (save: created fresh)")
  for axis, default in (("data", 1), ("fsdp", -1), ("context", 1)):
    ap.add_argument(f"--{axis}", type=int, default=default, help=f"mesh {axis} axis (-1: the rest)")
  ap.add_argument("--tiny", action="store_true", help="configs/tiny.py instead of the 2B model")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  result = {"device": common.device_info(), "result": (save if args.mode == "save" else restore)(args)}
  print(json.dumps(result, default=float), flush=True)
  common.write_json(args.json, result)
  if args.mode == "restore" and not result["result"]["equal"]:
    raise SystemExit("error: the restored state differs from the saved one")


if __name__ == "__main__":
  main()
