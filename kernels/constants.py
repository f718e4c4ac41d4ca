"""Constants shared by the kernels and the code that builds their inputs."""

NO_ADAPTER = -1
"""Segment slot of tokens that use the base model only: LoRA kernels skip them."""

KERNEL_BACKENDS = ("auto", "triton", "native", "torch", "reference")
"""`auto`: Triton on CUDA, the native C kernels on a CPU (the torch path where they cannot be
built); each other name forces one. See kernels/dispatch.py."""

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
"""The gated MLP's activations (transformers' ACT2FN names): SwiGLU's SiLU, GeGLU's tanh GELU."""
