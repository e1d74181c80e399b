"""Shared test helpers: free loopback ports and system binaries.

Tests that drive a real Prometheus, Alertmanager or Chromium skip on a laptop
that lacks them, but CI sets LLMSLO_REQUIRE_SYSTEM_DEPS=1 so a missing binary
fails there instead of silently skipping.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_binary(name: str) -> str:
    """Path of a system binary; skip (or fail in CI) when it is not installed."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (apt-get install the package that provides it)"
    if os.environ.get("LLMSLO_REQUIRE_SYSTEM_DEPS") == "1":
        pytest.fail(message)
    pytest.skip(message)
