"""Convert reference PyTorch checkpoints to params-only orbax checkpoints, and back.

DiT (``*_ema_bf16.pt`` / ``*_ema_fp32.pt``) and Wan2.1 VAE (``Wan2.1_VAE.pth``). No torch needed: the
``.pt`` is read with ``v2w_jax.convert.torch_pt`` (restricted unpickler, lazy tensors), so memory stays
near the size of the output.

Examples::

    # release checkpoint -> orbax (param dtype of the config: float32 master weights)
    python tools/convert_torch_ckpt.py --input checkpoints/d20b7120-..._ema_bf16.pt \\
        --output checkpoints/dit_2b_orbax
    # a training run -> reference layout (its latest step's EMA weights, bf16), loadable by the PyTorch
    # reference; a step folder (checkpoints/<step>) picks that step, --weights=regular the non-EMA ones
    python tools/convert_torch_ckpt.py --direction to_torch \\
        --input outputs/cosmos_predict_v2p5/video2world/2b_cosmos_nemo_assets/checkpoints \\
        --output model_ema_bf16.pt --dtype bfloat16
    # a converted params folder -> reference layout
    python tools/convert_torch_ckpt.py --direction to_torch --input checkpoints/dit_2b_orbax \\
        --output /tmp/model_ema_bf16.pt --dtype bfloat16
    # the Wan VAE
    python tools/convert_torch_ckpt.py --kind vae --input checkpoints/Wan2.1_VAE.pth --output checkpoints/wan_vae
    # a LoRA run (configs/nemo_lora.py): its EMA adapters in peft's layout (+ lora_adapters.pt.json), or
    # the merged model base + (alpha/r)·B·A for the reference's plain inference
    python tools/convert_torch_ckpt.py --lora=adapters --input outputs/.../checkpoints --output lora_adapters.pt
    python tools/convert_torch_ckpt.py --lora=merged --input outputs/.../checkpoints --output model_ema_bf16.pt
    # a reference LoRA net's .pt (….base_layer.weight + lora_A/lora_B) -> params folder with both
    python tools/convert_torch_ckpt.py --input reference_lora.pt --output checkpoints/dit_2b_lora

The model's size comes from the checkpoint itself: a ``.pt``'s tensor shapes, the config a params
folder was written with, or a training checkpoint's saved run config. ``--config`` overrides it: a
config file (``configs/*.py``, whose ``model`` / ``vae`` sections are used) or a golden fixture's
``config.json`` (reference kwargs under ``net``). Mistakes end in one ``error:`` line (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import sys
from typing import Any

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from tqdm import tqdm  # noqa: E402

from v2w_jax.convert import infer, params_io, torch_pt  # noqa: E402
from v2w_jax.convert import load as load_lib  # noqa: E402
from v2w_jax.user_errors import UserError, main_guard  # noqa: E402

KINDS = ("dit", "vae")
DIRECTIONS = ("to_orbax", "to_torch")
WEIGHTS = ("ema", "regular")
LORA_EXPORTS = ("adapters", "merged")
_MAX_PROBLEM_LINES = 12


class ConvertError(UserError):
  """The conversion cannot be done as asked; the message names the file or flag."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True,
                 help=".pt/.pth file (to_orbax), or a params folder or training checkpoint (to_torch): the job "
                 "folder, <job>/checkpoints (latest step) or <job>/checkpoints/<step>")
  p.add_argument("--output", required=True, help="orbax directory (to_orbax) or .pt file (to_torch)")
  p.add_argument("--kind", choices=KINDS, default=None, help="dit | vae (default: detected from the keys)")
  p.add_argument("--direction", choices=DIRECTIONS, default=None,
                 help="default: to_orbax for a file input, to_torch for a directory")
  p.add_argument("--config", default=None,
                 help="configs/*.py (uses .model / .vae) or a fixture config.json (reference kwargs); default: "
                 "the model described by the checkpoint itself")
  p.add_argument("--weights", choices=WEIGHTS, default="ema",
                 help="to_torch from a training checkpoint: the EMA weights (default) or the regular ones (also "
                 "the adapters of a LoRA run)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="to_torch: output float dtype (default bfloat16); to_orbax: stored dtype "
                 "(default: the config's param_dtype)")
  p.add_argument("--prefix", default="net.", help="DiT key prefix in the .pt (default 'net.')")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  p.add_argument("--lora", choices=LORA_EXPORTS, default=None,
                 help="from a LoRA run (training checkpoint or LoRA params folder): 'adapters' = the adapters "
                 "alone in peft's layout (float32, with <output>.json), 'merged' = base + (alpha/r)·B·A")
  p.add_argument("--base", default="", help="--lora=merged: base weights (default: the path the run recorded)")
  p.add_argument("--lora_alpha", type=float, default=None,
                 help="LoRA alpha of .pt adapters that do not record it (default: --config's lora.alpha, else 32)")
  return p.parse_args(argv)


