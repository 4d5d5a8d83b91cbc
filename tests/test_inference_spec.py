"""Generation spec parsing and validation (v2w_jax/inference/spec.py)."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from v2w_jax.inference import spec as spec_lib
from v2w_jax.inference.spec import SpecDefaults, SpecError, load_specs

DEFAULTS = SpecDefaults(resolution=(32, 48), num_frames=9)


@pytest.fixture()
def assets(tmp_path: pathlib.Path) -> pathlib.Path:
  """A folder with an embedding, an 'image' and a 'video' (content is never decoded here)."""
  np.save(tmp_path / "emb.npy", np.zeros((4, 8), np.float32))
  (tmp_path / "img.png").write_bytes(b"png")
  (tmp_path / "clip.mp4").write_bytes(b"mp4")
  (tmp_path / "prompt.txt").write_text("  a robot  \n")
  return tmp_path


def _write(path: pathlib.Path, data) -> pathlib.Path:
  path.write_text(json.dumps(data))
  return path


def test_defaults_and_relative_paths(assets, tmp_path, monkeypatch):
  spec_file = _write(assets / "s.json", {"name": "a", "prompt_embedding": "emb.npy"})
  monkeypatch.chdir("/")  # paths resolve against the spec file's folder, not the cwd
  (s,) = load_specs(spec_file, DEFAULTS)
  assert s.prompt_embedding == str((assets / "emb.npy").resolve())
  assert (s.num_conditional_frames, s.inference_type, s.input_path) == (0, "text2world", None)
  assert (s.seed, s.guidance, s.num_steps, s.shift, s.fps) == (0, 7.0, 35, 5.0, 16.0)
  assert (s.resolution, s.num_frames, s.output) == ((32, 48), 9, "a.mp4")
  assert s.output_path(tmp_path / "out") == tmp_path / "out" / "a.mp4"


def test_conditioning_from_input_kind(assets):
  entries = [
      {"name": "img", "prompt_embedding": "emb.npy", "input_path": "img.png"},
      {"name": "vid", "prompt_embedding": "emb.npy", "input_path": "clip.mp4"},
      {"name": "vid1", "prompt_embedding": "emb.npy", "input_path": "clip.mp4", "inference_type": "image2world"},
      {"name": "vid1b", "prompt_embedding": "emb.npy", "input_path": "clip.mp4", "num_conditional_frames": 1},
      {"name": "t2w", "prompt_embedding": "emb.npy", "input_path": "clip.mp4", "inference_type": "text2world"},
  ]
  specs = load_specs(_write(assets / "s.json", entries), DEFAULTS)
  got = {s.name: (s.num_conditional_frames, s.input_kind) for s in specs}
  assert got == {"img": (1, "image"), "vid": (2, "video"), "vid1": (1, "video"), "vid1b": (1, "video"),
                 "t2w": (0, None)}


def test_fields_and_formats(assets):
  entry = {"name": "x", "prompt_path": "prompt.txt", "seed": 3, "guidance": 0, "num_steps": 4, "shift": 3.0,
           "resolution": "64,96", "num_frames": 13, "output": "sub/x.mp4", "num_output_frames": 13}
  (s,) = load_specs(_write(assets / "s.json", entry), DEFAULTS)
  assert (s.prompt, s.seed, s.guidance, s.num_steps, s.shift) == ("a robot", 3, 0.0, 4, 3.0)
  assert (s.resolution, s.num_frames, s.output) == ((64, 96), 13, "sub/x.mp4")
  # YAML list, JSONL lines, list resolution, reference alias num_output_frames.
  (assets / "s.yaml").write_text("- name: y\n  prompt: hi\n  resolution: [16, 32]\n- name: z\n  prompt: hi\n")
  ys = load_specs(assets / "s.yaml", DEFAULTS)
  assert [(s.name, s.resolution) for s in ys] == [("y", (16, 32)), ("z", (32, 48))]
  (assets / "s.jsonl").write_text('{"name": "p", "prompt": "a", "num_output_frames": 5}\n\n{"name": "q", "prompt": "b"}\n')
  js = load_specs(assets / "s.jsonl", DEFAULTS)
  assert [(s.name, s.num_frames) for s in js] == [("p", 5), ("q", 9)]


def test_default_negative_embedding(assets):
  neg = str(assets / "emb.npy")
  d = SpecDefaults(resolution=(32, 48), num_frames=9, negative_prompt_embedding=neg)
  entries = [{"name": "a", "prompt": "x"},
             {"name": "b", "prompt": "x", "negative_prompt_embedding": "emb.npy"}]
  a, b = load_specs(_write(assets / "s.json", entries), d)
  assert a.negative_prompt_embedding == neg and b.negative_prompt_embedding == str((assets / "emb.npy").resolve())


BAD_ENTRIES = [
    ({"name": "a"}, "needs 'prompt' or 'prompt_path'"),
    ({"prompt": "x"}, "field 'name'"),
    ({"name": "a/b", "prompt": "x"}, "field 'name'"),
    ({"name": "a", "prompt": "x", "guidance": -1}, "field 'guidance'"),
    ({"name": "a", "prompt": "x", "guidance": "high"}, "field 'guidance'"),
    ({"name": "a", "prompt": "x", "seed": 1.5}, "field 'seed'"),
    ({"name": "a", "prompt": "x", "num_steps": 0}, "field 'num_steps'"),
    ({"name": "a", "prompt": "x", "shift": 0}, "field 'shift'"),
    ({"name": "a", "prompt": "x", "num_frames": 10}, "field 'num_frames'"),
    ({"name": "a", "prompt": "x", "num_frames": 1}, "field 'num_frames'"),
    ({"name": "a", "prompt": "x", "resolution": "30,48"}, "field 'resolution'"),
    ({"name": "a", "prompt": "x", "resolution": "big"}, "field 'resolution'"),
    ({"name": "a", "prompt": "x", "input_path": "missing.png"}, "field 'input_path'"),
    ({"name": "a", "prompt": "x", "input_path": "emb.npy"}, "field 'input_path'"),
    ({"name": "a", "prompt": "x", "prompt_embedding": "missing.npy"}, "field 'prompt_embedding'"),
    ({"name": "a", "prompt": "x", "input_path": "img.png", "num_conditional_frames": 2},
     "field 'num_conditional_frames'"),
    ({"name": "a", "prompt": "x", "num_conditional_frames": 1}, "field 'input_path'"),
    ({"name": "a", "prompt": "x", "num_conditional_frames": 3, "input_path": "clip.mp4"},
     "field 'num_conditional_frames'"),
    ({"name": "a", "prompt": "x", "inference_type": "video2video"}, "field 'inference_type'"),
    ({"name": "a", "prompt": "x", "inference_type": "video2world", "num_conditional_frames": 1,
      "input_path": "clip.mp4"}, "field 'num_conditional_frames'"),
    ({"name": "a", "prompt": "x", "input_path": "clip.mp4", "num_frames": 5}, "field 'num_frames'"),
    ({"name": "a", "prompt": "x", "colour": "red"}, "unknown field(s) ['colour']"),
    ({"name": "a", "prompt": "x", "output": "a.avi"}, "field 'output'"),
    ({"name": "a", "prompt": "x", "enable_autoregressive": True}, "field 'enable_autoregressive'"),
    ("just a string", "must be an object"),
]


@pytest.mark.parametrize("entry,needle", BAD_ENTRIES, ids=[n for _, n in BAD_ENTRIES])
def test_bad_entry_names_file_and_field(assets, entry, needle):
  path = _write(assets / "bad.json", [{"name": "ok", "prompt": "x"}, entry])
  with pytest.raises(SpecError) as e:
    load_specs(path, DEFAULTS)
  msg = str(e.value)
  assert needle in msg and f"{path}: entry 1" in msg, msg
  assert "entry 0" not in msg  # the good entry is not blamed


def test_all_problems_reported_at_once(assets):
  path = _write(assets / "bad.json", [{"name": "a", "prompt": "x", "guidance": -1, "num_frames": 10},
                                      {"name": "a", "prompt": "y"}])
  with pytest.raises(SpecError) as e:
    load_specs(path, DEFAULTS)
  msg = str(e.value)
  assert "field 'guidance'" in msg and "field 'num_frames'" in msg and "not unique" not in msg  # bad entry dropped
  path = _write(assets / "dup.json", [{"name": "a", "prompt": "x"}, {"name": "a", "prompt": "y"},
                                      {"name": "b", "prompt": "y", "output": "a.mp4"}])
  with pytest.raises(SpecError, match="(?s)'a' is not unique.*'a.mp4' is also written"):
    load_specs(path, DEFAULTS)


def test_bad_files(tmp_path):
  with pytest.raises(SpecError, match="does not exist"):
    load_specs(tmp_path / "nope.json", DEFAULTS)
  (tmp_path / "x.json").write_text("{not json")
  with pytest.raises(SpecError, match=f"{tmp_path / 'x.json'}: cannot parse"):
    load_specs(tmp_path / "x.json", DEFAULTS)
  (tmp_path / "x.txt").write_text("{}")
  with pytest.raises(SpecError, match="unsupported spec extension"):
    load_specs(tmp_path / "x.txt", DEFAULTS)
  (tmp_path / "e.json").write_text("[]")
  with pytest.raises(SpecError, match="no samples"):
    load_specs(tmp_path / "e.json", DEFAULTS)


def test_input_kind():
  assert spec_lib.input_kind("a/B.JPG") == "image" and spec_lib.input_kind("x.mp4") == "video"
  assert spec_lib.input_kind(os.path.join("d", "x.npy")) is None


REFERENCE_SPECS = pathlib.Path(__file__).parent / "assets" / "reference_specs"


def test_reference_layout_files_as_they_are(monkeypatch):
  monkeypatch.chdir("/")  # relative paths resolve against the spec file's folder
  t2w = load_specs(REFERENCE_SPECS / "text2world.json", DEFAULTS)
  assert [(s.name, s.inference_type, s.input_path) for s in t2w] == [
      ("teal_robot_idle", "text2world", None), ("night_warehouse", "text2world", None)]
  assert t2w[0].prompt == (REFERENCE_SPECS / "teal_robot_idle.txt").read_text().strip()
  assert t2w[1].prompt == "An empty warehouse at night, lit by a single lamp."
  assert t2w[0].where == f"{REFERENCE_SPECS / 'text2world.json'}: sample 'teal_robot_idle'"
  (i2w,) = load_specs(REFERENCE_SPECS / "image2world.json", DEFAULTS)
  assert (i2w.name, i2w.num_conditional_frames, i2w.input_kind) == ("teal_robot_arm", 1, "image")
  assert i2w.input_path == str((REFERENCE_SPECS / "teal_robot_arm.jpg").resolve())
  (v2w,) = load_specs(REFERENCE_SPECS / "video2world.json", DEFAULTS)
  assert (v2w.num_conditional_frames, v2w.input_kind, v2w.output) == (2, "video", "teal_robot_pick.mp4")
  # The shared top-level settings apply to every sample.
  assert (v2w.seed, v2w.guidance, v2w.negative_prompt, v2w.resolution) == (3, 5.0, "Blurry, static footage.", (32, 48))


def test_reference_layout_shared_settings_and_problems(assets):
  spec = {"inference_type": "image2world", "seed": 4, "prompt": "shared prompt", "samples": {
      "a": {"input_path": "img.png"},
      "b": {"prompt_path": "prompt.txt", "input_path": "clip.mp4", "seed": 9, "num_conditional_frames": 2},
  }}
  a, b = load_specs(_write(assets / "ref.json", spec), DEFAULTS)
  assert (a.name, a.seed, a.prompt, a.num_conditional_frames) == ("a", 4, "shared prompt", 1)
  assert (b.name, b.seed, b.prompt, b.num_conditional_frames) == ("b", 9, "a robot", 2)  # the sample's own win
  bad = {"inference_type": "video2world", "stepz": 3, "samples": {"a": {"prompt": "x", "input_path": "img.png"}}}
  with pytest.raises(SpecError, match=r"unknown top-level field\(s\) \['stepz'\]"):
    load_specs(_write(assets / "bad.json", bad), DEFAULTS)
  bad = {"inference_type": "video2world", "samples": {"a": {"prompt": "x"}, "b": {"prompt": "y", "guidance": -1}}}
  with pytest.raises(SpecError) as info:
    load_specs(_write(assets / "bad.json", bad), DEFAULTS)
  msg = str(info.value)
  assert "sample 'a': field 'input_path': required" in msg and "sample 'b': field 'guidance'" in msg
  with pytest.raises(SpecError, match="'samples' must be a non-empty object"):
    load_specs(_write(assets / "bad.json", {"inference_type": "text2world", "samples": []}), DEFAULTS)
