"""A tensor-parallel rank other than 0: `python -P -m loraserve.engine.runner.tp_worker HOST PORT`.

Started by rank 0 (engine/runner/tensor_parallel.py), with the connection's key in the
environment. It connects, receives its configuration and shard, joins the ranks' group,
builds its `TorchModelRunner`, says "ready", then executes every `ShardStep` rank 0 sends
until the connection closes (the engine stops, or its process is gone). An error is logged
and exits the process with code 1: rank 0's watchdog ends the engine.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Client

import torch

from loraserve.engine.runner.collectives import RankCollectives, join_store
from loraserve.engine.runner.runner import TorchModelRunner
from loraserve.engine.runner.tensor_parallel import AUTHKEY_VARIABLE

logger = logging.getLogger("loraserve.engine.runner.tp_worker")


def main(host: str, port: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the front end stops the engine
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_VARIABLE))
    connection = Client((host, port), authkey=authkey)
    config, arch, geometry, eos_token_ids = connection.recv()
    shard, store_port = connection.recv()
    logging.basicConfig(
        level=logging.WARNING, format=f"%(levelname)s %(name)s (rank {shard.rank}): %(message)s"
    )
    try:
        collectives = RankCollectives(
            join_store(store_port, shard.size), shard, torch.device(config.model.device)
        )
        runner = TorchModelRunner(config, arch, geometry, eos_token_ids, collectives)
        connection.send("ready")
        while True:
            try:
                data = connection.recv_bytes()
            except EOFError:  # rank 0 closed: the engine stopped
                return 0
            loads = pickle.loads(connection.recv_bytes())  # this rank's slabs of the copies
            runner.execute_shard(pickle.loads(data), loads)
    except Exception:
        logger.exception("tensor-parallel rank %d failed; it exits", shard.rank)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
