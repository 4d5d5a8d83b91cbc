"""The FLOP formula reproduces the reference timing anchor's model FLOPs term by term."""

import json

import pytest

from configs import nemo
from v2w_jax.training import flops


@pytest.mark.parametrize("shape", ["480p", "720p"])
def test_matches_reference_anchor(reference_file, shape):
  anchor = json.loads(reference_file("perf_anchor_torch_h200.json").read_text())
  fm = anchor["flop_model"][shape]
  latent = next(r["latent"] for r in anchor["results"] if r["shape"] == shape)
  got = flops.dit_flops(nemo.model_2b(), tuple(latent[1:]), fm["text_tokens"])
  for name, want in fm["forward"].items():
    assert got.forward[name] == pytest.approx(want, rel=1e-12), name
  assert got.train_step == pytest.approx(fm["model_flops"], rel=1e-12)


def test_peak_flops_known_and_unknown():
  class Dev:
    device_kind = "NVIDIA H200"
  assert flops.peak_flops(Dev()) == 989e12
  assert flops.peak_flops(object()) is None
