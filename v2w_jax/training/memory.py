"""Device memory of the compiled train step, known before the first step.

The trainer compiles the step ahead of time from abstract shapes (nothing is allocated) and reads
XLA's memory analysis of the compiled program(s), per device: the train state (donated, so the step
writes it in place), the batch, the temporaries (activations kept for the backward, gradients, kernel
workspace) and the peak = arguments + outputs − aliased outputs + temporaries. It prints that at start
(``--config.trainer.dry_run=True`` does only that) and stops a configuration whose peak does not fit the
device before any data is read, naming the settings that lower memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

GIB = 2**30


def _gib(n: float) -> float:
  return n / GIB


def fmt_bytes(n: float) -> str:
  """'30.8 GiB', or MiB below one GiB (tiny models)."""
  return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """XLA's memory analysis of one compiled program, bytes per device."""

  name: str
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  generated_code: int = 0
  host_arguments: int = 0
  host_temporaries: int = 0
  compiler_peak: int = 0  # memory_analysis().peak_memory_in_bytes where the backend reports it

  @classmethod
  def from_compiled(cls, name: str, compiled: Any) -> "ProgramMemory":
    m = compiled.memory_analysis()
    get = lambda field: int(getattr(m, field, 0) or 0)
    return cls(name=name, arguments=get("argument_size_in_bytes"), outputs=get("output_size_in_bytes"),
               aliased=get("alias_size_in_bytes"), temporaries=get("temp_size_in_bytes"),
               generated_code=get("generated_code_size_in_bytes"),
               host_arguments=get("host_argument_size_in_bytes"),
               host_temporaries=get("host_temp_size_in_bytes"), compiler_peak=get("peak_memory_in_bytes"))

  @property
  def peak(self) -> int:
    """Live bytes at the worst point: inputs, outputs not written over inputs, and temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries

  def as_dict(self) -> dict[str, Any]:
    d = {f"{k}_gib": _gib(v) for k, v in dataclasses.asdict(self).items() if k != "name"}
    return {"name": self.name, **d, "peak_gib": _gib(self.peak)}


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """The train step's memory per device: its state (device and pinned host) and its programs."""

  state: int
  state_host: int
  programs: tuple[ProgramMemory, ...]

  @property
  def peak(self) -> int:
    return max(p.peak for p in self.programs)

  @property
  def temporaries(self) -> int:
    return max(p.temporaries for p in self.programs)

  @property
  def main(self) -> ProgramMemory:
    return max(self.programs, key=lambda p: p.peak)

  def summary(self, limit: int | None = None) -> str:
    host = f" (+ {fmt_bytes(self.state_host)} in pinned host memory)" if self.state_host else ""
    of = f" of {fmt_bytes(limit)}" if limit else ""
    batch = max(0, self.main.arguments - self.state)
    return (f"train step memory per device (compiled): state {fmt_bytes(self.state)}{host}, batch "
            f"{fmt_bytes(batch)}, temporaries {fmt_bytes(self.temporaries)}, peak {fmt_bytes(self.peak)}{of}")

  def as_dict(self) -> dict[str, Any]:
    return {"state_gib": _gib(self.state), "state_host_gib": _gib(self.state_host),
            "temporaries_gib": _gib(self.temporaries), "peak_gib": _gib(self.peak),
            "programs": [p.as_dict() for p in self.programs]}


def per_device_bytes(tree: Any) -> tuple[int, int]:
  """(device, pinned host) bytes one device holds of a tree of arrays / sharded ShapeDtypeStructs."""
  device = host = 0
  for a in jax.tree.leaves(tree):
    sharding = getattr(a, "sharding", None)
    shape = sharding.shard_shape(a.shape) if sharding is not None else a.shape
    n = math.prod(shape) * jnp.dtype(a.dtype).itemsize
    if getattr(sharding, "memory_kind", None) in ("pinned_host", "unpinned_host"):
      host += n
    else:
      device += n
  return device, host


def step_memory(compiled_step: Any, abstract_state: Any) -> StepMemory:
  """StepMemory of a ``training.step.CompiledTrainStep`` (its ``programs``) and its state."""
  device, host = per_device_bytes(abstract_state)
  programs = tuple(ProgramMemory.from_compiled(n, c) for n, c in compiled_step.programs.items())
  return StepMemory(state=device, state_host=host, programs=programs)


