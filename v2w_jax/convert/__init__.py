"""PyTorch <-> JAX weight conversion (safe .pt reader/writer and key mappings)."""
