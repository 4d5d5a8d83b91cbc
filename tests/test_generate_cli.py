"""``python -m v2w_jax.generate`` end to end on the tiny config (CPU, random weights, 2 steps)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from v2w_jax.data.video import write_mp4, write_png


def _run(repo_root, *args: str, cpu_only: bool = True) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  if cpu_only:
    env["JAX_PLATFORMS"] = "cpu"
  else:
    env.pop("JAX_PLATFORMS", None)
  return subprocess.run([sys.executable, "-m", "v2w_jax.generate", "--config=configs/tiny.py", *args],
                        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600, check=False)


def _read_mp4(path):
  import av  # pylint: disable=import-outside-toplevel

  with av.open(str(path)) as c:
    stream = c.streams.video[0]
    frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    return np.stack(frames), float(stream.average_rate)


@pytest.fixture()
def assets(tmp_path):
  rng = np.random.default_rng(0)
  np.save(tmp_path / "emb.npy", rng.standard_normal((16, 48)).astype(np.float32))  # tiny DiT: D = 48
  np.save(tmp_path / "neg.npy", rng.standard_normal((16, 48)).astype(np.float32))
  write_png(tmp_path / "img.png", rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
  write_mp4(tmp_path / "clip.mp4", rng.integers(0, 256, (7, 36, 48, 3), dtype=np.uint8), 16)
  return tmp_path


def test_cli_end_to_end(repo_root, assets, tmp_path):
  spec = [
      {"name": "img", "prompt_embedding": "emb.npy", "negative_prompt_embedding": "neg.npy",
       "input_path": "img.png", "num_steps": 2, "seed": 1},
      {"name": "vid", "prompt_embedding": "emb.npy", "input_path": "clip.mp4", "num_steps": 2,
       "num_frames": 13, "output": "sub/vid.mp4"},
  ]
  (assets / "spec.json").write_text(json.dumps(spec))
  out = tmp_path / "out"
  r = _run(repo_root, f"--spec={assets / 'spec.json'}", f"--output_dir={out}", "--allow_random_weights",
           f"--negative_prompt_embedding={assets / 'neg.npy'}")
  assert r.returncode == 0, r.stderr[-4000:]
  for path, frames in ((out / "img.mp4", 9), (out / "sub" / "vid.mp4", 13)):
    video, fps = _read_mp4(path)
    assert video.shape == (frames, 32, 48, 3) and fps == 16.0, (path, video.shape, fps)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["num_frames"] == frames and record["checkpoint"] == "random"
  rec = json.loads((out / "sub" / "vid.json").read_text())
  assert rec["inference_type"] == "video2world" and rec["num_conditional_frames"] == 2
  assert rec["negative_prompt_embedding"] == str(assets / "neg.npy")  # the CLI default applied
  assert json.loads((out / "img.json").read_text())["inference_type"] == "image2world"


def test_cli_rejects_bad_spec_and_missing_weights(repo_root, assets, tmp_path):
  (assets / "bad.json").write_text(json.dumps([{"name": "a", "prompt_embedding": "emb.npy", "guidance": -2}]))
  r = _run(repo_root, f"--spec={assets / 'bad.json'}", "--allow_random_weights")
  assert r.returncode == 2 and f"{assets / 'bad.json'}: entry 0 ('a'): field 'guidance'" in r.stderr, r.stderr
  np.save(assets / "wide.npy", np.zeros((16, 7), np.float32))
  (assets / "w.json").write_text(json.dumps([{"name": "a", "prompt_embedding": "wide.npy"}]))
  r = _run(repo_root, f"--spec={assets / 'w.json'}", "--allow_random_weights",
           f"--text_embeddings_dir={tmp_path / 'none'}")
  assert r.returncode == 2 and "width 7" in r.stderr, r.stderr[-2000:]
  (assets / "ok.json").write_text(json.dumps([{"name": "a", "prompt_embedding": "emb.npy"}]))
  r = _run(repo_root, f"--spec={assets / 'ok.json'}", f"--output_dir={tmp_path / 'o'}")
  assert r.returncode == 2 and "--allow_random_weights" in r.stderr, r.stderr[-2000:]


def test_build_pipeline_follows_the_objective(caplog):
  """configs/nemo_edm.py's objective on the tiny model: the generator's pipeline samples with EDM 2ab on the
  preconditioned DiT (the pipeline itself is tested in test_inference_pipeline.py); RF stays UniPC."""
  from configs import nemo_edm, tiny  # pylint: disable=import-outside-toplevel
  from v2w_jax import generate  # pylint: disable=import-outside-toplevel
  from v2w_jax.diffusion import samplers  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  pipe, info = generate.build_pipeline(config, allow_random_weights=True)
  assert info["objective"] == "rectified_flow" and pipe.sampler(35, 5.0) == samplers.RFSampler()
  config.objective = nemo_edm.get_config().objective
  config.model.timestep_scale = nemo_edm.get_config().model.timestep_scale
  with caplog.at_level("WARNING"):
    pipe, info = generate.build_pipeline(config, allow_random_weights=True)
  assert "timestep_scale" not in caplog.text
  assert info["objective"] == "edm" and pipe.dit_cfg.timestep_scale == 1.0
  assert pipe.sampler(35, 5.0) == samplers.EDMSampler(num_steps=35, sigma_max=80.0, sigma_min=0.0002,
                                                      sigma_data=0.5, sigma_conditional=1e-4)


REFERENCE_SPECS = pathlib.Path(__file__).parent / "assets" / "reference_specs"


def _one_error(r: subprocess.CompletedProcess) -> str:
  """The stderr of a run that failed on a user mistake: status 2, one ``error:`` message, no traceback."""
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-4000:]
  assert sum(line.startswith("error: ") for line in r.stderr.splitlines()) == 1, r.stderr[-4000:]
  return r.stderr[r.stderr.index("error: "):]


def test_reference_spec_with_the_text_encoder(repo_root, fixtures_dir, tmp_path):
  """The reference's own layout as it is; its prompts embedded by --text_encoder_dir; quiet logs."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from v2w_jax.convert import params_io  # pylint: disable=import-outside-toplevel
  from v2w_jax.data import text as text_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference import weights  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference.spec import DEFAULT_NEGATIVE_PROMPT  # pylint: disable=import-outside-toplevel
  from v2w_jax.models.dit_config import DiTConfig  # pylint: disable=import-outside-toplevel

  encoder = fixtures_dir / "text_embed_tiny"
  enc_cfg = json.loads((encoder / "config.json").read_text())
  width = enc_cfg["num_hidden_layers"] * enc_cfg["hidden_size"]
  config = tiny.get_config()
  config.model.crossattn_proj_in_channels = width
  params_io.save_params(tmp_path / "dit", weights.random_dit_params(DiTConfig.from_config(config.model)))
  out, store = tmp_path / "out", tmp_path / "store"
  r = _run(repo_root, f"--spec={REFERENCE_SPECS / 'image2world.json'}", f"--output_dir={out}",
           f"--config.model.crossattn_proj_in_channels={width}", f"--checkpoint={tmp_path / 'dit'}",
           "--allow_random_weights", f"--text_encoder_dir={encoder}", f"--text_embeddings_dir={store}",
           cpu_only=False)
  assert r.returncode == 0, r.stderr[-4000:]
  video, _ = _read_mp4(out / "teal_robot_arm.mp4")
  assert video.shape == (9, 32, 48, 3)
  record = json.loads((out / "teal_robot_arm.json").read_text())
  assert record["inference_type"] == "image2world" and record["input_path"].endswith("teal_robot_arm.jpg")
  prompt = (REFERENCE_SPECS / "teal_robot_arm.txt").read_text().strip()
  assert sorted(text_lib.TextEmbeddingStore(store).captions()) == sorted([prompt, DEFAULT_NEGATIVE_PROMPT])
  for noise in ("pytree_checkpoint_handler", "CheckpointHandler", "backend 'tpu'", "libtpu"):
    assert noise not in r.stderr, r.stderr[-4000:]


