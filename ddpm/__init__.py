"""Denoising diffusion models as functional JAX/Flax programs."""
