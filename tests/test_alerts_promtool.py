"""The generated Prometheus rules and Alertmanager config, checked by the real promtool/amtool.

Every alert has a promtool unit-test file in alerts/tests/ (rendered from the
same slo.yaml numbers as the rule): it must fire on a breaking series, stay
silent on a healthy one, and do what slo.yaml's comparison says at the target.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from llmslo.generate import rules
from contract.slo import load_slo
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "rules" / "llmslo.yml"
ALERTS = [a.name for a in rules.all_alerts(load_slo())]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_promtool_check_rules() -> None:
    result = _run(require_binary("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in yaml.safe_load(RULES.read_text())['groups'])} rules found" \
        in result.stdout


def test_every_alert_in_the_rule_file_has_a_test_file() -> None:
    in_file = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tests = {p.stem for p in (ROOT / "alerts" / "tests").glob("*.yml")}
    assert in_file == tests == set(ALERTS)


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_scenarios_cover_firing_and_silence(alert: str) -> None:
    spec = yaml.safe_load((ROOT / "alerts" / "tests" / f"{alert}.yml").read_text())
    outcomes = {bool(t["alert_rule_test"][0]["exp_alerts"]) for t in spec["tests"]}
    assert outcomes == {True, False}, "each alert needs a firing and a silent scenario"
    assert all(t["alert_rule_test"][0]["alertname"] == alert for t in spec["tests"])


@pytest.mark.parametrize("alert", ALERTS)
def test_promtool_unit_tests(alert: str) -> None:
    result = _run(require_binary("promtool"), "test", "rules", f"alerts/tests/{alert}.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_amtool_check_config() -> None:
    result = _run(require_binary("amtool"), "check-config", "alerts/alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 receivers" in result.stdout


def test_alertmanager_routes_pages_and_tickets_and_page_inhibits_ticket() -> None:
    """amtool's own router decides where a page and a ticket go, and Alertmanager's matchers the inhibition."""
    amtool = require_binary("amtool")
    for severity in ("page", "ticket"):
        result = _run(amtool, "config", "routes", "test", "--config.file=alerts/alertmanager.yml",
                      f"severity={severity}", "alertname=X", "model=m")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == severity
    inhibit = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())["inhibit_rules"][0]
    assert 'severity="page"' in inhibit["source_matchers"] and 'severity="ticket"' in inhibit["target_matchers"]
    assert set(inhibit["equal"]) == {"model", "slo"}


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in ("page", "ticket")
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
            assert rule["annotations"]["runbook_url"].startswith("README.md#runbook-")


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_runbook_link_lands_on_a_readme_section() -> None:
    headings = re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), flags=re.M)
    anchors = {_github_slug(h) for h in headings}
    missing = {a.runbook_url for a in rules.all_alerts(load_slo()) if a.runbook_url.split("#")[1] not in anchors}
    assert not missing, f"README.md has no section for {sorted(missing)}"