def abstract_batch(config: Any, mesh: jax.sharding.Mesh, dit_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch the trainer feeds the step (VAE latents, text embeddings, padding mask), as sharded
  shapes: what the step is compiled for before any data is read."""
  from v2w_jax.parallel import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

  b = int(config.data.global_batch_size)
  t = 1 + (int(config.data.num_frames) - 1) // 4
  h, w = (int(s) for s in config.data.video_size)
  shapes = {
      "latents": ((b, dit_cfg.in_channels, t, h // 8, w // 8), jnp.float32),
      "text_embeddings": ((b, int(config.data.text_tokens), dit_cfg.text_in_channels), jnp.bfloat16),
      "padding_mask": ((b, 1, h, w), jnp.float32),
  }
  batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
  shardings = sharding_lib.batch_shardings_for(batch, mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}


def device_budget(trainer_config: Any, device: Any = None) -> tuple[int | None, int]:
  """(memory limit, bytes already in use) of a device: ``trainer.memory_limit_gib`` when > 0 (e.g. to
  check a configuration for a smaller GPU), else the allocator's ``bytes_limit``; None when unknown
  (CPU)."""
  device = jax.local_devices()[0] if device is None else device
  stats = device.memory_stats() or {}
  in_use = int(stats.get("bytes_in_use", 0))
  override = float(trainer_config.get("memory_limit_gib", 0.0) or 0.0)
  if override > 0:
    return int(override * GIB), in_use
  limit = stats.get("bytes_limit")
  return (int(limit) if limit else None), in_use


def lower_memory_settings(config: Any) -> list[str]:
  """The flags that lower the step's memory, cheapest in time first, leaving out those already set."""
  out = []
  ema = config.ema
  if bool(ema.get("enabled", True)) and not bool(ema.get("offload", False)):
    out.append("--config.ema.offload=True (EMA in host memory)")
  if str(config.optim.get("precision", "fp32_master")) != "reference_bf16":
    out.append("--config.optim.precision=reference_bf16 --config.model.param_dtype=bfloat16 (bf16 parameters "
               "and Adam state)")
  if str(config.model.get("remat_policy", "")) != "full":
    out.append("--config.model.remat_policy=full (recompute each block)")
  out.append("a larger --config.mesh.fsdp (shard the state) or --config.mesh.context (split each clip's "
             "tokens) over more devices")
  out.append("fewer --config.data.num_frames or a smaller --config.data.video_size")
  return out


def check_fits(mem: StepMemory, limit: int | None, in_use: int, config: Any) -> None:
  """Raises MemoryError (one line: the numbers and the settings that lower memory) when the step's
  peak plus what the device already holds exceeds ``limit``; nothing when the limit is unknown."""
  if limit is None or mem.peak + in_use <= limit:
    return
  held = f", {fmt_bytes(in_use)} already in use" if in_use else ""
  raise MemoryError(
      f"the train step does not fit the device: it needs {fmt_bytes(mem.peak)} per device (state "
      f"{fmt_bytes(mem.state)}, temporaries {fmt_bytes(mem.temporaries)}) but the device has "
      f"{fmt_bytes(limit)}{held}. Settings that lower memory: " + "; ".join(lower_memory_settings(config))
      + " (--config.trainer.memory_check=False skips this check)")


def preflight(config: Any, train_step: Any, abstract_state: Any, abstract_batch_: Mapping[str, Any],
              rng: jax.Array) -> StepMemory:
  """Compiles ``train_step`` (a ``training.step.JittedTrainStep``; the executables are kept for the
  training loop), prints its memory on process 0 and checks that it fits (``trainer.memory_check``)."""
  compiled = train_step.compile(abstract_state, dict(abstract_batch_), rng)
  mem = step_memory(compiled, abstract_state)
  limit, in_use = device_budget(config.trainer)
  if jax.process_index() == 0:
    print(mem.summary(limit), flush=True)
  if bool(config.trainer.get("memory_check", True)):
    check_fits(mem, limit, in_use, config)
  return mem
