"""The sample list of ``python -m v2w_jax.generate``: JSON, JSONL or YAML, validated up front.

Two layouts are read. The reference's own spec files (``examples/inference.py``'s parameter files, e.g.
its ``assets/base/video2world.json``) hold shared settings at the top level and the samples by name::

    {
      "inference_type": "video2world",         # shared settings: any sample field below except name
      "seed": 1, "guidance": 7, "negative_prompt": "...", "resolution": "none", "num_output_frames": 93,
      "samples": {
        "robot_pouring": {"prompt_path": "robot_pouring.txt", "input_path": "robot_pouring.mp4"},
        "stop_sign": {"prompt": "A point-of-view video ...", "input_path": "stop_sign.mp4"}
      }
    }

A sample's own fields override the shared ones. Settings a file leaves out take this port's defaults
(seed 0, guidance 7, 35 steps, the config's clip size and length). This port's own layout is one sample
(an object), a list of samples, or (JSONL) one object per line, each with its ``name``. Field names
follow the reference where they exist, plus the fields a port without the 7B text encoder in the loop
uses (precomputed embeddings)::

    {
      "name": "robot_pouring",                 # required, unique; default output <output_dir>/<name>.mp4
      "prompt": "A robot pours ...",           # embedded by the text-embedding store (or the text
      "prompt_path": "robot.txt",              #   encoder, --text_encoder_dir), or prompt_path: a .txt, or
      "prompt_embedding": "emb/robot.npy",     #   a precomputed [tokens, D] .npy (one is required)
      "negative_prompt": "...",                # optional; else the reference's default one (if stored), else zeros
      "negative_prompt_embedding": "neg.npy",  # optional precomputed negative embedding
      "inference_type": "video2world",         # optional: text2world | image2world | video2world
      "input_path": "robot.mp4",               # image (.png/.jpg/.jpeg/.webp/.bmp) or video; absent = text2world
      "num_conditional_frames": 2,             # 0, 1 or 2 latent frames (default: image 1, video 2, none 0)
      "seed": 0, "guidance": 7, "num_steps": 35, "shift": 5,
      "resolution": "704,1280",                # or [704, 1280]; default config.data.video_size
      "num_frames": 93,                        # 1 + 4k (k >= 1); default config.data.num_frames
      "output": "robot_pouring.mp4"            # relative to --output_dir (or absolute)
    }

Relative paths are relative to the spec file's folder (as in the reference). Every problem of every
entry is collected and reported in one :class:`SpecError` naming the file, the entry and the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any, Sequence

from v2w_jax.user_errors import UserError

_log = logging.getLogger(__name__)

# The reference inference script's default negative prompt (``cosmos_predict2/config.py``). Its embedding is
# what the unconditional CFG branch sees there; compute it once into the text-embedding store.
DEFAULT_NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, jerky "
    "movements, low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, "
    "fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. "
    "Overall, the video is of poor quality.")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
INFERENCE_TYPES = {"text2world": 0, "image2world": 1, "video2world": 2}
# Fields of the reference's spec that this port reads but does not use.
_IGNORED_REFERENCE_FIELDS = ("chunk_size", "chunk_overlap", "enable_autoregressive")
_KNOWN_FIELDS = (
    "name", "prompt", "prompt_path", "prompt_embedding", "negative_prompt", "negative_prompt_embedding",
    "inference_type", "input_path", "num_conditional_frames", "seed", "guidance", "num_steps", "shift",
    "resolution", "num_frames", "num_output_frames", "output", "fps",
) + _IGNORED_REFERENCE_FIELDS


class SpecError(UserError, ValueError):
  """A spec file is unusable; the message lists every bad entry and field."""


@dataclasses.dataclass(frozen=True)
class SpecDefaults:
  """Values for fields an entry leaves out, and the shape rules of the model."""

  resolution: tuple[int, int] = (704, 1280)
  num_frames: int = 93
  seed: int = 0
  guidance: float = 7.0
  num_steps: int = 35
  shift: float = 5.0
  fps: float = 16.0
  negative_prompt_embedding: str | None = None  # applies to entries without their own
  size_multiple: int = 16  # VAE spatial factor x DiT patch size
  temporal_factor: int = 4  # VAE temporal factor: num_frames = 1 + factor * k


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """One validated sample. Paths are absolute; ``output`` may still be relative to the output dir."""

  name: str
  prompt: str | None
  prompt_embedding: str | None
  negative_prompt: str | None
  negative_prompt_embedding: str | None
  input_path: str | None
  input_kind: str | None  # "image" | "video" | None
  num_conditional_frames: int
  seed: int
  guidance: float
  num_steps: int
  shift: float
  resolution: tuple[int, int]
  num_frames: int
  fps: float
  output: str
  where: str  # "<file>: entry <i> (<name>)" for messages

  @property
  def inference_type(self) -> str:
    return {0: "text2world", 1: "image2world", 2: "video2world"}[self.num_conditional_frames]

  def output_path(self, output_dir: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(self.output)
    return out if out.is_absolute() else pathlib.Path(output_dir) / out


def input_kind(path: str | os.PathLike) -> str | None:
  """"image" or "video" by file extension (None when unknown)."""
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext in IMAGE_EXTENSIONS:
    return "image"
  if ext in VIDEO_EXTENSIONS:
    return "video"
  return None


def _read_entries(path: pathlib.Path) -> list[tuple[Any, str, bool]]:
  """(raw entry, its label for messages, whether the label should add the entry's name) per sample."""
  if not path.is_file():
    raise SpecError(f"{path}: spec file does not exist")
  text = path.read_text()
  suffix = path.suffix.lower()
  try:
    if suffix == ".json":
      data = json.loads(text)
    elif suffix == ".jsonl":
      data = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix in (".yaml", ".yml"):
      import yaml  # pylint: disable=import-outside-toplevel

      data = yaml.safe_load(text)
    else:
      raise SpecError(f"{path}: unsupported spec extension {suffix!r} (use .json, .jsonl, .yaml or .yml)")
  except SpecError:
    raise
  except Exception as e:  # json / yaml syntax errors
    raise SpecError(f"{path}: cannot parse ({type(e).__name__}: {e})") from e
  if isinstance(data, dict) and "samples" in data:
    return _reference_entries(path, data)
  entries = data if isinstance(data, list) else [data]
  if not entries:
    raise SpecError(f"{path}: no samples in the spec")
  return [(raw, f"entry {i}", True) for i, raw in enumerate(entries)]


def _reference_entries(path: pathlib.Path, data: dict) -> list[tuple[Any, str, bool]]:
  """Samples of the reference's layout, each merged over the file's shared top-level settings."""
  samples = data["samples"]
  if not isinstance(samples, dict) or not samples:
    raise SpecError(f"{path}: field 'samples' must be a non-empty object {{NAME: {{sample fields}}}}, got "
                    f"{type(samples).__name__} {samples!r:.80}")
  shared = {k: v for k, v in data.items() if k != "samples"}
  unknown = sorted(k for k in shared if k not in _KNOWN_FIELDS or k == "name")
  if unknown:
    raise SpecError(f"{path}: unknown top-level field(s) {unknown}: shared settings are sample fields "
                    f"({sorted(set(_KNOWN_FIELDS) - {'name'})}); samples are named by their keys under 'samples'")
  entries = []
  for name, sample in samples.items():
    label = f"sample {name!r}"
    if isinstance(sample, dict) and "name" in sample:
      raise SpecError(f"{path}: {label}: field 'name': samples are named by their key under 'samples'")
    entries.append((_merge(shared, sample, name) if isinstance(sample, dict) else sample, label, False))
  return entries


# Fields that say the same thing in different ways: a sample giving one of a group replaces the group.
_ALTERNATIVES = (("prompt", "prompt_path", "prompt_embedding"), ("negative_prompt", "negative_prompt_embedding"),
                 ("num_frames", "num_output_frames"), ("inference_type", "num_conditional_frames"))


def _merge(shared: dict, sample: dict, name: str) -> dict:
  merged = dict(shared)
  for group in _ALTERNATIVES:
    if any(k in sample for k in group):
      for k in group:
        merged.pop(k, None)
  merged.update(sample)
  merged["name"] = name
  return merged


class _Entry:
  """Field readers that record problems instead of raising at the first one."""

  def __init__(self, raw: dict, where: str, base: pathlib.Path, problems: list[str]):
    self.raw, self.where, self.base, self.problems = raw, where, base, problems

  def bad(self, field: str, msg: str) -> None:
    self.problems.append(f"{self.where}: field {field!r}: {msg}")

  def text(self, field: str) -> str | None:
    v = self.raw.get(field)
    if v is None:
      return None
    if not isinstance(v, str):
      self.bad(field, f"must be a string, got {type(v).__name__} {v!r}")
      return None
    return v

  def path(self, field: str, kinds: Sequence[str] | None = None) -> str | None:
    v = self.text(field)
    if v is None:
      return None
    if not v.strip():
      self.bad(field, "is empty")
      return None
    p = pathlib.Path(os.path.expanduser(v))
    p = p if p.is_absolute() else self.base / p
    if not p.is_file():
      self.bad(field, f"file {str(p)!r} does not exist")
      return None
    if kinds is not None:
      ext = p.suffix.lower()
      if ext not in kinds:
        self.bad(field, f"{str(p)!r} has extension {ext!r}; expected one of {list(kinds)}")
        return None
    return str(p.resolve())

  def integer(self, field: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    v = self.raw.get(field, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
      self.bad(field, f"must be an integer, got {v!r}")
      return default
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
      rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
      self.bad(field, f"must be {rng}, got {v}")
      return default
    return v

  def number(self, field: str, default: float, lo: float | None = None, strict: bool = False) -> float:
    v = self.raw.get(field, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
      self.bad(field, f"must be a finite number, got {v!r}")
      return default
    v = float(v)
    if lo is not None and (v <= lo if strict else v < lo):
      self.bad(field, f"must be {'>' if strict else '>='} {lo}, got {v}")
      return default
    return v


def _parse_resolution(e: _Entry, defaults: SpecDefaults) -> tuple[int, int]:
  v = e.raw.get("resolution")
  if v is None or v == "none":
    return tuple(int(s) for s in defaults.resolution)
  parts: list[Any]
  if isinstance(v, str):
    parts = [p.strip() for p in v.replace("x", ",").split(",")]
  elif isinstance(v, (list, tuple)):
    parts = list(v)
  else:
    e.bad("resolution", f"must be 'H,W' or [H, W], got {v!r}")
    return defaults.resolution
  try:
    if len(parts) != 2 or any(isinstance(p, (bool, float)) for p in parts):
      raise ValueError
    h, w = (int(p) for p in parts)
  except (TypeError, ValueError):
    e.bad("resolution", f"must be 'H,W' or [H, W] with two integers, got {v!r}")
    return defaults.resolution
  m = defaults.size_multiple
  if h <= 0 or w <= 0 or h % m or w % m:
    e.bad("resolution", f"{h}x{w}: height and width must be positive multiples of {m}")
    return defaults.resolution
  return h, w


def _parse_num_frames(e: _Entry, defaults: SpecDefaults) -> int:
  field = "num_frames"
  if "num_frames" not in e.raw and "num_output_frames" in e.raw:
    field = "num_output_frames"  # the reference's name (which it ignores); here it is honoured
  elif "num_frames" in e.raw and "num_output_frames" in e.raw and e.raw["num_frames"] != e.raw["num_output_frames"]:
    e.bad("num_output_frames", f"{e.raw['num_output_frames']!r} disagrees with num_frames {e.raw['num_frames']!r}")
  f = defaults.temporal_factor
  n = e.integer(field, defaults.num_frames, lo=1)
  if n < 1 + f or (n - 1) % f:
    lo = max(1 + f, 1 + (n - 1) // f * f)
    e.bad(field, f"{n} is not 1 + {f}k with k >= 1 (valid nearby: {lo} or {lo + f})")
    return defaults.num_frames
  return n


def _parse_entry(raw: Any, label: str, show_name: bool, index: int, path: pathlib.Path, defaults: SpecDefaults,
                 problems: list[str]) -> SampleSpec | None:
  where = f"{path}: {label}"
  if not isinstance(raw, dict):
    problems.append(f"{where}: must be an object with fields, got {type(raw).__name__}")
    return None
  name = raw.get("name")
  if show_name and isinstance(name, str) and name:
    where = f"{where} ({name!r})"
  e = _Entry(raw, where, path.parent, problems)
  n_before = len(problems)

  unknown = sorted(k for k in raw if k not in _KNOWN_FIELDS)
  if unknown:
    problems.append(f"{where}: unknown field(s) {unknown}; known fields: {sorted(_KNOWN_FIELDS)}")
  if raw.get("enable_autoregressive"):
    e.bad("enable_autoregressive", "autoregressive (sliding window) generation is not supported")
  for k in _IGNORED_REFERENCE_FIELDS:
    if k in raw and k != "enable_autoregressive":
      _log.warning("%s: field %r is ignored (autoregressive mode is not supported)", where, k)

  if not isinstance(name, str) or not name.strip():
    e.bad("name", f"required non-empty string, got {name!r}")
    name = f"sample_{index}"
  elif any(c in name for c in "/\\") or name in (".", ".."):
    e.bad("name", f"{name!r} must not contain path separators (it names the output file)")

  prompt = e.text("prompt")
  prompt_path = e.path("prompt_path", (".txt",))
  if prompt is not None and "prompt_path" in raw:
    e.bad("prompt_path", "give only one of 'prompt' and 'prompt_path'")
  elif prompt is None and prompt_path is not None:
    prompt = pathlib.Path(prompt_path).read_text().strip()
  prompt_embedding = e.path("prompt_embedding", (".npy",))
  if prompt is None and prompt_embedding is None and not any(
      k in raw for k in ("prompt", "prompt_path", "prompt_embedding")):
    problems.append(f"{where}: needs 'prompt' or 'prompt_path' (embedded by the text-embedding store or "
                    "--text_encoder_dir), or 'prompt_embedding' (a precomputed .npy)")
  negative_prompt = e.text("negative_prompt")
  negative_embedding = e.path("negative_prompt_embedding", (".npy",))
  if negative_embedding is None and "negative_prompt_embedding" not in raw:
    negative_embedding = defaults.negative_prompt_embedding

  input_path = e.path("input_path")
  kind = None
  if input_path is not None:
    kind = input_kind(input_path)
    if kind is None:
      e.bad("input_path", f"{input_path!r}: unsupported extension; images {list(IMAGE_EXTENSIONS)}, "
            f"videos {list(VIDEO_EXTENSIONS)}")
  itype = e.text("inference_type")
  if itype is not None and itype not in INFERENCE_TYPES:
    e.bad("inference_type", f"{itype!r} is not one of {sorted(INFERENCE_TYPES)}")
    itype = None
  if "num_conditional_frames" in raw:
    n_cond = e.integer("num_conditional_frames", 0, lo=0, hi=2)
    if itype is not None and INFERENCE_TYPES[itype] != n_cond:
      e.bad("num_conditional_frames", f"{n_cond} contradicts inference_type {itype!r} "
            f"({INFERENCE_TYPES[itype]} conditional frames)")
  elif itype is not None:
    n_cond = INFERENCE_TYPES[itype]
  else:
    n_cond = {None: 0, "image": 1, "video": 2}.get(kind, 0)
  if n_cond > 0 and input_path is None and "input_path" not in raw:
    e.bad("input_path", f"required for {n_cond} conditional frame(s) ({['', 'image2world', 'video2world'][n_cond]})")
  if kind == "image" and n_cond == 2:
    e.bad("num_conditional_frames", "an image input gives exactly 1 conditional frame; 2 needs a video input")
  if n_cond == 0 and input_path is not None:
    _log.warning("%s: text2world (0 conditional frames): input_path %s is ignored", where, input_path)
    input_path, kind = None, None

  seed = e.integer("seed", defaults.seed, lo=0, hi=2**32 - 1)
  guidance = e.number("guidance", defaults.guidance, lo=0.0)
  num_steps = e.integer("num_steps", defaults.num_steps, lo=1, hi=1000)
  shift = e.number("shift", defaults.shift, lo=0.0, strict=True)
  fps = e.number("fps", defaults.fps, lo=0.0, strict=True)
  resolution = _parse_resolution(e, defaults)
  num_frames = _parse_num_frames(e, defaults)
  latent_frames = 1 + (num_frames - 1) // defaults.temporal_factor
  if n_cond >= latent_frames:
    e.bad("num_frames", f"{num_frames} frames = {latent_frames} latent frames leave nothing to generate after "
          f"{n_cond} conditional latent frame(s)")
  output = e.text("output")
  if output is None:
    output = f"{name}.mp4"
  elif not output.lower().endswith(".mp4"):
    e.bad("output", f"{output!r} must end with .mp4")

  if len(problems) != n_before:
    return None
  return SampleSpec(
      name=name, prompt=prompt, prompt_embedding=prompt_embedding, negative_prompt=negative_prompt,
      negative_prompt_embedding=negative_embedding, input_path=input_path, input_kind=kind,
      num_conditional_frames=n_cond, seed=seed, guidance=guidance, num_steps=num_steps, shift=shift,
      resolution=resolution, num_frames=num_frames, fps=fps, output=output, where=where)


def load_specs(paths: str | os.PathLike | Sequence[str | os.PathLike], defaults: SpecDefaults | None = None
               ) -> list[SampleSpec]:
  """Reads and validates one or more spec files.

  Raises:
    SpecError: listing every problem (file, entry index and name, field, what is wrong), including
      duplicate names and output paths across files.
  """
  defaults = defaults or SpecDefaults()
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  problems: list[str] = []
  specs: list[SampleSpec] = []
  for p in paths:
    path = pathlib.Path(p).expanduser().absolute()
    try:
      entries = _read_entries(path)
    except SpecError as e:
      problems.append(str(e))
      continue
    for i, (raw, label, show_name) in enumerate(entries):
      spec = _parse_entry(raw, label, show_name, i, path, defaults, problems)
      if spec is not None:
        specs.append(spec)
  seen_names: dict[str, str] = {}
  seen_outputs: dict[str, str] = {}
  for s in specs:
    if s.name in seen_names:
      problems.append(f"{s.where}: field 'name': {s.name!r} is not unique (also {seen_names[s.name]})")
    elif s.output in seen_outputs:
      problems.append(f"{s.where}: field 'output': {s.output!r} is also written by {seen_outputs[s.output]}")
    seen_names.setdefault(s.name, s.where)
    seen_outputs.setdefault(s.output, s.where)
  if problems:
    raise SpecError(f"invalid generation spec ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
  return specs
