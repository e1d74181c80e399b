"""Engines by name, imported lazily so the simulated engine never imports torch.

Every engine class is constructed as ``cls(model_id: str, **engine_options)``
where ``engine_options`` is the ``engine_options`` mapping of serve/config.yaml,
and implements :class:`serve.engines.base.Engine`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from serve.engines.base import Engine

ENGINES: dict[str, str] = {
    "simulated": "serve.engines.simulated:SimulatedEngine",
    "upstream": "serve.engines.upstream:UpstreamEngine",
    "transformers": "serve.engines.transformers:TransformersEngine",
}


def create_engine(name: str, model_id: str, options: Mapping[str, Any] | None = None) -> Engine:
    """Import the engine registered as ``name`` and construct it."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}")
    module_name, class_name = ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(model_id, **dict(options or {}))
