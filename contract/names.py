"""Every Prometheus metric name the server exports, the load generator exports, and the rules query.

Names are as Prometheus sees them. Ray prefixes every custom metric with
``ray_`` on export, so the server registers :func:`logical` of a name. One
place, so a rename breaks ``llmslo generate --check`` and the tests instead
of silently emptying a panel or a verdict.
"""

from __future__ import annotations

RAY_PREFIX = "ray_"


def logical(exported: str) -> str:
    """The name to register with Ray for an exported ``ray_...`` name (Ray adds the prefix)."""
    return exported.removeprefix(RAY_PREFIX)


# --- model service (serve/metrics.py documents each one) ----------------------
REQUESTS = "ray_llmslo_requests_total"
IN_FLIGHT = "ray_llmslo_requests_in_flight"
QUEUE_WAIT = "ray_llmslo_queue_wait_seconds"
TTFT = "ray_llmslo_ttft_seconds"
TTFT_BUDGET = "ray_llmslo_ttft_budget_total"   # outcome met|missed: first token within the request's budget
TTFT_HOP = "ray_llmslo_ttft_hop_seconds"
TTFT_HOPS = ("ingress", "routing", "queue", "prefill", "relay")  # the hop label's values, in path order
ITL = "ray_llmslo_itl_seconds"
TPOT = "ray_llmslo_tpot_seconds"
E2E = "ray_llmslo_e2e_seconds"
PROMPT_TOKENS = "ray_llmslo_prompt_tokens_total"
COMPLETION_TOKENS = "ray_llmslo_completion_tokens_total"
REASONING_TOKENS = "ray_llmslo_reasoning_tokens_total"
MULTIMODAL_INPUTS = "ray_llmslo_multimodal_inputs_total"
OOM_EVENTS = "ray_llmslo_oom_events_total"
REPLICA_STARTS = "ray_llmslo_replica_starts_total"
REPLICA_STARTUP = "ray_llmslo_replica_startup_seconds"
REPLICA_CRASHES = "ray_llmslo_replica_crashes_total"
BUILD_INFO = "ray_llmslo_build_info"
KV_CACHE_USAGE = "ray_llmslo_kv_cache_usage_ratio"

# Histogram buckets include the KPI edges: TTFT 0.6 s, ITL/TPOT 1/45 s, e2e 1.2 s.
TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.015, 0.018, 0.02, 1 / 45, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
HOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0, 2.5, 5.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- GPU and CPU telemetry (serve/telemetry.py) --------------------------------
GPU_MEMORY_USED = "ray_llmslo_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = "ray_llmslo_gpu_memory_total_bytes"
GPU_UTILIZATION = "ray_llmslo_gpu_utilization_ratio"
GPU_POWER = "ray_llmslo_gpu_power_watts"
GPU_POWER_LIMIT = "ray_llmslo_gpu_power_limit_watts"
GPU_TEMPERATURE = "ray_llmslo_gpu_temperature_celsius"
GPU_ENERGY = "ray_llmslo_gpu_energy_joules_total"
NVML_AVAILABLE = "ray_llmslo_nvml_available"
PROCESS_CPU = "ray_llmslo_process_cpu_percent"
# PROCESS_CPU is the CPU of the last CPU_WINDOW_S seconds, refreshed every 0.5 s: top's default
# refresh, the tool the seed measures "CPU 占用率 < 70%" with, so one busy half-second does not decide
CPU_WINDOW_S = 3.0
REPLICA_CAPACITY = "ray_llmslo_replica_max_ongoing_requests"
DEPLOYMENT_MAX_REPLICAS = "ray_llmslo_deployment_max_replicas"
MODEL_COMPONENT = "replica"   # component label of model replicas (the ingress is "ingress"), serve/model.py

# --- Ray Serve's built-in metrics (Ray 2.60, checked against a real /metrics page)
SERVE_TARGET_REPLICAS = "ray_serve_autoscaling_target_replicas"
SERVE_REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"
SERVE_REPLICA_PROCESSING = "ray_serve_replica_processing_queries"
SERVE_REPLICA_REQUESTS = "ray_serve_deployment_request_counter_total"

# --- load generator (Locust master, prometheus-client; loadtest/_live.py) -------
CLIENT_TTFT = "llmslo_client_ttft_seconds"
CLIENT_TPOT = "llmslo_client_tpot_seconds"
CLIENT_E2E = "llmslo_client_e2e_seconds"
CLIENT_REQUESTS = "llmslo_client_requests_total"
CLIENT_USERS = "llmslo_client_users"
CLIENT_REQUEST_RATE = "llmslo_client_request_rate"
CLIENT_FAILURE_RATIO = "llmslo_client_failure_ratio"
CLIENT_SLO_REQUESTS = "llmslo_client_slo_requests_total"  # outcome met|missed: SLO attainment
CLIENT_GOOD_TOKENS = "llmslo_client_good_output_tokens_total"  # output tokens of requests that met every budget
CLIENT_MAX_GAP = "llmslo_client_stream_max_gap_seconds"  # per request, the longest gap between chunks

# Prometheus job names of the scrape targets (deploy/prometheus.yml, llmslo up, tests).
SERVER_JOB = "ray"
CLIENT_JOB = "locust"
