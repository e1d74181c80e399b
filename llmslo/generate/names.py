"""Exported Prometheus metric names the rules and dashboards query.

Server names come from engineer A's constants (serve/metrics.py), GPU/CPU names
from serve/telemetry.py with Ray's ``ray_`` export prefix added, Ray Serve's
own metrics are named as Ray 2.60 exports them (checked against a real
``/metrics`` page), and the load generator's names as loadtest/_live.py
registers them with prometheus-client. One place, so a rename breaks
``llmslo generate --check`` instead of silently emptying a panel.
"""

from __future__ import annotations

from serve import metrics as server
from serve import telemetry

REQUESTS = server.REQUESTS
IN_FLIGHT = server.IN_FLIGHT
QUEUE_WAIT = server.QUEUE_WAIT
TTFT = server.TTFT
TTFT_HOP = server.TTFT_HOP
ITL = server.ITL
TPOT = server.TPOT
E2E = server.E2E
PROMPT_TOKENS = server.PROMPT_TOKENS
COMPLETION_TOKENS = server.COMPLETION_TOKENS
OOM_EVENTS = server.OOM_EVENTS
REPLICA_CRASHES = server.REPLICA_CRASHES
BUILD_INFO = server.BUILD_INFO
KV_CACHE_USAGE = server.KV_CACHE_USAGE
TTFT_BUCKETS = server.TTFT_BUCKETS
TOKEN_BUCKETS = server.TOKEN_BUCKETS

_RAY = server.PREFIX
GPU_MEMORY_USED = _RAY + telemetry.GPU_MEMORY_USED
GPU_MEMORY_TOTAL = _RAY + telemetry.GPU_MEMORY_TOTAL
GPU_UTILIZATION = _RAY + telemetry.GPU_UTILIZATION
GPU_POWER = _RAY + telemetry.GPU_POWER
GPU_POWER_LIMIT = _RAY + telemetry.GPU_POWER_LIMIT
GPU_TEMPERATURE = _RAY + telemetry.GPU_TEMPERATURE
GPU_ENERGY = _RAY + telemetry.GPU_ENERGY
NVML_AVAILABLE = _RAY + telemetry.NVML_AVAILABLE
PROCESS_CPU = _RAY + telemetry.PROCESS_CPU
REPLICA_CAPACITY = _RAY + telemetry.REPLICA_CAPACITY
MODEL_COMPONENT = "replica"   # component label of model replicas (the ingress is "ingress"), serve/model.py

# Ray Serve's built-in metrics (Ray 2.60).
SERVE_TARGET_REPLICAS = "ray_serve_autoscaling_target_replicas"
SERVE_REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"
SERVE_REPLICA_PROCESSING = "ray_serve_replica_processing_queries"
SERVE_REPLICA_REQUESTS = "ray_serve_deployment_request_counter_total"

# Load generator (Locust master, prometheus-client).
CLIENT_TTFT = "llmslo_client_ttft_seconds"
CLIENT_REQUESTS = "llmslo_client_requests_total"
CLIENT_USERS = "llmslo_client_users"

# Prometheus job names of the scrape targets (deploy/prometheus.yml, llmslo up, tests).
SERVER_JOB = "ray"
CLIENT_JOB = "locust"
