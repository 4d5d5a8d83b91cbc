"""Multi-process start-up: one contract for every launcher.

All launchers in ``launch/`` export the same variables (set none of them for a single process):

``V2W_COORDINATOR_ADDRESS``  host:port of process 0's coordinator service
``V2W_NUM_PROCESSES``        total number of JAX processes (usually one per host)
``V2W_PROCESS_ID``           this process's index, 0 .. V2W_NUM_PROCESSES-1
``V2W_CPU_DEVICES``          (CPU only, tests) devices per process

Under SLURM or Kubernetes with none of them set, ``jax.distributed.initialize()`` auto-detects the
cluster (``V2W_AUTO_DISTRIBUTED=1`` asks for that explicitly).
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  coordinator_address: str | None
  num_processes: int
  process_id: int
  cpu_devices: int | None
  auto: bool


def process_spec_from_env(env: dict[str, str] | None = None) -> ProcessSpec:
  """Reads the launch contract; raises a clear error on an incomplete or inconsistent set."""
  env = dict(os.environ if env is None else env)
  num = env.get("V2W_NUM_PROCESSES")
  pid = env.get("V2W_PROCESS_ID")
  addr = env.get("V2W_COORDINATOR_ADDRESS")
  cpu = env.get("V2W_CPU_DEVICES")
  auto = env.get("V2W_AUTO_DISTRIBUTED", "0") == "1"
  given = {k: v for k, v in (("V2W_NUM_PROCESSES", num), ("V2W_PROCESS_ID", pid),
                             ("V2W_COORDINATOR_ADDRESS", addr)) if v}
  if given and len(given) != 3:
    missing = sorted({"V2W_NUM_PROCESSES", "V2W_PROCESS_ID", "V2W_COORDINATOR_ADDRESS"} - set(given))
    raise ValueError(f"multi-process launch needs all of V2W_NUM_PROCESSES, V2W_PROCESS_ID and "
                     f"V2W_COORDINATOR_ADDRESS; missing: {', '.join(missing)}")
  num_i = int(num) if num else 1
  pid_i = int(pid) if pid else 0
  if not 0 <= pid_i < num_i:
    raise ValueError(f"V2W_PROCESS_ID={pid_i} is outside 0..{num_i - 1} (V2W_NUM_PROCESSES={num_i})")
  return ProcessSpec(addr, num_i, pid_i, int(cpu) if cpu else None, auto)


def initialize(spec: ProcessSpec | None = None) -> ProcessSpec:
  """Configures CPU device count and joins the process group. Call once, first thing in main."""
  spec = spec or process_spec_from_env()
  if spec.cpu_devices:
    jax.config.update("jax_num_cpu_devices", spec.cpu_devices)
  if spec.num_processes > 1:
    jax.distributed.initialize(coordinator_address=spec.coordinator_address,
                               num_processes=spec.num_processes, process_id=spec.process_id)
  elif spec.auto:
    jax.distributed.initialize()
  return spec
