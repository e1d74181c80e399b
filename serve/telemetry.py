"""GPU (NVML) and process-CPU telemetry for a serving process, published as Ray metrics.

Why it lives in the replica: a model copy owns the GPUs that Ray assigned to its
process (``CUDA_VISIBLE_DEVICES``), so the replica is the one place that knows
which GPUs belong to which model copy. The gauges go through Ray's metrics
pipeline (``ray.serve.metrics``) like the request metrics, so one Prometheus job
scraping Ray's metrics export port sees everything, and inside a Serve replica
each series carries the ``deployment``/``replica``/``application`` labels.
Ray prefixes custom metric names with ``ray_`` on export.

Exported names (logical, before Ray's prefix), BRIEF contract 2:

- ``llmslo_gpu_memory_used_bytes{gpu,uuid,model}`` / ``llmslo_gpu_memory_total_bytes``
- ``llmslo_gpu_utilization_ratio`` (0..1, NVML's "percent of time a kernel ran")
- ``llmslo_gpu_power_watts`` / ``llmslo_gpu_power_limit_watts`` (enforced limit)
- ``llmslo_gpu_temperature_celsius`` (GPU die)
- ``llmslo_gpu_energy_joules_total`` counter: joules used since this process
  started sampling (from NVML's total-energy counter, mJ -> J)
- ``llmslo_nvml_available{model,component}`` 1 when NVML answered, else 0
- ``llmslo_process_cpu_percent{model,component}``: CPU time of this node's
  serving processes of one role over the last 3 s (``CPU_WINDOW_S``, top's
  refresh; re-set every sampling interval), as a share of
  the whole machine (100 = every logical CPU busy). Roles (``component``):
  ``ingress``, ``replica`` (model replicas), ``http_proxy`` (HAProxy and
  Ray's proxy actors), ``serve_controller``, ``raylet``, ``gcs``, ``ray_other`` (dashboard, agents,
  monitors, idle workers). ``sum by (instance)`` is the whole serving tree of a
  node, the reading the "CPU < 70 %" KPI and the CPUHigh alert are judged on.
  One serving process per node publishes it (the holder of a file lock, see
  :class:`NodeLock`), so nothing is counted twice.
- ``llmslo_replica_max_ongoing_requests{model,component}``: inside a Serve
  replica, the deployment's ``max_ongoing_requests``; summed over live replicas
  it is the serving capacity the "≥ 8 concurrent requests" alert watches.
- ``llmslo_deployment_max_replicas{model,component}``: inside a Serve replica,
  the most replicas its deployment may run (autoscaling ``max_replicas``, or
  ``num_replicas`` when it does not autoscale); ScaleOutExhausted fires when the
  healthy model replicas reach it while an SLO burns.
- ``llmslo_replica_crashes_total{model}`` counter, one series per node: model
  replicas of the node that exited without a graceful stop, counted by the node
  lock's holder (serve.crash_witness), since no process can count its own crash.

No driver or no GPU means no GPU series at all (never zeros that look like an
idle GPU) and ``llmslo_nvml_available 0``. A field the GPU does not support
(e.g. energy on pre-Volta boards) is left out for that GPU only.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import pynvml

from contract.names import (
    CPU_WINDOW_S, GPU_ENERGY, GPU_MEMORY_TOTAL, GPU_MEMORY_USED, GPU_POWER, GPU_POWER_LIMIT, GPU_TEMPERATURE,
    GPU_UTILIZATION, NVML_AVAILABLE, PROCESS_CPU, REPLICA_CAPACITY, REPLICA_CRASHES, DEPLOYMENT_MAX_REPLICAS, logical,
)
from serve.crash_witness import CrashWitness, Proc, ReplicaLedger

log = logging.getLogger(__name__)

# Ray's metrics agent drops a gauge series that is not re-reported within two
# report intervals (2 s with the 1 s interval the tests use), so the gauges are
# re-set every half second; an NVML read of a few GPUs costs well under 1 ms.
DEFAULT_INTERVAL_S = 0.5


GPU_TAGS = ("gpu", "uuid", "model")
PROCESS_TAGS = ("model", "component")
INGRESS_DEPLOYMENT = "Ingress"  # serve/app.py's deployment names
MODEL_DEPLOYMENT = "Model"
TREE_REFRESH_S = 5.0  # how often the serving tree is re-discovered (replicas come and go)


@dataclass(frozen=True)
class GpuSample:
    """One NVML reading of one GPU; None where the board does not support a field."""

    index: int
    uuid: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float | None
    power_watts: float | None
    power_limit_watts: float | None
    temperature_celsius: float | None
    energy_joules: float | None


def select_visible(devices: list[tuple[int, str]], cuda_visible: str | None) -> list[tuple[int, str]]:
    """The (index, uuid) pairs a process sees under ``CUDA_VISIBLE_DEVICES``.

    Follows CUDA's rules: unset means every device; entries are indices or UUID
    prefixes; an entry that names no device ends the list (CUDA ignores the rest).
    """
    if cuda_visible is None:
        return list(devices)
    chosen: list[tuple[int, str]] = []
    for token in (t.strip() for t in cuda_visible.split(",")):
        match = [d for d in devices if (token.isdigit() and d[0] == int(token))
                 or (token and not token.isdigit() and d[1].startswith(token))]
        if len(match) != 1:
            break
        chosen.append(match[0])
    return chosen


def _optional(read: Callable[[], float]) -> float | None:
    """A field that some boards lack: NotSupported/NoPermission -> None."""
    try:
        return read()
    except pynvml.NVMLError:
        return None


class NvmlReader:
    """Reads the GPUs visible to this process; ``available`` is False without a driver."""

    def __init__(self, cuda_visible: str | None = None) -> None:
        self.available = False
        self._handles: list[tuple[int, str, object]] = []
        try:
            pynvml.nvmlInit()
            devices = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                devices.append((index, pynvml.nvmlDeviceGetUUID(handle)))
            for index, uuid in select_visible(devices, cuda_visible):
                self._handles.append((index, uuid, pynvml.nvmlDeviceGetHandleByIndex(index)))
            self.available = True
        except pynvml.NVMLError as exc:
            log.info("NVML unavailable, GPU telemetry off: %s", exc)

    def read(self) -> list[GpuSample]:
        """One sample per visible GPU; an NVML failure mid-run marks NVML unavailable."""
        if not self.available:
            return []
        try:
            return [self._read_one(*h) for h in self._handles]
        except pynvml.NVMLError as exc:
            log.warning("NVML read failed, GPU telemetry off: %s", exc)
            self.available = False
            return []

    @staticmethod
    def _read_one(index: int, uuid: str, handle: object) -> GpuSample:
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuSample(
            index=index,
            uuid=uuid,
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            utilization_ratio=_optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0),
            power_watts=_optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            power_limit_watts=_optional(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0),
            temperature_celsius=_optional(
                lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))),
            energy_joules=_optional(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0),
        )


def process_role(name: str, title: str) -> str:
    """Role of a serving-tree process, from its name and Ray's process title (``ray::...``)."""
    if "ServeReplica:" in title:  # ray::ServeReplica:<app>:<deployment>[.<method>]
        return "ingress" if title.rsplit(":", 1)[1].split(".")[0] == INGRESS_DEPLOYMENT else "replica"
    for prefix, role in (("ray::ProxyActor", "http_proxy"), ("ray::HAProxyManager", "http_proxy"),
                         ("ray::ServeController", "serve_controller")):
        if title.startswith(prefix):
            return role
    return {"raylet": "raylet", "gcs_server": "gcs", "haproxy": "http_proxy"}.get(name, "ray_other")


