"""Local data-parallel workers: ``pyssl train --nproc N`` runs N processes with torchrun's
environment (Gloo on the CPU, NCCL on CUDA, one GPU each)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable


class LaunchError(Exception):
    """The workers cannot be started as asked (reported as one line)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(target: Callable[[object], int], args, nproc: int, device_type: str, expected_errors: tuple) -> int:
    """Runs ``target(args)`` in ``nproc`` local processes with torchrun's environment. The first
    worker to fail is reported as one line, ``pyssl: error: ...`` (the others are stopped); exit
    code 2 for one of ``expected_errors`` (a configuration error), 1 for anything else.
    ``target`` and ``args`` must be picklable (the workers are spawned).

    Ctrl-C reaches the workers as it reaches a single process (a terminal signals them all; a
    SIGINT to this process alone is passed on), and the workers' own interruption is raised
    here, so the caller reports it as it would one process's (how far the run got, how to
    resume). A second Ctrl-C stops the workers at once."""
    import torch
    import torch.multiprocessing as mp

    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError(f"--nproc {nproc} on CUDA requested but CUDA is not available")
        if nproc > torch.cuda.device_count():
            raise LaunchError(f"--nproc {nproc} needs {nproc} GPUs, {torch.cuda.device_count()} visible")
    # torch logs a line per worker it stops after a failure; the failure itself is our one line
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)}
    queues = mp.get_context("spawn")
    errors, interruptions = queues.SimpleQueue(), queues.SimpleQueue()
    context = mp.start_processes(
        _worker,
        args=(target, args, env, errors, interruptions, device_type, expected_errors),
        nprocs=nproc,
        join=False,
        start_method="spawn",
    )
    try:
        _join(context)
    except mp.ProcessExitedException as e:
        # A worker that stopped on Ctrl-C may take its peers' collectives down with it: their
        # errors are the interruption's, not a failure of their own.
        _raise_interruption(interruptions)
        if not errors.empty():
            message = errors.get()
        elif e.signal_name:
            message = f"worker {e.error_index} was killed by {e.signal_name}"
        else:
            message = f"worker {e.error_index} exited with code {e.exit_code}"
        print(f"pyssl: error: {message}", file=sys.stderr)
        return 2 if e.exit_code == 2 else 1
    except mp.ProcessRaisedException as e:  # not expected: _worker reports everything itself
        print(f"pyssl: error: worker {e.error_index}: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    _raise_interruption(interruptions)
    return 0


# How long the workers have to notice a Ctrl-C that reached this process alone, and then to
# stop on it (they finish the step's collective and the log lines, never a checkpoint).
_INTERRUPT_GRACE_S = 2.0
_INTERRUPT_STOP_S = 120.0


def _join(context) -> None:
    """Waits for every worker. On Ctrl-C: waits for them to stop on it (passing the SIGINT on to
    any that did not get it); on a second Ctrl-C or past the time limit, terminates them."""
    import signal

    try:
        while not context.join():
            pass
        return
    except KeyboardInterrupt:
        pass
    try:
        if not _join_within(context, _INTERRUPT_GRACE_S):
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
            if not _join_within(context, _INTERRUPT_STOP_S):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        raise


def _join_within(context, seconds: float) -> bool:
    """Whether every worker ended within ``seconds`` (a failed one raises, as ``join`` does)."""
    import time

    deadline = time.monotonic() + seconds
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            return False
    return True


def _raise_interruption(interruptions) -> None:
    """Raises the first worker's interruption (the lowest rank's: they agree on the step and the
    checkpoint), if a worker stopped on Ctrl-C."""
    reports = []
    while not interruptions.empty():
        reports.append(interruptions.get())
    if reports:
        raise min(reports, key=lambda report: report[0])[1]


def _worker(
    local_rank: int, target, args, env: dict, errors, interruptions, device_type: str, expected_errors: tuple
) -> None:
    import signal

    import torch

    os.environ.update(env, RANK=str(local_rank), LOCAL_RANK=str(local_rank))
    if device_type == "cpu":  # the workers share the cores, as torchrun's OMP_NUM_THREADS does
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(env["WORLD_SIZE"])))
    try:
        rc = target(args)
    except KeyboardInterrupt as e:
        # One Ctrl-C is enough: a second one (passed on by the parent) must not cut the report.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        interruptions.put((local_rank, e))
        _leave(0)
    except expected_errors as e:
        errors.put(str(e))
        rc = 2
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        errors.put(f"worker {local_rank}: {type(e).__name__}: {first}")
        rc = 1
    _leave(rc)


def _leave(rc: int) -> None:
    """Ends a worker whose work is done (process group destroyed, logs closed, reports queued)
    without C++ static destructors: at that point Gloo can still abort the process ("terminate
    called without an active exception", SIGABRT), which the launcher would report as a failed
    run after a complete one (seen in about 1 run in 5 of the 2-process tests)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
