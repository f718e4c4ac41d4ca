"""The model runner: everything of a step that touches the device (engine-core process).

runner.py executes a `Step`; batch_metadata.py builds the step's metadata into static
buffers; device_pool.py holds the pool tensor and the LoRA tables; copy_stream.py copies
adapters on a side stream; cuda_graphs.py captures decode. It never imports the client.
"""
