"""Constants shared by the kernels and the code that builds their inputs."""

NO_ADAPTER = -1
"""Segment slot of tokens that use the base model only: LoRA kernels skip them."""
