"""``llmslo grafana push`` against a stand-in Grafana HTTP API.

A stand-in, not a real Grafana: Grafana is not packaged in Debian and this
machine has no network to fetch it. The stand-in implements only the endpoints
grafana-client calls here (folders, datasources by uid, dashboards/db,
provisioning rule groups) with Grafana's status codes, so the test checks what
is sent, that the token is used, and that a second push changes nothing.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmslo import grafana_push
from llmslo.generate import dashboards, grafana, rules
from contract.slo import load_slo
from tests.conftest import free_port

TOKEN = "glsa_test"


class FakeGrafana:
    """In-memory state of the objects llmslo pushes, keyed by uid as Grafana keys them."""

    def __init__(self) -> None:
        self.folders: dict[str, dict] = {}
        self.datasources: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}
        self.rule_groups: dict[tuple[str, str], dict] = {}
        self.auth: set[str] = set()
        self.next_id = 1

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        if m := re.fullmatch(r"/api/folders/([\w-]+)", path):
            if method == "GET":
                return (200, self.folders[m[1]]) if m[1] in self.folders else (404, {"message": "folder not found"})
        if path == "/api/folders" and method == "POST":
            if body["uid"] in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"]}
            return 200, self.folders[body["uid"]]
        if m := re.fullmatch(r"/api/datasources/uid/([\w-]+)", path):
            if method == "GET":
                found = self.datasources.get(m[1])
                return (200, found) if found else (404, {"message": "Data source not found"})
            if method == "PUT":
                self.datasources[m[1]] = {**body, "id": self.datasources[m[1]]["id"]}
                return 200, {"message": "Datasource updated"}
        if path == "/api/datasources" and method == "POST":
            self.datasources[body["uid"]] = {**body, "id": self.next_id}
            self.next_id += 1
            return 200, {"message": "Datasource added"}
        if path == "/api/dashboards/db" and method == "POST":
            if body["folderUid"] not in self.folders:
                return 400, {"message": "folder not found"}
            uid = body["dashboard"]["uid"]
            if uid in self.dashboards and not body.get("overwrite"):
                return 412, {"message": "version-mismatch"}
            self.dashboards[uid] = body
            return 200, {"uid": uid, "status": "success"}
        if m := re.fullmatch(r"/api/v1/provisioning/folder/([\w-]+)/rule-groups/([\w-]+)", path):
            if method == "PUT":
                if m[1] not in self.folders:
                    return 404, {"message": "folder does not exist"}
                self.rule_groups[(m[1], m[2])] = body
                return 200, body
        return 404, {"message": f"no route {method} {path}"}


@pytest.fixture
def fake_grafana() -> Iterator[tuple[str, FakeGrafana]]:
    state = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            state.auth.add(self.headers.get("authorization", ""))
            status, reply = state.handle(self.command, self.path.split("?")[0], body)
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}", state
    server.shutdown()
    server.server_close()


def test_push_upserts_everything_with_the_token_and_is_idempotent(fake_grafana, capsys) -> None:
    url, state = fake_grafana
    argv = ["push", "--url", url, "--token", TOKEN, "--prometheus-url", "http://prom:9090"]
    assert grafana_push.main(argv) == 0
    first = capsys.readouterr().out
    assert "folder created" in first and "datasource created" in first
    snapshot = json.dumps([state.folders, state.datasources, state.dashboards, list(state.rule_groups.items())])

    assert grafana_push.main(argv) == 0
    second = capsys.readouterr().out
    assert "folder kept" in second and "datasource updated" in second
    assert json.dumps([state.folders, state.datasources, state.dashboards,
                       list(state.rule_groups.items())]) == snapshot
    assert state.auth == {f"Bearer {TOKEN}"}

    cfg = load_slo()
    assert state.datasources[dashboards.DATASOURCE_UID]["url"] == "http://prom:9090"
    board = state.dashboards[dashboards.DASHBOARD_UID]
    assert board["folderUid"] == grafana.FOLDER_UID and board["dashboard"] == {**dashboards.build(cfg), "id": None}
    group = state.rule_groups[(grafana.FOLDER_UID, grafana.RULE_GROUP)]
    assert {r["title"] for r in group["rules"]} == {a.name for a in rules.kpi_alerts(cfg)}
    for rule in group["rules"]:
        assert rule["condition"] == "B" and [q["refId"] for q in rule["data"]] == ["A", "B"]


def test_push_reports_a_grafana_refusal(fake_grafana, capsys) -> None:
    url, state = fake_grafana
    state.handle = lambda method, path, body: (403, {"message": "permissions"})  # type: ignore[method-assign]
    assert grafana_push.main(["push", "--url", url, "--token", TOKEN]) == 1
    assert "Grafana refused" in capsys.readouterr().err


def test_push_to_an_unreachable_grafana_says_so(capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert grafana_push.main(["push", "--url", url, "--token", TOKEN]) == 1
    assert f"cannot reach Grafana at {url}" in capsys.readouterr().err
