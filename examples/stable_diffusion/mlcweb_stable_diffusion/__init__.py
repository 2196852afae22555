"""Stable Diffusion v1.5 for mlcweb: a plugin package registered through the ``mlcweb`` entry point."""

MODEL_NAME = "stable-diffusion"
