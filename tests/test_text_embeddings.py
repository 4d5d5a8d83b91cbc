"""Text embeddings: the store format, and the Reason1 FULL_CONCAT tool against the reference fixture.

Pad lengths, captions and the reference's own bf16 error come from the fixture folder (captions.json,
fixture_meta.json), so any text_embed folder of the same layout must pass.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from v2w_jax.data import text as text_lib

# ----------------------------------------------------------------------------------------------
# Store.


def test_store_roundtrip_is_bit_exact_and_memory_mapped(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((7, 12)).astype(text_lib.BF16)
  b = rng.standard_normal((7, 12)).astype(np.float32)
  store = text_lib.TextEmbeddingStore(tmp_path / "emb")
  store.write([("first caption", a), ("zweite Überschrift ☕", b)], encoder="test")
  again = text_lib.TextEmbeddingStore(tmp_path / "emb")
  got = again.load("first caption", 7, 12)
  assert got.dtype == text_lib.BF16 and isinstance(got, np.memmap)  # read lazily, not copied
  np.testing.assert_array_equal(got.view(np.uint16), a.view(np.uint16))
  np.testing.assert_array_equal(again.load("zweite Überschrift ☕").astype(np.float32), b.astype(text_lib.BF16).astype(np.float32))
  assert again.path_for("first caption").name == text_lib.caption_key("first caption") + ".npy"
  assert text_lib.caption_key("first caption") == __import__("hashlib").sha256(b"first caption").hexdigest()[:16]
  info = again.info()
  assert (info.tokens, info.width, info.dtype, info.encoder) == (7, 12, "bfloat16", "test")
  # Merging keeps earlier entries; another shape is refused.
  again.write([("third", a)], encoder="test")
  assert sorted(text_lib.TextEmbeddingStore(tmp_path / "emb").captions()) == sorted(["first caption", "zweite Überschrift ☕", "third"])
  with pytest.raises(ValueError, match="store holds"):
    again.write([("other", np.zeros((3, 12), np.float32))], encoder="test")
  assert not list((tmp_path / "emb").glob("*.tmp"))


def test_store_errors_name_the_file(tmp_path):
  store = text_lib.TextEmbeddingStore(tmp_path / "emb")
  with pytest.raises(text_lib.EmbeddingError, match="index.json"):
    store.load("x")
  store.write([("x", np.zeros((4, 6), np.float32))], encoder="test")
  with pytest.raises(text_lib.EmbeddingError, match="no embedding for caption 'y'"):
    store.load("y")
  assert "shape (4, 6), expected (4, 7)" in store.validate("x", 4, 7)
  np.save(store.path_for("x"), np.zeros((4, 6), np.float64))
  assert "dtype float64" in store.validate("x", 4, 6)
  store.path_for("x").write_bytes(b"garbage")
  assert "unreadable .npy" in store.validate("x", 4, 6)
  store.path_for("x").unlink()
  assert "embedding file missing" in store.validate("x", 4, 6)


def test_standardize_tokens():
  h = np.random.default_rng(1).standard_normal((5, 33)) * 7 + 3
  z = text_lib.standardize_tokens(h)
  np.testing.assert_allclose(z.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(-1, ddof=1), 1, atol=1e-5)


def test_base_package_imports_without_torch(repo_root):
  code = (
      "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
      "import v2w_jax.data.text, v2w_jax.data.dataset, v2w_jax.data.check, v2w_jax.data.sample_dataset\n"
      "import tools.compute_text_embeddings as t\n"
      "print('ok')\n"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ----------------------------------------------------------------------------------------------
# Reason1 tool vs the reference fixture.


FP32_MAX_ABS = 1e-4  # fixture README tolerance rule: fp32 tool vs the fp32 / fp64 references
BF16_MAX_ABS = 0.25  # ... and a bf16 tool vs the bf16 reference, elementwise (kernel changes flip roundings)
BF16_REL_RMS_FACTOR = 2.0  # ... and its RMS error vs fp64: about twice the reference's own (README)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  d = fixtures_dir / "text_embed_tiny"
  caps = json.loads((d / "captions.json").read_text())
  return d, caps, np.load(d / "outputs.npz")


def _short_pad(caps) -> int:
  """The smallest pad length of the fixture (the cheapest to run)."""
  return min(caps["pad_lengths"])


@pytest.fixture(scope="module")
def encoders(fixture):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tools import compute_text_embeddings as tool  # pylint: disable=import-outside-toplevel

  d, _, _ = fixture
  return {dt: tool.ReasonTextEncoder(d, dtype=dt, device="cpu") for dt in ("float32", "bfloat16")}


def test_prompt_and_token_ids_exact(fixture, encoders):
  _, caps, out = fixture
  enc = encoders["float32"]
  assert enc.prompts(caps["captions"]) == caps["rendered_prompts"]
  for p in caps["pad_lengths"]:
    enc.num_tokens = p
    np.testing.assert_array_equal(enc.token_ids(caps["captions"]), out[f"input_ids_p{p}"])


def test_width_comes_from_the_model_config(fixture, encoders):
  d, caps, out = fixture
  cfg = json.loads((d / "config.json").read_text())
  cfg = cfg.get("text_config", cfg)
  enc = encoders["float32"]
  p = _short_pad(caps)
  assert enc.width == cfg["num_hidden_layers"] * cfg["hidden_size"] == out[f"emb_fp32_p{p}"].shape[-1]


def test_fp32_matches_the_reference(fixture, encoders):
  _, caps, out = fixture
  enc = encoders["float32"]
  for p in caps["pad_lengths"]:
    enc.num_tokens = p
    got = enc.embed(caps["captions"])
    assert got.dtype == np.float32 and got.shape == out[f"emb_fp32_p{p}"].shape
    assert np.abs(got - out[f"emb_fp32_p{p}"]).max() <= FP32_MAX_ABS
    assert np.abs(got - out[f"emb_fp64_p{p}"]).max() <= FP32_MAX_ABS


def test_bf16_matches_the_reference_statistically(fixture, encoders):
  d, caps, out = fixture
  measured = json.loads((d / "fixture_meta.json").read_text())["errors"]
  enc = encoders["bfloat16"]
  for p in caps["pad_lengths"]:
    enc.num_tokens = p
    got = enc.embed(caps["captions"])
    assert got.dtype == text_lib.BF16 and got.shape == out[f"emb_bf16_p{p}"].shape
    got = got.astype(np.float32)
    ref64 = out[f"emb_fp64_p{p}"]
    rel = np.sqrt(np.mean((got - ref64) ** 2)) / np.sqrt(np.mean(ref64**2))
    assert rel <= BF16_REL_RMS_FACTOR * measured[str(p)]["bf16_ref_vs_fp64"]["rel_rms"], (p, rel)
    assert np.abs(got - out[f"emb_bf16_p{p}"]).max() <= BF16_MAX_ABS


def test_pad_rows_are_kept_and_no_mask_is_used(fixture, encoders):
  _, caps, out = fixture
  enc = encoders["float32"]
  p = _short_pad(caps)
  i = next((i for i, n in enumerate(out["n_tokens"]) if n < p), None)
  assert i is not None, f"no caption of the fixture is shorter than {p} tokens: nothing is padded"
  enc.num_tokens = p
  got = enc.embed(caps["captions"][i:i + 1])
  n = int(out["n_tokens"][i])
  np.testing.assert_allclose(got[0, n:], out[f"emb_fp32_p{p}"][i, n:], atol=FP32_MAX_ABS)  # pad rows, not zeros
  assert np.abs(got[0, n:]).max() > 0.5


def test_tool_writes_a_store_the_loader_reads(fixture, encoders, tmp_path):
  from tools import compute_text_embeddings as tool  # pylint: disable=import-outside-toplevel

  _, caps, out = fixture
  enc = encoders["bfloat16"]
  p = enc.num_tokens = _short_pad(caps)
  ds = tmp_path / "ds"
  (ds / "videos").mkdir(parents=True)
  (ds / "metas").mkdir()
  for i, c in enumerate(caps["captions"][:2] * 2):  # duplicates: one file per distinct caption
    (ds / "videos" / f"v{i}.mp4").write_bytes(b"")
    (ds / "metas" / f"v{i}.txt").write_text(c + "\n")
  found, problems = tool.dataset_captions(ds)
  assert not problems and len(found) == 2
  done = tool.compute_store(found, ds / "text_embeddings", enc)
  assert sorted(done) == sorted(found)
  assert tool.compute_store(found, ds / "text_embeddings", enc) == []  # already there
  store = text_lib.TextEmbeddingStore(ds / "text_embeddings")
  assert len(list((ds / "text_embeddings").glob("*.npy"))) == 2
  for i, c in enumerate(caps["captions"][:2]):
    got = store.load(c, p, enc.width).astype(np.float32)
    assert np.abs(got - out[f"emb_bf16_p{p}"][i]).max() <= BF16_MAX_ABS


def test_tool_adds_the_default_negative_prompt(fixture, encoders, tmp_path):
  """The CLI stores the reference's default negative prompt under the key the generator's resolver reads,
  unless --no_negative_prompt."""
  from tools import compute_text_embeddings as tool  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference.embeddings import EmbeddingResolver  # pylint: disable=import-outside-toplevel
  from v2w_jax.inference.spec import DEFAULT_NEGATIVE_PROMPT, load_specs  # pylint: disable=import-outside-toplevel

  d, caps, _ = fixture
  enc = encoders["float32"]
  p = enc.num_tokens = _short_pad(caps)
  common = [f"--model_dir={d}", f"--num_tokens={p}", "--dtype=float32", "--device=cpu",
            f"--caption={caps['captions'][0]}"]
  assert tool.main([*common, f"--out_dir={tmp_path / 'with'}"]) == 0
  assert tool.main([*common, f"--out_dir={tmp_path / 'without'}", "--no_negative_prompt"]) == 0
  with_neg = text_lib.TextEmbeddingStore(tmp_path / "with")
  assert sorted(with_neg.captions()) == sorted([caps["captions"][0], DEFAULT_NEGATIVE_PROMPT])
  assert list(text_lib.TextEmbeddingStore(tmp_path / "without").captions()) == [caps["captions"][0]]
  got = with_neg.load(DEFAULT_NEGATIVE_PROMPT, p, enc.width)  # the store keeps bf16
  want = enc.embed([DEFAULT_NEGATIVE_PROMPT])[0].astype(text_lib.BF16)
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  (tmp_path / "spec.json").write_text(json.dumps({"name": "a", "prompt": caps["captions"][0]}))
  spec, = load_specs(tmp_path / "spec.json")
  _, neg = EmbeddingResolver(enc.width, tmp_path / "with").resolve(spec)
  np.testing.assert_array_equal(neg.view(np.uint16), want.view(np.uint16))
  assert EmbeddingResolver(enc.width, tmp_path / "without").resolve(spec)[1] is None  # -> all-zero text
