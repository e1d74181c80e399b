"""Server-side metrics of the model service, through Ray's metrics pipeline.

Why Ray's pipeline: every Serve replica is its own process; ``ray.serve.metrics``
objects are collected by each node's metrics agent and exported on Ray's metrics
export port (``--metrics-export-port``, 8080 in ``llmslo serve``), so one
Prometheus job sees every replica on every node. Each replica exports its own
series (labels ``application``, ``deployment``, ``replica``, ``WorkerId``, ...
are added by Ray); ``sum by (model) (...)`` aggregates them. Ray prefixes every
custom metric with ``ray_``. Verified by tests/test_serve_metrics.py with two
replicas.

Exported names (histograms also have ``_bucket``/``_sum``/``_count`` series):

- ``ray_llmslo_requests_total{model,status,code}``: finished requests; status is
  ok | client_error | server_error | cancelled, code the HTTP status (499 for a
  client that disconnected). Recorded by the ingress.
- ``ray_llmslo_requests_in_flight{model}``: requests inside a model replica
  (queued in the engine or generating). Recorded by each model replica.
- ``ray_llmslo_queue_wait_seconds{model}``: time a request waited before its
  generation started: in Ray Serve's router (ingress dispatch -> the model
  replica picking it up, wall clocks of two processes, so cross-node clock skew
  adds in) plus in the engine's own queue (``Finish.queue_wait_s``). Observed by
  the model replica for requests that finish.
- ``ray_llmslo_ttft_seconds{model,modality}``: the ingress handler starting on
  the request -> the first generated token (reasoning or content) arriving at
  the ingress from the model replica (it is written to the client right away);
  modality is text | image | audio | image_audio. Only requests that produced a
  token are observed (also for ITL, TPOT and e2e).
- ``ray_llmslo_ttft_budget_total{model,outcome=met|missed}``: the same
  requests, counted by whether their TTFT stayed below their own budget from
  slo.yaml (the ``ttft`` SLO's ``budget_kpi``: 600 ms at <= 512 prompt tokens
  plus the prompt allowance, a class target where one is set); exact per
  request, unlike a histogram bucket. The TTFT SLO's burn-rate alerts and
  TTFTP95High are computed from it.
- ``ray_llmslo_ttft_hop_seconds{model,hop}``: the server's share of each
  request's TTFT split by hop, from the per-hop timing (contract/timing.py):
  ``routing`` ingress received -> model replica started (validation, media
  decoding, Ray's router), ``queue`` the engine's own queue, ``prefill`` the
  rest until the engine's first token, ``relay`` engine's first token -> the
  ingress handing its bytes to the HTTP server. Observed by the ingress when a
  streamed request ends, if it passed every hop.
- ``ray_llmslo_itl_seconds{model}``: gap between consecutive token arrivals at
  the ingress, divided by the tokens the later arrival carries.
- ``ray_llmslo_tpot_seconds{model}``: per request, (e2e - ttft) / (completion
  tokens - 1); requests with one token are not observed.
- ``ray_llmslo_e2e_seconds{model}``: the same start -> the last token's arrival
  (or the failure / disconnect that ended the stream).
- ``ray_llmslo_prompt_tokens_total``, ``ray_llmslo_completion_tokens_total``
  (reasoning included, as OpenAI counts), ``ray_llmslo_reasoning_tokens_total``
  ``{model}``.
- ``ray_llmslo_multimodal_inputs_total{model,kind=image|audio}``.
- ``ray_llmslo_oom_events_total{model,source=simulated|cuda|upstream}``: every
  EngineOOMError a replica sees (injected OOMs count as ``simulated``).
- ``ray_llmslo_replica_starts_total{model}``: 1 from each model replica process
  when it becomes ready (a new process starts a new series).
- ``ray_llmslo_replica_startup_seconds{model}``: per model replica, its
  constructor entered -> its engine ready (weights loaded, warm-up replayed):
  the part of a scale-up's cold start spent inside the new replica. Set once.
  Serve's placement and the worker process start come before it (the
  autoscaling drill measures the whole: scale decision -> first token).
- ``ray_llmslo_replica_crashes_total{model}``: model replicas of a node that
  exited without a graceful stop (a crash, the kill drill, Serve replacing an
  unhealthy replica), counted by the node's crash witness (serve/crash_witness.py,
  exported from serve/telemetry.py), not by the dying process.
- ``ray_llmslo_build_info{version,engine,model,weights,topology}`` = 1 per model replica;
  weights is real | synthetic | simulated; topology is split (an ingress in front of
  the model replicas) | colocated (each model replica answers HTTP itself).
- ``ray_llmslo_kv_cache_usage_ratio{model}``: engine KV-cache blocks in use, 0..1.

Names and buckets live in contract/names.py (shared with the rules and the load test);
histogram buckets include the KPI edges: TTFT 0.6 s, ITL/TPOT 1/45 s, e2e 1.2 s.
"""