def _load_config_file(path: pathlib.Path) -> Any:
  """``get_config()`` of a config .py, or the parsed JSON of a fixture config."""
  if not path.is_file():
    raise ConvertError(f"--config {path}: no such file")
  if path.suffix == ".json":
    try:
      return json.loads(path.read_text())
    except ValueError as e:
      raise ConvertError(f"--config {path}: not valid JSON ({e})") from e
  spec = importlib.util.spec_from_file_location(f"_v2w_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConvertError(f"--config {path}: no get_config() function")
  return module.get_config()


def build_config(kind: str, config_path: str | pathlib.Path) -> Any:
  """DiTConfig / VAEConfig from a config file."""
  path = pathlib.Path(config_path)
  loaded = _load_config_file(path)
  if kind == "dit":
    from v2w_jax.models.dit_config import DiTConfig
    if path.suffix == ".json":
      if "net" not in loaded:
        raise ConvertError(f"--config {path}: no 'net' section (reference DiT kwargs)")
      return DiTConfig.from_reference_kwargs(loaded["net"])
    return DiTConfig.from_config(loaded.model)
  from v2w_jax.models.vae import VAEConfig
  if path.suffix == ".json":
    return VAEConfig.from_fixture(path)
  return VAEConfig.from_config(loaded.vae)


def detect_kind(keys: list[str], prefix: str = "net.") -> str:
  """'dit' or 'vae' from torch key names (anything that is not a DiT is taken for a VAE)."""
  return infer.detect_kind(keys, prefix) or "vae"


def _converter(kind: str):
  if kind == "dit":
    from v2w_jax.convert import dit as converter
  else:
    from v2w_jax.convert import vae as converter  # written separately; imported only when needed
  return converter


def _config_metadata(cfg: Any) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _config_from_fields(kind: str, fields: dict) -> Any:
  """A DiTConfig / VAEConfig from the field dict stored with a params folder or a training run."""
  if kind == "dit":
    from v2w_jax.models.dit_config import DiTConfig
    return DiTConfig.from_config(fields)
  from v2w_jax.models.vae import VAEConfig
  return VAEConfig.from_config(fields)


def _shorten(message: str) -> str:
  """The first lines of a long key listing (the converters list every bad key)."""
  lines = message.splitlines()
  if len(lines) <= _MAX_PROBLEM_LINES + 1:
    return message
  return "\n".join(lines[:_MAX_PROBLEM_LINES + 1] + [f"  ... and {len(lines) - _MAX_PROBLEM_LINES - 1} more"])


def _mismatch(path: Any, kind: str, cfg: Any, config_arg: str | None, err: Exception) -> ConvertError:
  if config_arg:
    hint = f"is --config {config_arg} the config this checkpoint was trained with?"
  else:
    hint = (f"the model size was read from the checkpoint ({infer.describe(cfg)}) and the rest is the released "
            f"model's; pass --config=configs/<your config>.py (its '{'model' if kind == 'dit' else 'vae'}' section)")
  return ConvertError(f"{path}: the {infer.KIND_NAMES[kind]} weights do not fit the model: {hint}\n"
                      + _shorten(str(err)))


def _check_kind(path: Any, asked: str | None, found: str | None) -> str:
  if asked and found and asked != found:
    raise ConvertError(f"{path}: this looks like a {infer.KIND_NAMES[found]} checkpoint: use --kind {found}")
  kind = asked or found
  if kind is None:
    raise ConvertError(f"{path}: neither DiT nor Wan VAE keys (is it a model checkpoint?); pass --kind dit or "
                       "--kind vae if it is one")
  return kind


def _lora_alpha(args: argparse.Namespace) -> float:
  """--lora_alpha, else --config's lora.alpha, else the reference's 32."""
  from v2w_jax.models.lora import REFERENCE_ALPHA  # pylint: disable=import-outside-toplevel

  if args.lora_alpha is not None:
    return float(args.lora_alpha)
  if args.config and pathlib.Path(args.config).suffix == ".py":
    section = _load_config_file(pathlib.Path(args.config)).get("lora")
    if section is not None:
      return float(section.get("alpha", REFERENCE_ALPHA))
  return REFERENCE_ALPHA


def _lora_source_config(args: argparse.Namespace) -> Any:
  """The plain DiT config of a LoRA run's checkpoint or LoRA params folder (--config overrides)."""
  if args.config:
    return build_config("dit", args.config).replace(lora=None)
  form = load_lib.checkpoint_kind(args.input)
  if form == "train":
    fields = (load_lib.train_checkpoint_meta(load_lib.resolve_train_state_dir(args.input)).get("config") or {})
    fields = fields.get("model")
  elif form == "params":
    fields = params_io.load_metadata(args.input).get("config")
  else:
    raise ConvertError(f"--input {args.input}: --lora exports from a LoRA run's checkpoint or a LoRA params folder")
  if not isinstance(fields, dict):
    raise ConvertError(f"{args.input}: no model config saved with it; pass --config=configs/<its config>.py")
  return _config_from_fields("dit", fields).replace(lora=None)


def lora_to_torch(args: argparse.Namespace) -> None:
  """--lora=adapters | merged from a LoRA training checkpoint or params folder."""
  from v2w_jax.convert import lora_export  # pylint: disable=import-outside-toplevel

  cfg = _lora_source_config(args)
  kw = dict(alpha=_lora_alpha(args), use_ema=args.weights == "ema", overwrite=args.overwrite)
  print(f"writing {args.output} ...", flush=True)
  if args.lora == "adapters":
    lora_export.export_adapters(args.input, args.output, cfg, **kw)
  else:
    lora_export.export_merged(args.input, args.output, cfg, base=args.base or None, dtype=args.dtype, **kw)


def _lora_to_orbax(args: argparse.Namespace, state: Any) -> None:
  """A reference LoRA net's .pt (base_layer weights + adapters) -> params folder with both."""
  from v2w_jax.convert import lora as convert_lora  # pylint: disable=import-outside-toplevel
  from v2w_jax.convert import lora_export  # pylint: disable=import-outside-toplevel

  base_state, _ = convert_lora.split_state_dict(state)
  cfg = (build_config("dit", args.config) if args.config
         else infer.dit_config_from_shapes(base_state, prefix=args.prefix)).replace(lora=None)
  print(f"writing {args.output} (base weights + LoRA adapters) ...", flush=True)
  try:
    lora_export.import_lora_pt(args.input, args.output, cfg, alpha=_lora_alpha(args), dtype=args.dtype,
                               overwrite=args.overwrite,
                               metadata={"dtype": args.dtype or "config", "config": _config_metadata(cfg)})
  except ValueError as e:
    raise _mismatch(args.input, "dit", cfg, args.config, e) from e


def to_orbax(args: argparse.Namespace) -> None:
  if not pathlib.Path(args.input).is_file():
    raise ConvertError(f"--input {args.input}: a folder; to_orbax reads a .pt/.pth file (a params folder or a "
                       "training checkpoint goes --direction to_torch)")
  state = torch_pt.load(args.input)
  kind = _check_kind(args.input, args.kind, infer.detect_kind(state, args.prefix))
  from v2w_jax.convert import lora as convert_lora  # pylint: disable=import-outside-toplevel

  if kind == "dit" and convert_lora.is_lora_state_dict(state.keys()):  # a reference LoRA net
    _lora_to_orbax(args, state)
    return
  if args.config:
    cfg = build_config(kind, args.config)
  elif kind == "dit":
    cfg = infer.dit_config_from_shapes(state, prefix=args.prefix)
  else:
    cfg = infer.vae_config_from_shapes(state)
  converter = _converter(kind)
  with tqdm(total=len(state), desc=f"{kind}: reading {pathlib.Path(args.input).name}", unit="tensor") as bar:
    try:
      if kind == "dit":
        params = converter.torch_to_params(state, cfg, prefix=args.prefix, dtype=args.dtype,
                                           on_tensor=lambda _: bar.update())
      else:
        params = converter.torch_to_params(state, cfg, dtype=args.dtype or np.float32)
    except ValueError as e:
      raise _mismatch(args.input, kind, cfg, args.config, e) from e
    bar.update(bar.total - bar.n)
  if pathlib.Path(args.output).exists() and not args.overwrite:
    raise ConvertError(f"--output {args.output}: exists (pass --overwrite to replace it)")
  print(f"writing {args.output} ...", flush=True)
  params_io.save_params(args.output, params, overwrite=args.overwrite,
                        metadata={"kind": kind, "source": str(args.input), "dtype": args.dtype or "config",
                                  "config": _config_metadata(cfg)})


class _Ticking:
  """Lazy tensor wrapper that advances a progress bar when the writer materialises it."""

  def __init__(self, value: Any, bar: tqdm, float_dtype: np.dtype | None = None):
    self._value, self._bar = value, bar
    self.shape, self.dtype = tuple(value.shape), np.dtype(value.dtype)
    is_float = self.dtype.kind == "f" or self.dtype.name == "bfloat16"
    if float_dtype is not None and is_float:
      self.dtype = np.dtype(float_dtype)

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    arr = np.asarray(self._value).astype(self.dtype, copy=False)
    self._bar.update()
    return arr if dtype is None else arr.astype(dtype)


def _train_checkpoint_params(args: argparse.Namespace, state_dir: pathlib.Path) -> tuple[Any, Any]:
  """(DiT params, config) of a training checkpoint: the EMA or regular weights of one step."""
  from v2w_jax.models import dit  # pylint: disable=import-outside-toplevel

  if args.kind == "vae":
    raise ConvertError(f"{args.input}: a training checkpoint holds DiT weights only (the VAE is not trained); "
                       "drop --kind vae")
  if args.config:
    cfg = build_config("dit", args.config)
  else:
    run_config = load_lib.train_checkpoint_meta(state_dir).get("config") or {}
    if "model" not in run_config:
      raise ConvertError(f"{state_dir.parent}: no run config saved with this checkpoint; pass --config=configs/"
                         "<the config it was trained with>.py")
    cfg = _config_from_fields("dit", run_config["model"])
  use_ema = args.weights == "ema"
  params = load_lib.load_train_state_params(state_dir, dit.abstract_params(cfg), use_ema=use_ema)
  print(f"exporting the {'EMA' if use_ema else 'regular'} weights of step {state_dir.parent.name} "
        f"({state_dir.parent})", flush=True)
  return params, cfg


def _params_folder(args: argparse.Namespace) -> tuple[str, Any, Any]:
  """(kind, params, config) of a params folder written by to_orbax."""
  meta = params_io.load_metadata(args.input)
  if meta.get("lora"):
    raise ConvertError(f"{args.input}: base weights with LoRA adapters: pass --lora=adapters or --lora=merged")
  params = params_io.load_params(args.input)
  found = meta.get("kind") or ("dit" if "x_embedder" in params else "vae" if "encoder" in params else None)
  kind = _check_kind(args.input, args.kind, found)
  if args.config:
    return kind, params, build_config(kind, args.config)
  if isinstance(meta.get("config"), dict):
    return kind, params, _config_from_fields(kind, meta["config"])
  cfg = infer.dit_config_from_params(params) if kind == "dit" else infer.vae_config_from_params(params)
  return kind, params, cfg


def to_torch(args: argparse.Namespace) -> None:
  form = load_lib.checkpoint_kind(args.input)
  if form == "torch":
    raise ConvertError(f"--input {args.input}: already a PyTorch checkpoint; to_torch reads a params folder or a "
                       "training checkpoint (<job>/checkpoints/<step>)")
  if form == "train":
    from v2w_jax.convert import lora_load  # pylint: disable=import-outside-toplevel

    if lora_load.lora_train_meta(args.input) is not None:
      raise ConvertError(f"{args.input}: a LoRA run's checkpoint (adapters only): pass --lora=adapters or "
                         "--lora=merged")
    params, cfg = _train_checkpoint_params(args, load_lib.resolve_train_state_dir(args.input))
    kind = "dit"
  else:
    kind, params, cfg = _params_folder(args)
  converter = _converter(kind)
  import ml_dtypes
  names = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
  try:
    if kind == "dit":
      out_dtype = names[args.dtype or "bfloat16"]
      mapping = converter.params_to_torch(params, cfg, dtype=out_dtype, prefix=args.prefix, lazy=True)
    else:
      out_dtype = names[args.dtype] if args.dtype else None
      mapping = converter.params_to_torch(params, cfg)
  except ValueError as e:
    raise _mismatch(args.input, kind, cfg, args.config, e) from e
  out = pathlib.Path(args.output)
  if out.exists() and not args.overwrite:
    raise ConvertError(f"--output {out}: exists (pass --overwrite to replace it)")
  with tqdm(total=len(mapping), desc=f"{kind}: writing {out.name}", unit="tensor") as bar:
    torch_pt.save(out, {k: _Ticking(v, bar, out_dtype) for k, v in mapping.items()})


@main_guard
def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  if not pathlib.Path(args.input).exists():
    raise ConvertError(f"--input {args.input}: no such file or folder")
  direction = args.direction or ("to_torch" if pathlib.Path(args.input).is_dir() else "to_orbax")
  if args.lora:
    lora_to_torch(args)
  else:
    (to_orbax if direction == "to_orbax" else to_torch)(args)
  print(f"done: {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
