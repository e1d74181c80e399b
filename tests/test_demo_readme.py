"""The README is the demo's front door: its links and runbook anchors must resolve.

Every alert (Prometheus rules and Grafana alert rules) links to a runbook
section of the README by anchor; a renamed heading would silently break the
on-call path, so each anchor is checked against the README's heading slugs
(GitHub's rule: lower-case, punctuation dropped, spaces to hyphens).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors() -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", README, re.M)}


def runbook_urls() -> set[str]:
    urls = set()
    for path in [*(ROOT / "alerts" / "rules").glob("*.yml"), *(ROOT / "dashboards" / "provisioning").rglob("*.yml")]:
        urls |= set(re.findall(r"runbook_url: (\S+)", path.read_text()))
    return urls


def test_every_alert_runbook_anchor_is_a_readme_heading() -> None:
    urls = runbook_urls()
    assert urls, "the generated alerts carry runbook URLs"
    missing = sorted(u for u in urls if u.split("#", 1)[1] not in anchors())
    assert missing == [], f"README has no heading for {missing}"


def test_slug_rule() -> None:
    assert slug("Runbook: TTFT p95 high") == "runbook-ttft-p95-high"


def test_relative_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_first_command_is_the_demo() -> None:
    block = re.search(r"<!-- main-command -->\n```bash\n(.*?)\n```", README, re.S)
    assert block and block.group(1).rstrip().endswith("llmslo demo")
    assert re.search(r"<!-- test-command -->\n```bash\n.*-m pytest\n```", README)


def test_env_table_defaults_match_env_example() -> None:
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `?([^`|]*?)`? \|", README, re.M))
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert rows.get(key) == (value or "(empty)"), key



def test_glossary_targets_are_slo_yaml() -> None:
    from contract.slo import load_slo

    for name, kpi in load_slo().kpis.items():
        row = re.search(rf"^\| `{name}` \| .* \| `([^`]+)` \|$", README, re.M)
        assert row, f"README's KPI glossary lacks {name}"
        assert row.group(1) == f"{kpi.op} {kpi.target:g} {kpi.unit}", name