from __future__ import annotations

from ray.serve import metrics as ray_metrics

from contract.names import (  # noqa: F401 (the names are this module's documented vocabulary)
    REQUESTS, IN_FLIGHT, QUEUE_WAIT, TTFT, TTFT_BUDGET, TTFT_HOP, TTFT_HOPS, ITL,
    TPOT, E2E, PROMPT_TOKENS, COMPLETION_TOKENS, REASONING_TOKENS,
    MULTIMODAL_INPUTS, OOM_EVENTS, REPLICA_STARTS, REPLICA_STARTUP, REPLICA_CRASHES, BUILD_INFO,
    KV_CACHE_USAGE, TTFT_BUCKETS, TOKEN_BUCKETS, E2E_BUCKETS, HOP_BUCKETS, QUEUE_BUCKETS,
    logical,
)


class ServerMetrics:
    """The metric objects of one process (ingress or model replica), tagged with the model."""

    def __init__(self, model: str) -> None:
        self.model = model
        m = ("model",)

        def counter(name: str, doc: str, tags: tuple[str, ...] = m) -> ray_metrics.Counter:
            return ray_metrics.Counter(logical(name), description=doc, tag_keys=tags)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], tags: tuple[str, ...] = m) -> ray_metrics.Histogram:
            return ray_metrics.Histogram(logical(name), description=doc, boundaries=list(buckets), tag_keys=tags)

        def gauge(name: str, doc: str, tags: tuple[str, ...] = m) -> ray_metrics.Gauge:
            return ray_metrics.Gauge(logical(name), description=doc, tag_keys=tags)

        self.requests = counter(REQUESTS, "Finished requests by outcome", ("model", "status", "code"))
        self.in_flight = gauge(IN_FLIGHT, "Requests inside a model replica")
        self.queue_wait = histogram(QUEUE_WAIT, "Wait for an engine slot (s)", QUEUE_BUCKETS)
        self.ttft = histogram(TTFT, "Time to first token (s)", TTFT_BUCKETS, ("model", "modality"))
        self.ttft_budget = counter(TTFT_BUDGET, "Requests with a first token, by TTFT budget met or missed",
                                   ("model", "outcome"))
        self.ttft_hop = histogram(TTFT_HOP, "TTFT split by hop (s)", HOP_BUCKETS, ("model", "hop"))
        self.itl = histogram(ITL, "Inter-token latency (s)", TOKEN_BUCKETS)
        self.tpot = histogram(TPOT, "Time per output token after the first (s)", TOKEN_BUCKETS)
        self.e2e = histogram(E2E, "End-to-end request time (s)", E2E_BUCKETS)
        self.prompt_tokens = counter(PROMPT_TOKENS, "Prompt tokens (text + media)")
        self.completion_tokens = counter(COMPLETION_TOKENS, "Completion tokens (reasoning included)")
        self.reasoning_tokens = counter(REASONING_TOKENS, "Reasoning tokens")
        self.multimodal = counter(MULTIMODAL_INPUTS, "Image and audio inputs", ("model", "kind"))
        self.oom = counter(OOM_EVENTS, "Out-of-memory events", ("model", "source"))
        self.replica_starts = counter(REPLICA_STARTS, "Model replica process starts")
        self.replica_startup = gauge(REPLICA_STARTUP, "Model replica constructor -> engine ready (s)")
        self.build_info = gauge(BUILD_INFO, "Build information (always 1)", ("version", "engine", "model", "weights", "topology"))
        self.kv_cache = gauge(KV_CACHE_USAGE, "KV-cache blocks in use (0..1)")

    @property
    def tags(self) -> dict[str, str]:
        return {"model": self.model}
