"""``llmslo grafana push --url URL [--token T]``: upsert llmslo into an existing Grafana.

Creates or updates, through grafana-client, the ``llmslo`` folder, the
Prometheus datasource (fixed uid, so the dashboard's panels find it), the
dashboard and the Grafana-managed KPI alert rule group, all rendered from
slo.yaml exactly as ``llmslo generate`` renders the provisioning files. Every
step is an upsert keyed by uid, so pushing twice leaves Grafana unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException
from niquests.exceptions import RequestException

from llmslo.generate import dashboards, grafana
from contract.slo import DEFAULT_PATH, SLOFileError, load_slo


def _missing(exc: GrafanaClientError) -> bool:
    return exc.status_code == 404


def upsert_folder(api: GrafanaApi) -> str:
    try:
        api.folder.get_folder(grafana.FOLDER_UID)
        return "folder kept"
    except GrafanaClientError as exc:
        if not _missing(exc):
            raise
    api.folder.create_folder(grafana.FOLDER_TITLE, uid=grafana.FOLDER_UID)
    return "folder created"


def upsert_datasource(api: GrafanaApi, prometheus_url: str) -> str:
    body = {**grafana.datasource(), "url": prometheus_url}
    try:
        current = api.datasource.get_datasource_by_uid(dashboards.DATASOURCE_UID)
    except GrafanaClientError as exc:
        if not _missing(exc):
            raise
        api.datasource.create_datasource(body)
        return "datasource created"
    api.datasource.update_datasource_by_uid(dashboards.DATASOURCE_UID, {**body, "id": current.get("id")})
    return "datasource updated"


def push(api: GrafanaApi, prometheus_url: str, slo_path: Path = DEFAULT_PATH) -> list[str]:
    """Upsert everything; returns one line per step."""
    cfg = load_slo(slo_path)
    done = [upsert_folder(api), upsert_datasource(api, prometheus_url)]
    board = dashboards.build(cfg)
    api.dashboard.update_dashboard({"dashboard": {**board, "id": None}, "folderUid": grafana.FOLDER_UID,
                                    "overwrite": True, "message": "llmslo grafana push"})
    done.append(f"dashboard {board['uid']} saved")
    group = grafana.rule_group(cfg)
    api.alertingprovisioning.update_rule_group(grafana.FOLDER_UID, grafana.RULE_GROUP, group,
                                               disable_provenance=True)
    done.append(f"alert rule group {grafana.RULE_GROUP} saved ({len(group['rules'])} rules)")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmslo grafana", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="upsert folder, datasource, dashboard and alert rules")
    p.add_argument("--url", required=True, help="Grafana base URL, e.g. http://127.0.0.1:3000")
    p.add_argument("--token", help="service-account token (else user:password in --url)")
    p.add_argument("--prometheus-url", default="http://127.0.0.1:9090",
                   help="URL Grafana uses to reach Prometheus (datasource url)")
    p.add_argument("--slo", type=Path, default=DEFAULT_PATH, help="slo.yaml to render from")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    api = GrafanaApi.from_url(args.url, credential=args.token, timeout=30)
    try:
        for line in push(api, args.prometheus_url, args.slo):
            print(line)
    except SLOFileError as exc:
        print(f"llmslo grafana push: {exc}", file=sys.stderr)
        return 2
    except GrafanaException as exc:
        print(f"llmslo grafana push: Grafana refused: {exc}", file=sys.stderr)
        return 1
    except RequestException as exc:
        print(f"llmslo grafana push: cannot reach Grafana at {args.url}: {type(exc).__name__}", file=sys.stderr)
        return 1
    return 0
