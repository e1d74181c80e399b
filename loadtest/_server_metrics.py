"""Read the server-side KPIs (OOM, crashes, GPU memory, CPU) from its Prometheus endpoint.

The endpoint is one Ray node's metrics port, or Prometheus' ``/federate`` for a
cluster: then every node's series arrive in one scrape (counters and GPU memory
are summed over all of them, CPU is judged per node). Metric names come from the
contract (contract/names.py), the same constants the server registers and the
alert rules query.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from contract import names
from loadtest._verdict import ServerFacts

OOM, CRASHES, GPU_USED, CPU, INFO = "oom", "crashes", "gpu_used", "cpu", "info"


EXPORTED = {OOM: names.OOM_EVENTS, CRASHES: names.REPLICA_CRASHES, GPU_USED: names.GPU_MEMORY_USED,
            CPU: names.PROCESS_CPU, INFO: names.BUILD_INFO}  # role -> exported sample name
_ROLES = {name: role for role, name in EXPORTED.items()}


def scrape(url: str, timeout: float = 3.0) -> dict[str, list[tuple[dict, float]]]:
    """Fetch ``url`` and parse it (see :func:`parse`)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-given URL)
        return parse(resp.read().decode("utf-8", "replace"))


def parse(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Role -> [(labels, value)] for every KPI-relevant sample of a Prometheus exposition.

    Only the few lines of interest are parsed: Ray's endpoint exports hundreds of
    series, and parsing them all in the master would stall its event loop.
    """
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(tuple(_ROLES)))
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            if sample.name in _ROLES:
                out.setdefault(_ROLES[sample.name], []).append((sample.labels, sample.value))
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


def busiest_node_cpu(samples: list[tuple[dict, float]]) -> float:
    """CPU percent of the busiest node: its serving processes together, as the CPUHigh alert's
    ``sum by (instance)`` reads it (max of one process hid a full host).

    A node's own endpoint has no ``instance`` label (one node); Prometheus' ``/federate``
    (``--server-metrics-url http://PROM/federate?match[]={job="ray"}``) returns every
    node's series, each with its ``instance``.
    """
    per_node: dict[str, float] = {}
    for labels, value in samples:
        node = labels.get("instance", "")
        per_node[node] = per_node.get(node, 0.0) + value
    return max(per_node.values())


@dataclass
class ServerWatch:
    """Counters at the first and latest scrape, gauge maxima in between."""

    url: str | None
    gpus_per_replica: int
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    level: int = 0  # the load's level while the next scrape is taken (set by the run)
    gpu_gb_max: dict[int, float] = field(default_factory=dict)  # level -> max over its scrapes
    cpu_max: dict[int, float] = field(default_factory=dict)
    llmslo_server: bool = False
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
        self.observe(data)

    def observe(self, data: dict[str, list[tuple[dict, float]]]) -> None:
        """Fold one scrape into the run's facts."""
        self.scrapes += 1
        self.error = None
        self.llmslo_server = self.llmslo_server or INFO in data
        for name in (OOM, CRASHES):
            if name in data:
                # a series first seen after the first scrape started at 0 during the run
                self.first.setdefault(name, _total(data[name]) if self.scrapes == 1 else 0.0)
                self.last[name] = _total(data[name])
        if GPU_USED in data:
            gb = gpu_gb_per_copy(data[GPU_USED], self.gpus_per_replica)
            if gb is not None:
                self.gpu_gb_max[self.level] = max(self.gpu_gb_max.get(self.level, gb), gb)
        if CPU in data:
            cpu = busiest_node_cpu(data[CPU])
            self.cpu_max[self.level] = max(self.cpu_max.get(self.level, cpu), cpu)

    def facts(self, target: int) -> ServerFacts:
        """Summarise for the verdict; unmeasured values stay None with the reason in ``note``.

        Resource gauges (GPU memory, CPU) are judged at the levels up to the concurrency
        ``target``, the load the SLO promises them for; higher levels (headroom) are named in
        the note. OOMs and crashes count over the whole run.
        """
        if not self.url:
            return ServerFacts()
        if self.scrapes == 0:
            return ServerFacts(note=self.error or "no scrape succeeded")

        def delta(name: str) -> float | None:
            if name in self.last:
                return self.last[name] - self.first.get(name, 0.0)
            # an llmslo server creates a counter series at its first event: none yet = 0
            return 0.0 if self.llmslo_server else None

        gpu, gpu_note = _judged_max(self.gpu_gb_max, target, "GB")
        cpu, cpu_note = _judged_max(self.cpu_max, target, "%")
        facts = ServerFacts(
            oom_events=delta(OOM),
            replica_crashes=delta(CRASHES),
            gpu_memory_gb_per_copy=gpu,
            cpu_percent_max=cpu,
            note="",
            notes={k: v for k, v in (("gpu_memory_gb_per_copy", gpu_note), ("cpu_percent_max", cpu_note)) if v},
        )
        for attr, role in (("oom_events", OOM), ("replica_crashes", CRASHES),
                           ("gpu_memory_gb_per_copy", GPU_USED), ("cpu_percent_max", CPU)):
            if getattr(facts, attr) is None:
                facts.notes[attr] = f"{EXPORTED[role]} not exported by the server"
        return facts


def _judged_max(by_level: dict[int, float], target: int, unit: str) -> tuple[float | None, str]:
    """Max over scrapes at levels <= target (all scrapes when none were), and a note naming headroom maxima."""
    judged = {lvl: v for lvl, v in by_level.items() if lvl <= target} or by_level
    if not judged:
        return None, ""
    above = ", ".join(f"{v:.4g} {unit} at {lvl} streams" for lvl, v in sorted(by_level.items()) if lvl not in judged)
    scope = f"max over scrapes at levels <= {target}" if judged is not by_level else "max over scrapes"
    return max(judged.values()), scope + (f" (headroom, not judged: {above})" if above else "")
