"""The engine core, in its own process, and the records both processes share.

core.py (`EngineCore`: requests, scheduler, pool bookkeeping, one step = schedule ->
runner.execute -> postprocess), service.py (`CoreService`: the
messages handled, the one loop turn), core_process.py (the process's loop and its channel),
admission.py, adapter_manager.py. The records travel between the processes or into the
runner: request.py (`EngineRequest`, `RequestState`, `Step`), outputs.py, ipc.py,
sampling_params.py, config.py. The records import no torch (the front end uses them).
"""
