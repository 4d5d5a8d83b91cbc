"""Networks: the DiT (MinimalV1LVGDiT) and the Wan2.1 VAE. Nothing here knows about training."""
