"""Ray Serve application builder: ``import_path: serve.app:build_app`` in serve/config.yaml.

Topology: ``Ingress`` (FastAPI, validates and relays) -> ``Model`` (one engine
per replica, autoscaled, GPUs reserved per replica). Colocated (``colocated: true``),
one deployment named ``Model`` whose replicas are each an ``Ingress`` holding its own
engine, with the model deployment's options. The config's ``args`` are
:class:`serve.settings.AppSettings`; deployment options that follow from the
SLO are computed there, so ``serve run serve/config.yaml`` and ``llmslo serve``
deploy exactly the same thing.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serve.ingress import Ingress
from serve.model import ModelServer
from serve.settings import AppSettings
from serve.telemetry import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT


def build_app(args: dict[str, Any]) -> Application:
    settings = AppSettings.model_validate(args or {})
    payload = settings.model_dump()
    if settings.colocated:
        colocated = serve.deployment(Ingress, name=MODEL_DEPLOYMENT).options(**settings.model_deployment_options())
        return colocated.bind(None, payload)
    model = serve.deployment(ModelServer, name=MODEL_DEPLOYMENT).options(**settings.model_deployment_options())
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT).options(
        num_replicas=1,
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.ingress_cpus},
    )
    return ingress.bind(model.bind(payload), payload)
