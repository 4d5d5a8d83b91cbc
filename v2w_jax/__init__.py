"""v2w-jax: JAX/Flax port of Cosmos-Predict2.5 Video2World 2B post-training."""

__version__ = "0.1.0"
