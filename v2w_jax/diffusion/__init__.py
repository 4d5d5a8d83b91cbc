"""Diffusion math: objectives (rectified flow, EDM), Video2World conditioning, samplers."""
