"""Training: state pytree, the pure train step, optimizer, EMA, checkpoints, logging."""
