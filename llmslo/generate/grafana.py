"""Grafana provisioning files and Grafana-managed copies of the KPI alerts.

The copies re-state each KPI alert (the ``Threshold`` of rules.py: the same
PromQL value and comparison) as a Grafana rule: query A is the value, math
expression B applies slo.yaml's comparison, so a team alerting from Grafana
instead of Alertmanager gets the same verdicts. ``rule_group`` is shared by the
provisioning file and ``llmslo grafana push``.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import alerting, expr, prometheus
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.alerting import RelativeTimeRange

from llmslo.generate import rules
from llmslo.generate.dashboards import DATASOURCE_UID
from llmslo.generate.promql import num, seconds
from contract.slo import SLOConfig

FOLDER_UID = "llmslo"
FOLDER_TITLE = "llmslo"
RULE_GROUP = "llmslo-kpi"
DATASOURCE_NAME = "llmslo Prometheus"
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/llmslo"   # where docker-compose.yml mounts dashboards/json
EVAL_INTERVAL = "1m"


def _rule(alert: rules.Alert) -> alerting.Rule:
    t = alert.threshold
    assert t is not None
    value = (alerting.Query("A").datasource_uid(DATASOURCE_UID)
             .relative_time_range(RelativeTimeRange(from_val=600, to=0))
             .model(prometheus.Dataquery().expr(t.value).instant().ref_id("A")))
    verdict = (alerting.Query("B").datasource_uid("__expr__")
               .model(expr.TypeMath().expression(f"$A {t.cmp} {num(t.limit)}").ref_id("B")))
    rule = (alerting.Rule(alert.name).uid("llmslo-" + alert.runbook).org_id(1).condition("B").with_query(value).with_query(verdict)
            .no_data_state("OK").exec_err_state("Error").folder_uid(FOLDER_UID).rule_group(RULE_GROUP)
            .labels({"severity": alert.severity, **alert.labels}).annotations(alert.annotations()))
    return rule.for_val(alert.for_) if alert.for_ else rule.for_val("0s")


def grafana_rules(cfg: SLOConfig) -> list[dict]:
    """The KPI alerts as Grafana alert-rule JSON (provisioning API shape)."""
    built = [_rule(a).build() for a in rules.kpi_alerts(cfg) if a.threshold]
    return json.loads(json.dumps(built, cls=JSONEncoder))


def rule_group(cfg: SLOConfig) -> dict:
    """Body of PUT /api/v1/provisioning/folder/{folder}/rule-groups/{group}."""
    group = alerting.RuleGroup(RULE_GROUP).folder_uid(FOLDER_UID).interval(seconds(EVAL_INTERVAL))
    data = json.loads(json.dumps(group.build(), cls=JSONEncoder))
    data["rules"] = grafana_rules(cfg)
    return data


def datasource() -> dict:
    return {"name": DATASOURCE_NAME, "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
            "isDefault": True, "jsonData": {"timeInterval": "5s"}}


def provisioning_files(cfg: SLOConfig) -> dict[str, str]:
    from llmslo.generate import to_yaml

    ds = {**datasource(), "url": "${PROMETHEUS_URL}", "editable": False}
    providers = {"apiVersion": 1, "providers": [{
        "name": "llmslo", "orgId": 1, "folder": FOLDER_TITLE, "folderUid": FOLDER_UID, "type": "file",
        "disableDeletion": False, "allowUiUpdates": False, "updateIntervalSeconds": 30,
        "options": {"path": DASHBOARDS_PATH, "foldersFromFilesStructure": False}}]}
    file_rules = []
    for rule in grafana_rules(cfg):
        rule = {k: v for k, v in rule.items() if k not in ("folderUID", "ruleGroup", "orgID")}
        file_rules.append(rule)
    alert_rules = {"apiVersion": 1, "groups": [{"orgId": 1, "name": RULE_GROUP, "folder": FOLDER_TITLE,
                                                "interval": EVAL_INTERVAL, "rules": file_rules}]}
    return {
        "dashboards/provisioning/datasources/llmslo.yml": to_yaml({"apiVersion": 1, "datasources": [ds]}),
        "dashboards/provisioning/dashboards/llmslo.yml": to_yaml(providers),
        "dashboards/provisioning/alerting/llmslo-rules.yml": to_yaml(alert_rules),
    }
