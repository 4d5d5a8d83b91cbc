"""Input pipeline: video clips, text embeddings, grain loader, bad-input checker."""
