"""Video2World inference: generation specs, conditional-frame preparation, weights, and the pipeline.

* ``spec``: the JSON / JSONL / YAML sample list of ``python -m v2w_jax.generate`` (validated up front).
* ``conditioning``: image / video input -> the reference's resized, center-cropped conditional frames.
* ``weights``: DiT and VAE parameters from a training checkpoint (EMA), a params-only orbax folder or a
  reference ``.pt`` / ``.pth``.
* ``pipeline``: DiT + VAE + the objective's sampler (RF UniPC or EDM 2ab), jitted once per shape; the trainer's
  sample callback runs through it.
"""
