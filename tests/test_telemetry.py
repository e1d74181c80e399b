"""serve/telemetry.py: GPU selection rules, the no-driver path, and the sampler thread.

This machine has no NVIDIA driver, so the NVML tests exercise the real
"library not found" path; on a GPU machine the same tests check real readings.
The end-to-end check that the gauges reach Prometheus through Ray lives in
tests/test_monitor_e2e.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import psutil
import pytest

from serve import telemetry
from serve.crash_witness import CrashWitness, ReplicaLedger
from serve.telemetry import NvmlReader, select_visible

DEVICES = [(0, "GPU-aaaa-1111"), (1, "GPU-bbbb-2222"), (2, "GPU-cccc-3333")]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, [0, 1, 2]),          # unset: every device
        ("", []),                   # empty: none
        ("2,0", [2, 0]),            # CUDA order, not NVML order
        ("GPU-bbbb", [1]),          # UUID prefix
        ("1,7,2", [1]),             # an unknown entry ends the list, like CUDA
        ("-1", []),
        ("GPU-", []),               # ambiguous prefix names no single device
    ],
)
def test_select_visible_follows_cuda_rules(env: str | None, expected: list[int]) -> None:
    assert [i for i, _ in select_visible(DEVICES, env)] == expected


def test_visible_devices_outside_ray_follows_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert telemetry.visible_devices() == "1,0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert telemetry.visible_devices() is None


def test_nvml_reader_without_driver_reports_unavailable_and_no_gpus() -> None:
    reader = NvmlReader(None)
    samples = reader.read()
    if not reader.available:  # this machine: no driver -> no fake numbers
        assert samples == []
        return
    assert samples, "NVML answered but no GPU was read"
    for gpu in samples:
        assert 0 < gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert gpu.utilization_ratio is None or 0.0 <= gpu.utilization_ratio <= 1.0


def test_cpu_reader_is_a_share_of_the_machine() -> None:
    me = psutil.Process()
    unjudged = telemetry.CpuReader(lambda: {me.pid: ("self", me)}, min_window_s=60)
    sum(i * i for i in range(200_000))  # burn CPU inside a window too short to judge
    assert unjudged.read() is None  # a few ms would turn one 10 ms tick into hundreds of percent
    cpu = telemetry.CpuReader(lambda: {me.pid: ("self", me)}, min_window_s=0.2, window_s=0.2)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # busy for a full window: one core of the machine
        pass
    value = cpu.read()
    assert value is not None and 0.0 < value["self"] <= 100.0
    one_core = 100.0 / (psutil.cpu_count() or 1)
    assert value["self"] <= one_core * 1.1  # one busy thread can use at most one core (less on a loaded machine)


class _Ticking:
    """A process whose CPU seconds the test sets (psutil's ``cpu_times`` shape)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def cpu_times(self) -> SimpleNamespace:
        return SimpleNamespace(user=self.seconds, system=0.0)


def test_cpu_is_judged_over_seconds_not_one_busy_half_second() -> None:
    proc, now = _Ticking(), [0.0]
    cpu = telemetry.CpuReader(lambda: {1: ("replica", proc)}, min_window_s=0.5, window_s=3.0, clock=lambda: now[0])
    one_core = 100.0 / (psutil.cpu_count() or 1)
    readings = []
    for step in range(12):  # 0.5 s steps: one busy half-second (one core), then idle
        now[0] += 0.5
        proc.seconds += 0.5 if step == 6 else 0.0
        readings.append(cpu.read())
    assert readings[:5] == [None] * 5, "no value before the steps cover the window"
    assert readings[5]["replica"] == 0.0
    assert [r["replica"] for r in readings[6:]] == pytest.approx([one_core / 6] * 6)  # 0.5 CPU-s in 3 s, six times
    now[0] += 0.5
    assert cpu.read()["replica"] == 0.0, "the busy step has left the window"
    now[0] += 3.0
    proc.seconds += 3.0  # a busy stretch as long as the window reads as the core it used
    assert cpu.read()["replica"] == pytest.approx(one_core)


@pytest.mark.parametrize("name, title, role", [
    ("python", "ray::ServeReplica:llmslo:Ingress", "ingress"),
    ("python", "ray::ServeReplica:llmslo:Ingress.handle_request_streaming", "ingress"),
    ("python", "ray::ServeReplica:llmslo:Model", "replica"),
    ("python", "ray::ProxyActor", "http_proxy"),
    ("python", "ray::ServeController.listen_for_change", "serve_controller"),
    ("raylet", "/venv/ray/core/src/ray/raylet/raylet", "raylet"),
    ("gcs_server", "/venv/ray/core/src/ray/gcs/gcs_server", "gcs"),
    ("python", "ray::DashboardAgent", "ray_other"),
])
def test_serving_tree_roles_come_from_ray_process_titles(name, title, role) -> None:
    assert telemetry.process_role(name, title) == role


def test_one_process_per_node_holds_the_cpu_lock(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(telemetry.tempfile, "gettempdir", lambda: str(tmp_path))
    first, second = telemetry.NodeLock("n1"), telemetry.NodeLock("n1")
    assert first.held() and not second.held()
    assert telemetry.NodeLock("n2").held()  # another node's raylet, another lock
    os.close(first._fd)  # the holder dies: the kernel frees the lock
    assert second.held()


def test_a_replica_gone_without_a_goodbye_is_a_crash_and_a_new_holder_carries_on(tmp_path) -> None:
    """Graceful stops (scale-down, shutdown) leave a goodbye mark; crashes cannot. The witness may
    itself be the replica that crashed: the next holder reads what the last one saw."""
    a, b, c = (101, 1.0), (102, 2.0), (103, 3.0)
    witness = CrashWitness(ReplicaLedger("node", tmp_path))
    assert witness.update({a, b}) == 0  # first sight: nothing to compare with
    ReplicaLedger("node", tmp_path).goodbye(a)  # the replica's own __del__, in its process
    assert witness.update({b, c}) == 0  # a stopped gracefully; c is new
    successor = CrashWitness(ReplicaLedger("node", tmp_path))  # the holder died; another took the lock
    assert successor.update({c}) == 1  # b vanished without a goodbye
    assert successor.update({c}) == 0  # counted once
    assert successor.update({(102, 4.0), c}) == 0  # a reused pid is another process


class _Recorder:
    """Stands in for Ray's exporter only to observe what the sampler publishes."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, list, dict | None]] = []

    def publish(self, nvml_available: bool, gpus: list, cpu: dict | None, crashes: int = 0) -> None:
        self.calls.append((nvml_available, gpus, cpu))


def test_sampler_thread_runs_inside_an_event_loop_and_stops() -> None:
    recorder = _Recorder()

    async def start_in_loop() -> telemetry.TelemetrySampler:
        sampler = telemetry.TelemetrySampler("m", "replica", interval_s=0.05, publisher=recorder)
        sampler.start()  # must not block or need the loop
        await asyncio.sleep(0.3)
        return sampler

    sampler = asyncio.run(start_in_loop())
    sampler.stop()
    assert not sampler.thread.is_alive()
    assert len(recorder.calls) >= 2
    available, gpus, _ = recorder.calls[-1]
    assert available == NvmlReader(None).available
    if not available:
        assert gpus == []


def test_start_telemetry_is_idempotent_and_publishes_through_ray_metrics(monkeypatch) -> None:
    monkeypatch.setattr(telemetry, "_sampler", None)
    first = telemetry.start_telemetry("m", "replica", interval_s=0.05)
    try:
        assert telemetry.start_telemetry("other", "ingress") is first
        assert isinstance(first.publisher, telemetry.RayPublisher)
        first.sample_once()  # real Ray metric objects accept the no-GPU sample
        assert first.thread.is_alive()
    finally:
        first.stop()