def test_missing_prompt_embeddings_are_one_error_with_the_command(repo_root, tmp_path):
  r = _run(repo_root, f"--spec={REFERENCE_SPECS / 'text2world.json'}", "--allow_random_weights",
           f"--text_embeddings_dir={tmp_path / 'store'}")
  msg = _one_error(r)
  assert "2 prompt(s) have no text embedding" in msg
  for sample in ("teal_robot_idle", "night_warehouse"):
    assert f"sample '{sample}'" in msg
  assert "python tools/compute_text_embeddings.py" in msg and f"--out_dir={tmp_path / 'store'}" in msg
  assert "'--caption=An empty warehouse at night, lit by a single lamp.'" in msg
  assert "--text_encoder_dir" in msg


def test_corrupt_input_video_is_one_error_naming_it(repo_root, assets, tmp_path):
  bad = assets / "broken.mp4"
  bad.write_bytes((REFERENCE_SPECS / "teal_robot_pick.mp4").read_bytes()[:2000])
  spec = {"inference_type": "video2world", "samples": {"broken": {"prompt_embedding": "emb.npy",
                                                                   "input_path": "broken.mp4"}}}
  (assets / "v.json").write_text(json.dumps(spec))
  msg = _one_error(_run(repo_root, f"--spec={assets / 'v.json'}", "--allow_random_weights",
                        f"--output_dir={tmp_path / 'o'}"))
  assert f"sample 'broken': field 'input_path': {bad}" in msg, msg


def test_help_cites_files_that_exist(repo_root):
  r = subprocess.run([sys.executable, "-m", "v2w_jax.generate", "--help"], cwd=repo_root, capture_output=True,
                     text=True, timeout=120, check=False)
  text = r.stdout + r.stderr
  cited = set(re.findall(r"\bassets/[\w./-]*\w", text))
  assert "assets/sample_spec.json" in cited and "--text_encoder_dir" in text
  for path in cited - {"assets/base/video2world.json"}:  # the reference repository's file, named as such
    assert (repo_root / path).exists(), path
