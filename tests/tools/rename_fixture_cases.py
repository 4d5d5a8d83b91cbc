"""Copy a golden-fixtures folder with its case names (and some of its cases) changed.

The parity tests must discover their cases, keys and sizes from the fixture files, so they must pass
unchanged on such a copy. The copy:

* ``samplers/``: every run of ``rf_unipc.npz`` and ``edm_sampler.npz`` gets a new name (its arrays,
  its ``metrics.json`` entry and its mentions in ``README.md``), and the first run of each file is
  duplicated under a further name. Shared arrays (``toy_*``, ``table_*``, ``gauss_analytic``) keep
  their names.
* ``wan_vae_tiny/``: every case is renamed (``config.json`` cases/checks, the ``<case>/...`` arrays).
* ``text_embed_tiny/``: only the shortest pad length is kept (arrays ``*_p<P>``, ``captions.json``,
  ``fixture_meta.json``).

Everything else is symlinked. Usage::

    python tests/tools/rename_fixture_cases.py SRC DST
    V2W_FIXTURES=DST V2W_REFERENCE=SRC/../reference python -m pytest tests/test_samplers_unipc.py ...
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the fixture helpers
from conftest import sampler_runs  # pylint: disable=wrong-import-position

SAMPLER_FILES = {"rf_unipc.npz": "rf_unipc", "edm_sampler.npz": "edm_sampler"}  # file -> metrics section


def run_fields(keys, runs) -> set[str]:
  """Array names every run has (``<run>_<field>``); other keys with a run's prefix are shared arrays."""
  fields = None
  for run in runs:
    mine = {k[len(run) + 1:] for k in keys if k.startswith(run + "_")}
    fields = mine if fields is None else fields & mine
  return fields or set()


def _replace_words(text: str, mapping: dict[str, str]) -> str:
  if not mapping:
    return text
  pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)) + r")\b")
  return pattern.sub(lambda m: mapping[m.group(1)], text)


def _link_tree(src: pathlib.Path, dst: pathlib.Path) -> None:
  """``dst`` mirrors ``src`` with every file a symlink (files to change are replaced afterwards)."""
  for path in src.rglob("*"):
    target = dst / path.relative_to(src)
    if path.is_dir():
      target.mkdir(parents=True, exist_ok=True)
    else:
      target.parent.mkdir(parents=True, exist_ok=True)
      target.symlink_to(path.resolve())


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  path.unlink(missing_ok=True)
  np.savez(path, **arrays)


def _write_json(path: pathlib.Path, data) -> None:
  path.unlink(missing_ok=True)
  path.write_text(json.dumps(data, indent=1))


def _write_text(path: pathlib.Path, text: str) -> None:
  path.unlink(missing_ok=True)
  path.write_text(text)


def rename_samplers(src: pathlib.Path, dst: pathlib.Path) -> dict[str, str]:
  """Renames the runs of the sampler files (one name map for both, as their README shares the names) and
  duplicates the first run of each file; returns {old: new} plus the copies as {"<old> (copy)": new}."""
  data = {}
  for name in SAMPLER_FILES:
    with np.load(src / name) as z:
      data[name] = dict(z)
  every_run = sorted({r for arrays in data.values() for r in sampler_runs(arrays)})
  mapping = {run: f"case{i}" for i, run in enumerate(every_run)}
  metrics = json.loads((src / "metrics.json").read_text())
  report = dict(mapping)
  for name, section in SAMPLER_FILES.items():
    arrays = data[name]
    runs = sampler_runs(arrays)
    fields = run_fields(arrays, runs)
    copy_of, copy = runs[0], mapping[runs[0]] + "copy"
    report[f"{copy_of} (copy, {name})"] = copy
    out = {}
    for key, value in arrays.items():
      run = next((r for r in runs if key.startswith(r + "_") and key[len(r) + 1:] in fields), None)
      if run is None:  # shared arrays: toy_*, table_*, gauss_analytic
        out[key] = value
        continue
      field = key[len(run) + 1:]
      out[f"{mapping[run]}_{field}"] = value
      if run == copy_of:
        out[f"{copy}_{field}"] = value
    _write_npz(dst / name, out)
    old = metrics.get(section, {})
    metrics[section] = {mapping.get(k, k): v for k, v in old.items()}
    if copy_of in old:
      metrics[section][copy] = old[copy_of]
  _write_json(dst / "metrics.json", metrics)
  _write_text(dst / "README.md", _replace_words((src / "README.md").read_text(), mapping))
  return report


def rename_vae_cases(src: pathlib.Path, dst: pathlib.Path) -> dict[str, str]:
  config = json.loads((src / "config.json").read_text())
  mapping = {case: f"clip{i}" for i, case in enumerate(config["cases"])}
  for field in ("cases", "checks"):
    if field in config:
      config[field] = {mapping.get(k, k): v for k, v in config[field].items()}
  _write_json(dst / "config.json", config)
  for name in ("inputs.npz", "outputs.npz"):
    with np.load(src / name) as z:
      arrays = {}
      for key in z.files:
        case, _, rest = key.partition("/")
        arrays[f"{mapping.get(case, case)}/{rest}" if rest else key] = z[key]
    _write_npz(dst / name, arrays)
  _write_text(dst / "README.md", _replace_words((src / "README.md").read_text(), mapping))
  return mapping


def keep_shortest_pad_length(src: pathlib.Path, dst: pathlib.Path) -> int:
  captions = json.loads((src / "captions.json").read_text())
  keep = min(captions["pad_lengths"])
  dropped = [p for p in captions["pad_lengths"] if p != keep]
  captions["pad_lengths"] = [keep]
  _write_json(dst / "captions.json", captions)
  meta = json.loads((src / "fixture_meta.json").read_text())
  meta["pad_lengths"] = [keep]
  meta["errors"] = {p: v for p, v in meta.get("errors", {}).items() if p == str(keep)}
  _write_json(dst / "fixture_meta.json", meta)
  with np.load(src / "outputs.npz") as z:
    arrays = {k: z[k] for k in z.files if not any(k.endswith(f"_p{p}") for p in dropped)}
  _write_npz(dst / "outputs.npz", arrays)
  return keep


def make_copy(src: pathlib.Path, dst: pathlib.Path) -> dict:
  """The changed copy of ``src`` at ``dst`` (which must not exist); returns what was changed."""
  if dst.exists():
    raise FileExistsError(f"{dst} exists; give a new folder")
  _link_tree(src, dst)
  report = {}
  if (src / "samplers").is_dir():
    report["samplers"] = rename_samplers(src / "samplers", dst / "samplers")
  if (src / "wan_vae_tiny").is_dir():
    report["wan_vae_tiny"] = rename_vae_cases(src / "wan_vae_tiny", dst / "wan_vae_tiny")
  if (src / "text_embed_tiny").is_dir():
    report["text_embed_tiny"] = {"pad_length_kept": keep_shortest_pad_length(src / "text_embed_tiny",
                                                                            dst / "text_embed_tiny")}
  return report


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("src", type=pathlib.Path, help="fixtures folder (e.g. ../shared/fixtures)")
  ap.add_argument("dst", type=pathlib.Path, help="new folder for the changed copy")
  args = ap.parse_args(argv)
  if not args.src.is_dir():
    print(f"error: {args.src} is not a folder", file=sys.stderr)
    return 2
  try:
    report = make_copy(args.src, args.dst)
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
