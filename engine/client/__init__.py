"""The front end's side of the engine, in the server's process (and in `LLM`'s).

`AsyncEngine` (async_engine.py) turns requests into streams of deltas over `CoreClient`
(core_client.py: the engine-core process and the ZeroMQ channels to it); the output
processor (output_processor.py, detokenizer.py) fans `n` out and turns token deltas into
text; adapter_names.py lists what may be served. `LLM` (llm.py) is the offline API: it sends
the same messages through `InprocClient` (inproc_client.py) to an `EngineCore` in its own
process, handled by the core process's `CoreService`. Nothing here imports the runner,
sampling, the kernels or the model's compute (tests/test_layering.py): the server's
process never loads torch.
"""