Tree = dict[int, tuple[str, psutil.Process]]  # pid -> (role, process)


def local_raylet() -> psutil.Process | None:
    """The raylet that started this process (a Ray worker's parent); None outside a Ray worker."""
    try:
        parent = psutil.Process().parent()
        return parent if parent is not None and parent.name() == "raylet" else None
    except psutil.Error:
        return None


class ServingTree:
    """This node's serving processes: the raylet, everything it started (Serve replicas,
    HTTP proxy, Serve controller, agents, workers) and the processes of the same Ray
    session beside it (GCS, dashboard, monitors: their command lines name the session
    directory). The driver that started Ray (``llmslo serve``, which only waits) is not
    counted. Re-discovered every ``refresh_s``."""

    def __init__(self, raylet: psutil.Process, refresh_s: float = TREE_REFRESH_S) -> None:
        self._raylet = raylet
        match = re.search(r"(/\S*?/session_[^/\s]+)", " ".join(raylet.cmdline()))
        self._session = match[1] if match else None
        self._refresh_s = refresh_s
        self._found_at = float("-inf")
        self._tree: Tree = {}

    def __call__(self) -> Tree:
        if time.monotonic() - self._found_at >= self._refresh_s:
            self._tree = self._discover()
            self._found_at = time.monotonic()
        return self._tree

    def _discover(self) -> Tree:
        procs = [self._raylet, *self._raylet.children(recursive=True)]
        parent = self._raylet.parent()
        if self._session:
            beside = parent.children() if parent is not None and parent.pid != 1 else psutil.process_iter()
            for proc in beside:
                if proc.pid != self._raylet.pid and self._session in " ".join(_cmdline(proc)):
                    procs += [proc, *_children(proc)]
        tree: Tree = {}
        for proc in procs:
            try:
                tree[proc.pid] = (process_role(proc.name(), (_cmdline(proc) or [""])[0]), proc)
            except psutil.Error:
                continue
        return tree


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


