"""loraserve: serve thousands of LoRA adapters on one base model.

The public Python API is `LLM` and `SamplingParams`; the HTTP server is
`loraserve serve` (see README).
"""
