"""Video2World inference: generation specs, conditional-frame preparation, weights, and the pipeline.

* ``spec``: the JSON / JSONL / YAML sample list of ``python -m v2w_jax.generate`` (validated up front).
* ``conditioning``: image / video input -> the reference's resized, center-cropped conditional frames.
* ``weights``: DiT and VAE parameters from a training checkpoint (EMA), a params-only orbax folder or a
  reference ``.pt`` / ``.pth``.
* ``pipeline``: DiT + VAE + UniPC sampler, jitted once per shape; reusable by the trainer's sample callback.
"""
