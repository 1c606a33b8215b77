"""Run a function in W real processes over gloo and collect one result per rank.

Distributed checks in this project compare a sharded run against one process with the same
weights; they need real processes (collectives, process groups, Megatron's global parallel
state), not mocks. `run_distributed` starts W processes, initialises `torch.distributed` with
gloo on a free local port, applies `megatron_gdn.cpu.enable()` (so Megatron runs without a GPU;
a no-op on a CUDA machine), calls `fn(*args, **kwargs)` on every rank and returns the per-rank
return values (tensors included) to the caller. An exception on any rank is re-raised in the
caller as DistributedTestError with that rank's traceback; ranks that hang are killed after
`timeout` seconds.

Ranks fork from a server process that has imported torch and Megatron once, so the first
launch of a test session costs the imports (several seconds on a small machine) and later
ones well under a second. Still, group related checks into one function and one launch.

Example (the function must be importable by module name, i.e. defined at module level):

    from megatron_gdn.testing.dist import megatron_parallel, run_distributed

    def _tp2_logits(seed):
        with megatron_parallel(tp=2):           # parallel_state + RNG tracker; torn down after
            torch.manual_seed(seed)             # same CPU RNG on every rank -> same master weights
            model = build_model()               # e.g. with use_cpu_initialization=True
            return model(tokens).detach()       # comes back to the caller

    def test_tp2():
        rank0, rank1 = run_distributed(_tp2_logits, world_size=2, args=(1234,))
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "DistributedTestError",
    "run_distributed",
    "init_megatron",
    "destroy_megatron",
    "megatron_parallel",
    "free_port",
]


class DistributedTestError(RuntimeError):
    """A rank raised, crashed or timed out; the message holds each failing rank's traceback."""


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    # serialise in the child: tensors sent through a multiprocessing queue would otherwise
    # travel as shared-memory handles that die with the child process
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _context(start_method: str | None):
    if start_method is None:
        # Megatron's imports may initialise CUDA in the server, and a forked child cannot use
        # CUDA after that: with a GPU every rank starts fresh
        start_method = "spawn" if torch.cuda.is_available() else "forkserver"
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # imported once in the server (which starts on the first launch of the process and
        # serves all later ones); nothing there touches CUDA or starts threads. A module that
        # is not installed is skipped.
        ctx.set_forkserver_preload(
            ["torch", "torch.distributed", "megatron.core", "megatron.training.training",
             "megatron_gdn.cpu"]
        )
    return ctx


def _worker(rank, world_size, port, fn, args, kwargs, results, enable_cpu, num_threads, backend):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        torch.set_num_threads(num_threads)
        if enable_cpu:
            import megatron_gdn.cpu

            megatron_gdn.cpu.enable()
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
        )
        out = fn(*args, **kwargs)
        payload = (rank, "ok", _dumps(out))
    except BaseException:
        payload = (rank, "error", traceback.format_exc())
    # report before tearing down: after a failure the peers fail next, in their collectives
    # with this rank, and the first report should be the cause
    results.put(payload)
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:
            # a peer that already failed has closed its connections; the result is sent
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 300.0,
    enable_cpu: bool = True,
    num_threads: int = 1,
    start_method: str | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results by rank.

    fn: a module-level function (it is pickled by name into fresh processes).
    timeout: seconds for the whole launch, imports included.
    enable_cpu: apply `megatron_gdn.cpu.enable()` in each rank before the process group is made
        (a no-op on a CUDA machine).
    num_threads: torch intra-op threads per rank (keep W * num_threads <= cores).
    start_method: None (default) picks "forkserver" without a GPU (ranks fork from a server
        process that imported torch and Megatron once, which saves those imports per rank and
        per launch) and "spawn" with one; either can be forced.
    backend: "gloo" (CPU tensors; the default) or "nccl" (GPU machines: rank r uses device
        r % device_count).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = _context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, tuple(args), dict(kwargs or {}), results,
                  enable_cpu, num_threads, backend),
            # not daemonic: rank code may start processes of its own (data loader workers);
            # _stop terminates every rank on the way out
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                # a rank killed by a signal (or out of memory) never reports
                dead = [
                    r for r, p in enumerate(procs)
                    if p.exitcode is not None and r not in outputs and r not in errors
                ]
                if dead:
                    # give its queue message a moment to arrive before calling it a crash
                    time.sleep(0.5)
                    try:
                        while True:
                            rank, status, payload = results.get_nowait()
                            _record(rank, status, payload, outputs, errors)
                    except queue.Empty:
                        pass
                    for r in dead:
                        if r not in outputs and r not in errors:
                            errors[r] = f"process exited with code {procs[r].exitcode} without a result"
                if errors:
                    break
                continue
            _record(rank, status, payload, outputs, errors)
            if errors:
                # the others either fail next in a collective with the failed rank (collect
                # those reports for a moment) or hang in it
                _drain(results, outputs, errors, world_size, seconds=3.0)
                break
    finally:
        _stop(procs, grace=0.0 if errors or len(outputs) < world_size else 2.0)

    if errors or len(outputs) < world_size:
        missing = [r for r in range(world_size) if r not in outputs and r not in errors]
        parts = [f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors)]
        if missing:
            reason = "timed out" if not errors else "did not finish (stopped after a failure)"
            parts.append(f"ranks {missing} {reason} (timeout {timeout:.0f} s)")
        raise DistributedTestError(
            f"{getattr(fn, '__qualname__', fn)} failed on {world_size} ranks:\n" + "\n".join(parts)
        )
    return [outputs[r] for r in range(world_size)]


def _record(rank, status, payload, outputs, errors):
    if status == "ok":
        outputs[rank] = _loads(payload)
    else:
        errors[rank] = payload


def _drain(results, outputs, errors, world_size, seconds):
    deadline = time.monotonic() + seconds
    while len(outputs) + len(errors) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            rank, status, payload = results.get(timeout=remaining)
        except queue.Empty:
            return
        _record(rank, status, payload, outputs, errors)


def _stop(procs, grace: float):
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)


def init_megatron(tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None, seed: int = 1234,
                  **parallel_kwargs) -> None:
    """Initialise Megatron's model-parallel state and RNG tracker in a running process group.

    The data-parallel size is what remains of the world size; pass `dp` to have it checked.
    Extra keyword arguments go to `parallel_state.initialize_model_parallel`.
    Call `megatron_gdn.cpu.enable()` first on a machine without a GPU (run_distributed does).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world = torch.distributed.get_world_size()
    for name, size in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    if dp is not None and dp != world // (tp * pp * cp):
        raise ValueError(f"dp={dp} but world size {world} / (tp*pp*cp) = {world // (tp * pp * cp)}")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        **parallel_kwargs,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_megatron() -> None:
    """Undo init_megatron (process groups, RNG tracker, global memory buffer)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    parallel_state.destroy_model_parallel()
    mp_random.initialize_rng_tracker(force_reset=True)


@contextlib.contextmanager
def megatron_parallel(tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None,
                      seed: int = 1234, **parallel_kwargs):
    """`init_megatron(...)` on entry, `destroy_megatron()` on exit (also after an error)."""
    init_megatron(tp=tp, pp=pp, cp=cp, dp=dp, seed=seed, **parallel_kwargs)
    try:
        yield
    finally:
        destroy_megatron()
