"""``locust -f loadtest/ --web-login``: the UI needs the account from the environment, /metrics stays open."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from conftest import free_port
from loadtest._headless import locust_argv

PASSWORD = "correct horse battery staple"
# The documented variables (loadtest/web_login.py; importing it here would monkey-patch pytest via gevent).
USER_ENV, PASSWORD_ENV = "LLMSLO_LOCUST_USER", "LLMSLO_LOCUST_PASSWORD"


@contextmanager
def locust_ui(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """A Locust master with ``--web-login`` on a free loopback port (no load runs)."""
    port = free_port()
    proc = subprocess.Popen(
        locust_argv("--web-login", "--web-host", "127.0.0.1", "--web-port", str(port),
                    "--host", f"http://127.0.0.1:{free_port()}"),
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def wait_up(url: str, proc: subprocess.Popen) -> None:
    for _ in range(120):
        assert proc.poll() is None, proc.communicate()[0]
        try:
            httpx.get(f"{url}/login", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer")


def test_ui_needs_the_environment_account_and_metrics_stay_open() -> None:
    with locust_ui({USER_ENV: "ops", PASSWORD_ENV: PASSWORD}) as (url, proc):
        wait_up(url, proc)
        with httpx.Client(base_url=url, timeout=10) as anonymous:
            assert anonymous.get("/").status_code == 302
            assert "/login" in anonymous.get("/").headers["location"]
            swarm = anonymous.post("/swarm", data={"user_count": 1, "spawn_rate": 1})
            assert swarm.status_code == 302 and "/login" in swarm.headers["location"]
            assert anonymous.get("/metrics").status_code == 200  # Prometheus scrapes without a login
        with httpx.Client(base_url=url, timeout=10) as guesser:
            guesser.post("/login_submit", data={"username": "ops", "password": "wrong"})
            assert guesser.get("/").status_code == 302
            guesser.post("/login_submit", data={"username": "admin", "password": PASSWORD})
            assert guesser.get("/").status_code == 302, "the user name must match too"
        with httpx.Client(base_url=url, timeout=10) as operator:
            answer = operator.post("/login_submit", data={"username": "ops", "password": PASSWORD})
            assert answer.status_code == 302 and "/login" not in answer.headers["location"]
            assert operator.get("/").status_code == 200
            assert operator.get("/stats/requests").status_code == 200


@pytest.mark.timeout(120)
def test_web_login_without_a_password_refuses_to_start() -> None:
    with locust_ui({PASSWORD_ENV: ""}) as (url, proc):
        proc.wait(timeout=90)
        output = proc.communicate()[0]
        assert proc.returncode != 0
        assert PASSWORD_ENV in output