class CpuReader:
    """CPU use of a set of processes over the last ``window_s`` seconds, per role, as a share
    of the whole machine.

    Why a window of seconds: the seed measures "CPU < 70 %" with top/htop, which show
    averages over their refresh (3 s for top); a half-second window let one busy moment
    (a burst of first tokens, a GC) decide the KPI. CPU time advances in scheduler ticks
    (10 ms), so the window is built from steps of at least ``min_window_s`` (a step of a few
    milliseconds turns one tick into hundreds of percent): each ``read`` that ends a step
    keeps that step's CPU, and the value is the CPU of the newest steps covering
    ``window_s`` divided by their wall time (``window_s`` to ``window_s`` + one step).
    ``read`` returns None until the steps cover ``window_s``, and between steps the last
    value. A process first seen in a step only sets its baseline (its earlier CPU is not
    this step's).
    """

    def __init__(self, processes: Callable[[], Tree], min_window_s: float = 0.5,
                 window_s: float = CPU_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._processes = processes
        self._cpus = psutil.cpu_count() or 1
        self._min_window_s = min_window_s
        self._window_s = window_s
        self._clock = clock
        self._last_wall = clock()
        self._last = self._cpu_seconds()
        self._steps: deque[tuple[float, dict[str, float]]] = deque()  # (wall seconds, CPU seconds by role)
        self._value: dict[str, float] | None = None

    def _cpu_seconds(self) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        for pid, (role, proc) in self._processes().items():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            out[pid] = (role, times.user + times.system)
        return out

    def read(self) -> dict[str, float] | None:
        wall = self._clock()
        if wall - self._last_wall < self._min_window_s:
            return self._value
        now = self._cpu_seconds()
        used: dict[str, float] = {}
        for pid, (role, seconds) in now.items():
            used[role] = used.get(role, 0.0) + (seconds - self._last[pid][1] if pid in self._last else 0.0)
        self._steps.append((wall - self._last_wall, used))
        self._last_wall, self._last = wall, now
        span = sum(d for d, _ in self._steps)
        while span - self._steps[0][0] >= self._window_s:  # the newer steps alone still cover the window
            span -= self._steps.popleft()[0]
        if span >= self._window_s:
            total: dict[str, float] = {}
            for _, step in self._steps:
                for role, seconds in step.items():
                    total[role] = total.get(role, 0.0) + seconds
            self._value = {role: 100.0 * s / span / self._cpus for role, s in total.items()}
        return self._value


class NodeLock:
    """Elects the one serving process per node that publishes the node's serving CPU:
    every serving process tries to take this file lock (non-blocking) at each sample;
    the kernel releases it when the holder dies, and the next try takes over."""

    def __init__(self, key: str) -> None:
        self._path = Path(tempfile.gettempdir()) / f"llmslo-serving-cpu-{key}.lock"
        self._fd: int | None = None

    def held(self) -> bool:
        if self._fd is None:
            fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._fd = fd
        return True


def node_key(raylet: psutil.Process) -> str:
    """Names this node's Ray session in the node lock's and the crash ledger's file names."""
    return f"{raylet.pid}-{int(raylet.create_time())}"


def model_replicas(tree: Tree) -> set[Proc]:
    """(pid, create time) of the model replica processes of a serving tree."""
    procs: set[Proc] = set()
    for pid, (role, proc) in tree.items():
        if role == "replica":
            try:
                procs.add((pid, proc.create_time()))
            except psutil.Error:
                continue
    return procs


class NodeWatch:
    """While this process holds the node lock: the node's serving-tree CPU by role, and the
    model replicas that crashed since the last read (serve.crash_witness); else (None, 0)."""

    def __init__(self, raylet: psutil.Process) -> None:
        self._raylet = raylet
        self._lock = NodeLock(node_key(raylet))
        self._tree: ServingTree | None = None
        self._reader: CpuReader | None = None
        self._witness: CrashWitness | None = None

    def read(self) -> tuple[dict[str, float] | None, int]:
        if not self._lock.held():
            return None, 0
        if self._tree is None:  # discovery costs only in the elected process
            self._tree = ServingTree(self._raylet)
            self._reader = CpuReader(self._tree)
            self._witness = CrashWitness(ReplicaLedger(node_key(self._raylet)))
        assert self._reader is not None and self._witness is not None
        return self._reader.read(), self._witness.update(model_replicas(self._tree()))


def serve_replica_limits() -> tuple[int | None, int | None]:
    """(``max_ongoing_requests``, max replicas) of the Serve deployment this process runs; Nones outside Serve.

    Ray exports neither as a metric, so the replica reports its own. The max replicas is the
    autoscaling ceiling, or ``num_replicas`` of a fixed deployment (one that cannot scale at all):
    the ScaleOutExhausted alert compares healthy replicas with it.
    """
    from ray.serve import context

    replica = context._get_internal_replica_context()
    config = getattr(replica, "_deployment_config", None)
    autoscaling = getattr(config, "autoscaling_config", None)
    ceiling = getattr(autoscaling, "max_replicas", None) if autoscaling else getattr(config, "num_replicas", None)
    return getattr(config, "max_ongoing_requests", None), ceiling


class RayPublisher:
    """Sets the Ray gauges/counter from samples; Ray exports them with a ``ray_`` prefix."""

    def __init__(self, model: str, component: str) -> None:
        from ray.serve.metrics import Counter, Gauge  # adds replica labels inside Serve
        from ray.util import metrics as node_metrics  # no replica labels: one series per node and role

        self._model = model
        self._gauges = {name: Gauge(logical(name), description=desc, tag_keys=GPU_TAGS) for name, desc in (
            (GPU_MEMORY_USED, "GPU memory in use on the device (NVML), bytes"),
            (GPU_MEMORY_TOTAL, "GPU memory on the device (NVML), bytes"),
            (GPU_UTILIZATION, "share of the last sample period a kernel ran on the GPU (NVML)"),
            (GPU_POWER, "GPU board power draw (NVML), watts"),
            (GPU_POWER_LIMIT, "enforced GPU power limit (NVML), watts"),
            (GPU_TEMPERATURE, "GPU die temperature (NVML), degrees Celsius"),
        )}
        self._energy = Counter(logical(GPU_ENERGY), description="GPU energy used since sampling began (NVML), joules",
                               tag_keys=GPU_TAGS)
        self._last_energy: dict[str, float] = {}
        self._nvml = Gauge(logical(NVML_AVAILABLE), description="1 when NVML answered in this process, else 0",
                           tag_keys=PROCESS_TAGS)
        self._crashes = node_metrics.Counter(logical(REPLICA_CRASHES), tag_keys=("model",),
                                             description="Model replicas of this node that exited without a "
                                                         "graceful stop (serve/crash_witness.py)")
        self._cpu = node_metrics.Gauge(logical(PROCESS_CPU), tag_keys=PROCESS_TAGS,
                                       description="CPU of this node's serving processes of one role, "
                                                   "share of all logical CPUs, percent")
        self._capacity = Gauge(logical(REPLICA_CAPACITY), description="max_ongoing_requests of this Serve replica",
                               tag_keys=PROCESS_TAGS)
        self._ceiling = Gauge(logical(DEPLOYMENT_MAX_REPLICAS), tag_keys=PROCESS_TAGS,
                              description="most replicas this Serve deployment may run (autoscaling max_replicas)")
        self._process_tags = {"model": model, "component": component}
        self._max_ongoing, self._max_replicas = serve_replica_limits()

    def publish(self, nvml_available: bool, gpus: list[GpuSample], cpu: dict[str, float] | None,
                crashes: int = 0) -> None:
        self._nvml.set(1.0 if nvml_available else 0.0, tags=dict(self._process_tags))
        if crashes:
            self._crashes.inc(crashes, tags={"model": self._model})
        for role, percent in (cpu or {}).items():
            self._cpu.set(percent, tags={"model": self._model, "component": role})
        if self._max_ongoing is not None:
            self._capacity.set(float(self._max_ongoing), tags=dict(self._process_tags))
        if self._max_replicas is not None:
            self._ceiling.set(float(self._max_replicas), tags=dict(self._process_tags))
        for gpu in gpus:
            tags = {"gpu": str(gpu.index), "uuid": gpu.uuid, "model": self._model}
            values = {
                GPU_MEMORY_USED: gpu.memory_used_bytes,
                GPU_MEMORY_TOTAL: gpu.memory_total_bytes,
                GPU_UTILIZATION: gpu.utilization_ratio,
                GPU_POWER: gpu.power_watts,
                GPU_POWER_LIMIT: gpu.power_limit_watts,
                GPU_TEMPERATURE: gpu.temperature_celsius,
            }
            for name, value in values.items():
                if value is not None:
                    self._gauges[name].set(float(value), tags=dict(tags))
            self._publish_energy(gpu, tags)

    def _publish_energy(self, gpu: GpuSample, tags: dict[str, str]) -> None:
        """NVML's energy counter is absolute since driver load; the counter gets the deltas."""
        if gpu.energy_joules is None:
            return
        previous = self._last_energy.get(gpu.uuid)
        self._last_energy[gpu.uuid] = gpu.energy_joules
        if previous is not None and gpu.energy_joules > previous:
            self._energy.inc(gpu.energy_joules - previous, tags=dict(tags))


def visible_devices() -> str | None:
    """This process's GPU selection in CUDA_VISIBLE_DEVICES syntax (None: every GPU).

    Inside a Ray worker Ray's assignment wins: Ray 2.60 leaves
    CUDA_VISIBLE_DEVICES unset for a zero-GPU actor (the ingress), which would
    otherwise make it report every GPU of the node.
    """
    import ray

    if ray.is_initialized():
        return ",".join(str(i) for i in ray.get_gpu_ids())
    return os.environ.get("CUDA_VISIBLE_DEVICES")


class TelemetrySampler:
    """Samples NVML and CPU every ``interval_s`` on a daemon thread.

    A thread, not an asyncio task: NVML calls block, and the caller may or may
    not be running inside an event loop (a Serve replica's ``__init__``).
    """

    def __init__(self, model: str, component: str, interval_s: float = DEFAULT_INTERVAL_S,
                 publisher: RayPublisher | None = None) -> None:
        self.interval_s = interval_s
        self.nvml = NvmlReader(visible_devices())
        raylet = local_raylet()
        self.node = NodeWatch(raylet) if raylet is not None else None  # outside a Ray worker: no node to report
        self.publisher = publisher or RayPublisher(model, component)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmslo-telemetry", daemon=True)

    def sample_once(self) -> None:
        gpus = self.nvml.read()
        cpu, crashes = self.node.read() if self.node else (None, 0)
        self.publisher.publish(self.nvml.available, gpus, cpu, crashes)

    def _run(self) -> None:
        while True:
            try:
                self.sample_once()
            except Exception:  # a telemetry hiccup must never take the replica down
                log.exception("telemetry sample failed")
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=self.interval_s + 5)


_lock = threading.Lock()
_sampler: TelemetrySampler | None = None


def start_telemetry(model: str, component: str, interval_s: float = DEFAULT_INTERVAL_S) -> TelemetrySampler:
    """Start this process's telemetry sampler once; later calls return the running one."""
    global _sampler
    with _lock:
        if _sampler is None:
            _sampler = TelemetrySampler(model, component, interval_s)
            _sampler.start()
        return _sampler
