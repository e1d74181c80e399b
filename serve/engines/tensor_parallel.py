"""Tensor parallelism for a replica with several GPUs: one process per GPU, the library's TP plan.

Why: split layer-wise over two GPUs the model ran at a third of one GPU's speed (no CUDA graphs
across devices, docs/gpu.md). With tensor parallelism every rank holds a slice of every layer on
its own GPU, so each rank captures its own CUDA graphs and the ranks meet in one all-reduce after
the attention and one after the MLP (NCCL between GPUs, gloo on the CPU).

The sharding is the library's: ``DistributedConfig(tp_size=N)`` with the model config's
``base_model_tp_plan`` (GLM-4 and GLM-4.1V ship one), and the continuous-batching manager is
TP-aware (``continuous_batching/distributed.py``): rank 0, the *driver*, owns the request and
cancel queues and broadcasts them to the other ranks every step, and every rank runs the same
batches on its slice of the heads (the paged cache keeps its share of the KV heads).

This module adds only what the library leaves to the launcher:

- :meth:`TensorParallelGroup.launch` (rank 0, the Ray Serve replica): starts ranks 1..N-1 as child
  processes (``python -m serve.engines.tensor_parallel``) on the replica's other GPUs (Ray gives
  the replica all of them in ``CUDA_VISIBLE_DEVICES``), and joins one process group with them
  through a TCP store on 127.0.0.1.
- :func:`worker_main` (ranks >= 1): builds the same :class:`TransformersEngine` on its GPU, whose
  manager then follows the driver, and answers a line protocol on stdin/stdout: ``status`` (its
  manager's state, for the health check), ``rebuild`` (a new manager after both generation
  threads died, e.g. on a CUDA OOM), ``stop``. End of stdin means the replica is gone: it exits.
- :func:`shard_like` places one full weight as this rank's shard (random synthetic weights are
  drawn whole on every rank with the same seed, so TP=N holds exactly the TP=1 weights).

Failure model: a dead or stuck rank cannot be repaired inside the replica (the process group
is out of step after a failed collective), so :meth:`TensorParallelGroup.check` fails the
replica's health check and Ray Serve replaces the replica, both ranks together.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.distributed import DistributedConfig

from serve.engines.base import EngineError

if TYPE_CHECKING:
    from serve.engines.transformers import TransformersEngine

JOIN_TIMEOUT_S = 300  # ranks load their weights before the first collective: a 9B checkpoint takes minutes
COLLECTIVE_TIMEOUT_S = 300  # model all-reduces (NCCL / gloo); ranks start their first one after loading
# The library's per-step CPU exchange (its default is 300 s). A rank whose thread died while its
# peer waits in a model all-reduce holds the step: this bounds how long requests stall before
# the group is found broken and the replica replaced. Legitimate waits are one step's skew.
CPU_GROUP_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 10.0  # a rank that cannot say its state within this is treated as stuck
STOP_TIMEOUT_S = 5.0  # a stopping rank's own clean-up; rank 0 kills a rank that has not exited 30 s after stop


class TensorParallelGroup:
    """This process's place in the replica's tensor-parallel group; on rank 0, also the other ranks."""

    def __init__(self, rank: int, size: int, device: torch.device, workers: list[_Worker], threads: int) -> None:
        self.rank, self.size, self.device, self.workers = rank, size, device, workers
        self._threads = threads  # torch's intra-op threads before joining, given back on close
        self.mesh: DeviceMesh = init_device_mesh(device.type, (size,))
        self._lock = threading.Lock()  # one command/reply exchange at a time
        self.broken: str | None = None  # why the group cannot continue (the replica must be replaced)

    # ------------------------------------------------------------------ joining

    @classmethod
    def launch(cls, size: int, device_type: str, model_id: str, options: dict[str, Any]) -> TensorParallelGroup:
        """Rank 0: start ranks 1..size-1 as child processes and join the process group with them."""
        if dist.is_initialized():  # the group is torch's default process group: one per process
            raise EngineError("this process already holds a tensor-parallel group (one engine per process)")
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=JOIN_TIMEOUT_S))
        spec = {"size": size, "port": store.port, "device_type": device_type, "model_id": model_id,
                "options": options}
        workers = [_Worker(rank, spec) for rank in range(1, size)]
        try:
            return cls._join(0, size, device_type, store, workers)
        except BaseException:
            for worker in workers:
                worker.kill()
            raise

    @classmethod
    def _join(cls, rank: int, size: int, device_type: str, store: dist.Store,
              workers: list[_Worker]) -> TensorParallelGroup:
        """Join the default process group (NCCL between GPUs, gloo on the CPU) as ``rank``."""
        os.environ["LOCAL_RANK"] = str(rank)  # the library's TP loader picks this rank's device from it
        os.environ.setdefault("NCCL_GRAPH_MIXING_SUPPORT", "0")  # the library's advice for CUDA-graphed TP
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, "lo")  # every rank is on this host: keep their traffic on loopback
        device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
        threads = torch.get_num_threads()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # CPU ranks share the cores: more threads than cores makes every parallel op wait its turn
            torch.set_num_threads(max(1, threads // size))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        return cls(rank, size, device, workers, threads)

    # ------------------------------------------------------------------ rank 0: the other ranks

    def check(self) -> None:
        """Raise EngineError when the group is broken, a rank has exited or its generation thread stopped."""
        if self.broken:
            raise EngineError(self.broken)
        for rank, state in enumerate(self.worker_states(), start=1):
            if not state["running"]:
                raise EngineError(f"tensor-parallel rank {rank}: continuous-batching thread is not running")

    def worker_states(self) -> list[dict[str, Any]]:
        """Each other rank's engine stats and whether its generation thread runs (``status`` command)."""
        with self._lock:
            return [worker.ask("status") for worker in self.workers]

    def rebuild(self) -> None:
        """Have every other rank build a new manager; rank 0 builds its own right after (collectives).

        Only when every rank's generation thread has ended at the same step, in the group's hard
        stop (its own error, if any, an OOM): then every collective has been matched and the group
        is usable. A rank still running is stuck in a collective its peer never joined, and any other
        error may have left a collective half done: the group is broken and EngineError is raised.
        """
        with self._lock:
            for worker in self.workers:
                state = worker.ask_until_stopped()
                if state["running"] or (state["fatal_error"] and not state["oom"]):
                    self.broken = (f"tensor-parallel group broken: rank {worker.rank} "
                                   + ("is stuck in a collective" if state["running"] else state["fatal_error"]))
                    raise EngineError(self.broken)
            for worker in self.workers:
                worker.send("rebuild")

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the other ranks (``stop``; killed after ``timeout_s``) and leave the process group."""
        with self._lock:
            deadline = time.monotonic() + timeout_s
            for worker in self.workers:
                worker.stop(deadline)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads)


class _Worker:
    """Rank 0's handle on one other rank: its process, and its reply lines read by a thread.

    A reader thread (not ``select`` on the pipe) because a buffered reader may already hold the
    next reply when the pipe looks empty.
    """

    def __init__(self, rank: int, spec: dict[str, Any]) -> None:
        self.rank = rank
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "LOCAL_RANK": str(rank)}
        self.proc = subprocess.Popen(  # this interpreter, this import path; stderr goes to the replica's log
            [sys.executable, "-m", "serve.engines.tensor_parallel", json.dumps({**spec, "rank": rank})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"tp-rank{rank}-replies", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)  # end of the pipe: the rank has exited

    def alive(self) -> None:
        """Raise EngineError when the rank's process has exited."""
        if (code := self.proc.poll()) is not None:
            raise EngineError(f"tensor-parallel rank {self.rank} exited with code {code}")

    def send(self, command: str) -> None:
        self.alive()
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise EngineError(f"tensor-parallel rank {self.rank} is gone: {exc}") from exc

    def ask(self, command: str) -> dict[str, Any]:
        """Send ``command`` and return its reply, skipping replies of earlier fire-and-forget commands."""
        self.send(command)
        deadline = time.monotonic() + STATUS_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.replies.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self.replies.put(None)  # later calls see the end too
                raise EngineError(f"tensor-parallel rank {self.rank} closed its pipe (exit code {self.proc.poll()})")
            reply = json.loads(line)
            if reply.get("command") == command:
                return reply
        raise EngineError(f"tensor-parallel rank {self.rank} did not answer {command!r} within {STATUS_TIMEOUT_S} s")

    def ask_until_stopped(self) -> dict[str, Any]:
        """``status`` until the rank's generation thread has ended, or for STATUS_TIMEOUT_S."""
        deadline = time.monotonic() + STATUS_TIMEOUT_S
        while (state := self.ask("status"))["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return state

    def stop(self, deadline: float) -> None:
        """Ask the rank to leave; kill it if it has not by ``deadline`` (time.monotonic())."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
            except OSError:
                pass  # it died meanwhile
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.nn.Parameter:
    """``full`` as a parameter laid out like ``param``: this rank's shard when ``param`` is a DTensor.

    The shard is copied, so the full tensor is freed once the caller drops it.
    """
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        full = DTensor.from_local(local.clone(), param.device_mesh, param.placements, run_check=False)
    return torch.nn.Parameter(full, requires_grad=False)


def distributed_config(size: int) -> DistributedConfig:
    """The library's TP configuration: its ``base_model_tp_plan`` over ``size`` ranks."""
    return DistributedConfig(tp_size=size)


# ---------------------------------------------------------------------- ranks >= 1


class _PacedByDriver(threading.Event):
    """A follower's "new requests" event that never sleeps.

    The library's idle loop waits up to 0.1 s for new requests, but only the driver is told of
    them: a follower would sleep its full 0.1 s while the driver waits for it in the step's
    all-reduce, adding up to 100 ms to the first token of a request arriving at an idle replica.
    Without the sleep the follower waits in that all-reduce instead, which returns as soon as the
    driver arrives.
    """

    def wait(self, timeout: float | None = None) -> bool:
        return True


def worker_main(spec: dict[str, Any]) -> None:
    """Rank >= 1: join the group, build the engine on this rank's device, then obey rank 0."""
    from serve.engines.transformers import TransformersEngine  # this module is imported by it

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the reply pipe
    store = dist.TCPStore("127.0.0.1", spec["port"], spec["size"], is_master=False,
                          timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    group = TensorParallelGroup._join(spec["rank"], spec["size"], spec["device_type"], store, [])
    engine = TransformersEngine(spec["model_id"], **spec["options"])
    engine.tp_group = group
    engine._start_blocking()
    _follow(engine)
    for line in sys.stdin:
        command = line.strip()
        if command == "stop":
            break
        if command == "rebuild":
            _rebuild(engine)
        _reply(replies, command, engine)
    else:
        os._exit(1)  # stdin closed without "stop": the replica process is gone
    _stop(engine)


def _follow(engine: TransformersEngine) -> None:
    engine._manager._has_new_requests = _PacedByDriver()


def _rebuild(engine: TransformersEngine) -> None:
    """A new manager, as rank 0 builds one: the old thread has ended with the group's hard stop."""
    dead = engine._manager
    dead.join(time.perf_counter(), timeout=COLLECTIVE_TIMEOUT_S)
    dead.destroy()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    engine._manager = engine._new_manager()
    _follow(engine)


def _reply(out: IO[str], command: str, engine: TransformersEngine) -> None:
    """One JSON line per command: the engine's stats, whether its generation thread runs, how it died."""
    manager = engine._manager
    stats = engine.stats()
    fatal = manager.background_thread_status.fatal_error
    out.write(json.dumps({
        "command": command, "running": manager.is_running(),
        "active": stats.running, "waiting": stats.waiting, "kv_cache_usage": stats.kv_cache_usage,
        "fatal_error": None if fatal is None else f"{type(fatal).__name__}: {fatal}",
        "oom": isinstance(fatal, torch.OutOfMemoryError),
    }) + "\n")


def _stop(engine: TransformersEngine) -> None:
    """Leave after rank 0's stop, whose manager has already stopped this one's; a thread stuck in a
    collective of a broken group is not waited for (the process exits under it)."""
    closer = threading.Thread(target=lambda: (engine._manager.destroy(), dist.destroy_process_group()),
                              daemon=True)
    closer.start()
    closer.join(STOP_TIMEOUT_S)
    os._exit(0)


if __name__ == "__main__":
    worker_main(json.loads(sys.argv[1]))
