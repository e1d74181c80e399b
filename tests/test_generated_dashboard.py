"""The generated dashboard: panels read their thresholds from slo.yaml and query the right datasource."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmslo.generate import dashboards
from contract.slo import load_slo

ROOT = Path(__file__).resolve().parent.parent


def _panel(board: dict, title: str) -> dict:
    return next(p for p in board["panels"] if p["title"] == title)


def _red_from(panel: dict) -> float:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return next(s["value"] for s in steps if s["color"] == "red" and s["value"] is not None)


def test_overview_thresholds_follow_slo_yaml(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "slo.yaml").read_text())
    raw["kpis"]["ttft_p95"]["target"] = 0.45
    raw["kpis"]["ttft_p95"]["stat"] = "p90"
    raw["kpis"]["cpu_percent"]["target"] = 55
    changed = tmp_path / "slo.yaml"
    changed.write_text(yaml.safe_dump(raw))
    for cfg in (load_slo(), load_slo(changed)):
        board = dashboards.build(cfg)
        over_budget = _panel(board, "TTFT over budget (5m)")
        assert _red_from(over_budget) == pytest.approx(1 - float(cfg.kpis["ttft_p95"].stat[1:]) / 100)
        assert f"{cfg.kpis['ttft_p95'].target * 1000:g} ms" in over_budget["description"]
        assert _red_from(_panel(board, "TTFT percentiles")) == cfg.kpis["ttft_p95"].target
        assert _red_from(_panel(board, "Server CPU")) == cfg.kpis["cpu_percent"].target
        assert _red_from(_panel(board, "GPU memory per model copy")) == cfg.kpis["gpu_memory_gb"].target * 1e9
        steps = _panel(board, "Serving capacity")["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[-1] == {"value": cfg.kpis["concurrency"].target, "color": "green"}


def test_every_query_panel_uses_the_provisioned_datasource_and_template_variables() -> None:
    board = dashboards.build(load_slo())
    assert [v["name"] for v in board["templating"]["list"]] == ["model", "replica"]
    queried = [p for p in board["panels"] if p.get("targets")]
    assert queried and all(p["datasource"]["uid"] == dashboards.DATASOURCE_UID for p in queried)
    assert all(len({t["refId"] for t in p["targets"]}) == len(p["targets"]) for p in queried)
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["SLO overview", "Latency", "Throughput and load", "Ray Serve", "GPU and CPU",
                    "Client vs server", "Client SLO attainment and goodput", "Alerts"]
    assert any(p["type"] == "heatmap" for p in board["panels"]) and any(p["type"] == "alertlist"
                                                                         for p in board["panels"])
    assert dashboards.NEEDS_GPU <= {p["title"] for p in board["panels"]}
