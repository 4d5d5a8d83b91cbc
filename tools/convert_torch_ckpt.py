"""Convert reference PyTorch checkpoints to params-only orbax checkpoints, and back.

DiT (``*_ema_bf16.pt`` / ``*_ema_fp32.pt``) and Wan2.1 VAE (``Wan2.1_VAE.pth``). No torch needed: the
``.pt`` is read with ``v2w_jax.convert.torch_pt`` (restricted unpickler, lazy tensors), so memory stays
near the size of the output.

Examples::

    # release checkpoint -> orbax (param dtype of the config: float32 master weights)
    python tools/convert_torch_ckpt.py --input checkpoints/d20b7120-..._ema_bf16.pt \\
        --output checkpoints/dit_2b_orbax
    # orbax -> reference layout (bf16, loadable by the PyTorch reference)
    python tools/convert_torch_ckpt.py --direction to_torch --input checkpoints/dit_2b_orbax \\
        --output /tmp/model_ema_bf16.pt --dtype bfloat16
    # the Wan VAE
    python tools/convert_torch_ckpt.py --kind vae --input checkpoints/Wan2.1_VAE.pth --output checkpoints/wan_vae

``--config`` is a config file (``configs/*.py``, whose ``model`` / ``vae`` sections are used) or a golden
fixture's ``config.json`` (reference kwargs under ``net``).
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

from v2w_jax.convert import params_io, torch_pt  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "configs" / "nemo.py"
KINDS = ("dit", "vae")
DIRECTIONS = ("to_orbax", "to_torch")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help=".pt/.pth file (to_orbax) or orbax directory (to_torch)")
  p.add_argument("--output", required=True, help="orbax directory (to_orbax) or .pt file (to_torch)")
  p.add_argument("--kind", choices=KINDS, default=None, help="dit | vae (default: detected from the keys)")
  p.add_argument("--direction", choices=DIRECTIONS, default=None,
                 help="default: to_orbax for a file input, to_torch for a directory")
  p.add_argument("--config", default=str(DEFAULT_CONFIG),
                 help="configs/*.py (uses .model / .vae) or a fixture config.json (reference kwargs)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="to_torch: output float dtype (default bfloat16); to_orbax: stored dtype "
                 "(default: the config's param_dtype)")
  p.add_argument("--prefix", default="net.", help="DiT key prefix in the .pt (default 'net.')")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  return p.parse_args(argv)


def _load_config_file(path: pathlib.Path) -> Any:
  """``get_config()`` of a config .py, or the parsed JSON of a fixture config."""
  if not path.is_file():
    raise FileNotFoundError(f"--config {path}: no such file")
  if path.suffix == ".json":
    return json.loads(path.read_text())
  spec = importlib.util.spec_from_file_location(f"_v2w_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config {path}: no get_config() function")
  return module.get_config()


def build_config(kind: str, config_path: str | pathlib.Path) -> Any:
  """DiTConfig / VAEConfig from a config file."""
  path = pathlib.Path(config_path)
  loaded = _load_config_file(path)
  if kind == "dit":
    from v2w_jax.models.dit_config import DiTConfig
    if path.suffix == ".json":
      if "net" not in loaded:
        raise ValueError(f"--config {path}: no 'net' section (reference DiT kwargs)")
      return DiTConfig.from_reference_kwargs(loaded["net"])
    return DiTConfig.from_config(loaded.model)
  from v2w_jax.models.vae import VAEConfig
  if path.suffix == ".json":
    return VAEConfig.from_fixture(path)
  return VAEConfig.from_config(loaded.vae)


def detect_kind(keys: list[str], prefix: str = "net.") -> str:
  if any(k.startswith(prefix + "blocks.") or k.startswith(prefix + "x_embedder.") for k in keys):
    return "dit"
  return "vae"


def _converter(kind: str):
  if kind == "dit":
    from v2w_jax.convert import dit as converter
  else:
    from v2w_jax.convert import vae as converter  # written separately; imported only when needed
  return converter


def _config_metadata(cfg: Any) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def to_orbax(args: argparse.Namespace) -> None:
  state = torch_pt.load(args.input)
  kind = args.kind or detect_kind(list(state), args.prefix)
  cfg = build_config(kind, args.config)
  converter = _converter(kind)
  with tqdm(total=len(state), desc=f"{kind}: reading {pathlib.Path(args.input).name}", unit="tensor") as bar:
    if kind == "dit":
      params = converter.torch_to_params(state, cfg, prefix=args.prefix, dtype=args.dtype,
                                         on_tensor=lambda _: bar.update())
    else:
      params = converter.torch_to_params(state, cfg, dtype=args.dtype or np.float32)
    bar.update(bar.total - bar.n)
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


def to_torch(args: argparse.Namespace) -> None:
  meta = params_io.load_metadata(args.input)
  params = params_io.load_params(args.input)
  kind = args.kind or meta.get("kind") or ("dit" if "x_embedder" in params else "vae")
  cfg = build_config(kind, args.config)
  converter = _converter(kind)
  import ml_dtypes
  names = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
  if kind == "dit":
    out_dtype = names[args.dtype or "bfloat16"]
    mapping = converter.params_to_torch(params, cfg, dtype=out_dtype, prefix=args.prefix, lazy=True)
  else:
    out_dtype = names[args.dtype] if args.dtype else None
    mapping = converter.params_to_torch(params, cfg)
  out = pathlib.Path(args.output)
  if out.exists() and not args.overwrite:
    raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
  with tqdm(total=len(mapping), desc=f"{kind}: writing {out.name}", unit="tensor") as bar:
    torch_pt.save(out, {k: _Ticking(v, bar, out_dtype) for k, v in mapping.items()})


def main(argv: list[str] | None = None) -> None:
  args = _parse_args(argv)
  direction = args.direction or ("to_torch" if pathlib.Path(args.input).is_dir() else "to_orbax")
  (to_orbax if direction == "to_orbax" else to_torch)(args)
  print(f"done: {args.output}")


if __name__ == "__main__":
  main()
