"""Real multi-process tests on CPU: gloo process groups in spawned workers, with a free port and a timeout.

    run_workers(fn, world_size, *args, timeout=...)     # fn(rank, world_size, *args), a module-level function

Each worker gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), one thread, and
its process group destroyed at the end whatever happens. A worker that raises fails the test with its traceback;
a run past `timeout` (a deadlock: a collective one rank never joined) kills every worker and fails the test, so a
distributed bug can never hang CI.
"""
from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout: float = 180.0) -> None:
    """Run fn(rank, world_size, *args) in world_size spawned processes; raise if any fails or time runs out."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} processes did not finish in {timeout:.0f} s "
                                   f"(a collective that some rank never joined?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
