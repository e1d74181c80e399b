"""Settings of the Serve application: the ``args`` block of ``serve/config.yaml``.

One pydantic model validates them once, in the application builder, so a typo in
the config fails ``serve run`` with one clear line instead of a replica crash loop.
Every deployment option that depends on the SLO (``target_ongoing_requests``,
``max_ongoing_requests``) is derived here from ``slo.yaml`` rather than typed twice.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contract.slo import load_slo

ADMIN_TOKEN_ENV = "LLMSLO_ADMIN_TOKEN"
API_KEY_ENV = "LLMSLO_API_KEY"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MediaLimits(_Strict):
    """Limits on multimodal content parts; a request beyond any of them gets a 400."""

    max_content_parts: int = Field(32, ge=1, description="parts per message")
    max_images: int = Field(8, ge=0, description="image parts per request")
    max_audios: int = Field(4, ge=0, description="audio parts per request")
    max_image_bytes: int = Field(10 * 2**20, ge=1, description="decoded bytes per image")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height per image")
    min_image_side: int = Field(8, ge=1, description="smallest accepted width or height")
    max_audio_bytes: int = Field(10 * 2**20, ge=1, description="decoded bytes per clip")
    max_audio_seconds: float = Field(60.0, gt=0, description="duration per clip")
    allow_remote_urls: bool = Field(False, description="fetch http(s) image URLs")
    remote_fetch_timeout_s: float = Field(5.0, gt=0)


class AppSettings(_Strict):
    """The application's configuration (``applications[].args`` in serve/config.yaml)."""

    model_id: str | None = Field(None, description="served model id; default: slo.yaml service.model")
    engine: str = "simulated"
    engine_options: dict[str, Any] = Field(default_factory=dict)
    max_model_len: int = Field(2048, ge=16, description="context: prompt + completion tokens")
    default_max_tokens: int = Field(1024, ge=1)
    thinking_default: bool = False
    gpus_per_replica: int | None = Field(
        None, ge=0, description="default: 0 for the simulated engine, else slo.yaml service.gpus_per_replica"
    )
    cpus_per_replica: float = Field(1.0, ge=0)
    num_replicas: int | None = Field(None, ge=1, description="fixed count; unset = autoscaling")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_utilization: float = Field(
        0.75, gt=0, le=1, description="target_ongoing_requests = slo concurrency target x this"
    )
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: 2 x slo concurrency target")
    autoscaling_options: dict[str, Any] = Field(
        default_factory=dict, description="more Serve autoscaling_config keys, e.g. upscale_delay_s"
    )
    colocated: bool = Field(
        False, description="each model replica answers HTTP itself (no separate ingress; docs/serve.md#colocated-replicas-llmslo-serve---colocate-opt-in)"
    )
    ingress_max_ongoing_requests: int = Field(1000, ge=1)
    ingress_cpus: float = Field(0.5, ge=0)
    admin_token: str | None = Field(None, description=f"enables /admin; or set ${ADMIN_TOKEN_ENV}")
    api_key: str | None = Field(
        None, description=f"bearer token required on /v1/*; or set ${API_KEY_ENV}; unset = open (the seed's api_key='EMPTY')"
    )
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="request body limit (413 beyond)")
    body_timeout_s: float = Field(30.0, gt=0, description="the whole body must arrive within this (408 beyond)")
    rate_limit_per_s: float = Field(0.0, ge=0, description="requests/s per client address on /v1/*; 0 = off")
    rate_limit_burst: int = Field(0, ge=0, description="bucket size; 0 = max(1, ceil(2 x rate_limit_per_s))")
    media: MediaLimits = Field(default_factory=MediaLimits)
    slo_path: str | None = None

    @functools.cached_property
    def served_model(self) -> str:
        """Cached: the ingress checks every request's ``model`` against it (slo.yaml parsed once)."""
        return self.model_id or load_slo(self.slo_path).service.model

    @property
    def concurrency_target(self) -> int:
        return load_slo(self.slo_path).concurrency_target

    @property
    def gpus(self) -> int:
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        return 0 if self.engine == "simulated" else load_slo(self.slo_path).service.gpus_per_replica

    @property
    def admin(self) -> str | None:
        return self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None

    @property
    def api_token(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    @property
    def rate_burst(self) -> int:
        return self.rate_limit_burst or max(1, math.ceil(2 * self.rate_limit_per_s))

    def target_ongoing_requests(self) -> float:
        return max(1.0, math.floor(self.concurrency_target * self.target_utilization))

    def replica_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.concurrency_target

    def model_deployment_options(self) -> dict[str, Any]:
        """Ray Serve options of the model deployment: replicas, GPUs, load limits."""
        opts: dict[str, Any] = {"max_ongoing_requests": self.replica_max_ongoing_requests()}
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        else:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": max(self.max_replicas, self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests(),
                **self.autoscaling_options,
            }
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica}
        if self.gpus > 0:
            # One bundle holding all GPUs of a model copy: a bundle never spans
            # nodes, and STRICT_PACK keeps any extra bundles on the same node.
            actor["num_gpus"] = self.gpus
            bundle = {"CPU": self.cpus_per_replica, "GPU": self.gpus}
            opts["placement_group_bundles"] = [{k: v for k, v in bundle.items() if v > 0}]
            opts["placement_group_strategy"] = "STRICT_PACK"
        opts["ray_actor_options"] = actor
        return opts
