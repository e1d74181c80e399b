"""Read the server-side KPIs (OOM, crashes, GPU memory, CPU) from its Prometheus endpoint.

The serving app exports through Ray's metrics pipeline, which prefixes custom
metrics with ``ray_``; samples are matched on the logical name as a suffix so
the same code reads ``ray_llmslo_oom_events_total`` and a bare
``llmslo_oom_events_total`` from a non-Ray server.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from loadtest._verdict import ServerFacts

OOM = "llmslo_oom_events_total"
CRASHES = "llmslo_replica_crashes_total"
GPU_USED = "llmslo_gpu_memory_used_bytes"
CPU = "llmslo_process_cpu_percent"


def scrape(url: str, timeout: float = 3.0) -> dict[str, list[tuple[dict, float]]]:
    """Fetch ``url`` and parse it (see :func:`parse`)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-given URL)
        return parse(resp.read().decode("utf-8", "replace"))


def parse(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Logical name -> [(labels, value)] for every KPI-relevant sample of a Prometheus exposition."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for logical in (OOM, CRASHES, GPU_USED, CPU):
                if sample.name.endswith(logical):
                    out.setdefault(logical, []).append((sample.labels, sample.value))
    return out


def _total(samples: list[tuple[dict, float]]) -> float:
    return sum(v for _, v in samples)


def gpu_gb_per_copy(samples: list[tuple[dict, float]], gpus_per_replica: int) -> float | None:
    """Used GPU memory of one model copy: per model label, total used / (GPUs / GPUs per copy)."""
    per_model: dict[str, list[float]] = {}
    for labels, value in samples:
        per_model.setdefault(labels.get("model", ""), []).append(value)
    if not per_model:
        return None
    copies = {m: max(1.0, len(v) / max(1, gpus_per_replica)) for m, v in per_model.items()}
    return max(sum(v) / copies[m] for m, v in per_model.items()) / 1e9


@dataclass
class ServerWatch:
    """Counters at the first and latest scrape, gauge maxima in between."""

    url: str | None
    gpus_per_replica: int
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    gpu_gb_max: float | None = None
    cpu_max: float | None = None
    error: str | None = None
    scrapes: int = 0

    def poll(self) -> None:
        """Scrape once; remember the error text instead of raising (the run goes on)."""
        if not self.url:
            return
        try:
            data = scrape(self.url)
        except Exception as exc:  # any network/parse failure is reported, not fatal
            self.error = f"server metrics unreachable at {self.url}: {exc}"
            return
        self.scrapes += 1
        self.error = None
        for name in (OOM, CRASHES):
            if name in data:
                self.first.setdefault(name, _total(data[name]))
                self.last[name] = _total(data[name])
        if GPU_USED in data:
            gb = gpu_gb_per_copy(data[GPU_USED], self.gpus_per_replica)
            if gb is not None:
                self.gpu_gb_max = gb if self.gpu_gb_max is None else max(self.gpu_gb_max, gb)
        if CPU in data:
            cpu = max(v for _, v in data[CPU])
            self.cpu_max = cpu if self.cpu_max is None else max(self.cpu_max, cpu)

    def facts(self) -> ServerFacts:
        """Summarise for the verdict; unmeasured values stay None with the reason in ``note``."""
        if not self.url:
            return ServerFacts()
        if self.scrapes == 0:
            return ServerFacts(note=self.error or "no scrape succeeded")

        def delta(name: str) -> float | None:
            return self.last[name] - self.first[name] if name in self.last else None

        missing = [n for n in (OOM, CRASHES, GPU_USED, CPU) if n not in self.first and n not in self.last]
        missing = [n for n in missing if not (n == GPU_USED and self.gpu_gb_max is not None)]
        missing = [n for n in missing if not (n == CPU and self.cpu_max is not None)]
        return ServerFacts(
            oom_events=delta(OOM),
            replica_crashes=delta(CRASHES),
            gpu_memory_gb_per_copy=self.gpu_gb_max,
            cpu_percent_max=self.cpu_max,
            note=f"not exported by the server: {', '.join(missing)}" if missing else "",
        )
