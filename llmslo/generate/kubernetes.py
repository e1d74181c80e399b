"""The alert and recording rules as a prometheus-operator ``PrometheusRule`` (deploy/k8s/).

The same groups as alerts/rules/llmslo.yml, wrapped in the custom resource
that the Prometheus Operator loads, so a cluster runs exactly the rules the
promtool tests check. The Prometheus resource must select the label below
(``ruleSelector``); deploy/k8s/README.md says how.
"""

from __future__ import annotations

from llmslo.generate import rules
from contract.slo import SLOConfig

PATH = "deploy/k8s/prometheusrule.yaml"
SELECTOR_LABEL = {"app.kubernetes.io/part-of": "llmslo"}


def prometheus_rule(cfg: SLOConfig) -> dict:
    """The PrometheusRule object holding every generated rule group."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "llmslo", "labels": dict(SELECTOR_LABEL)},
        "spec": rules.rule_file(cfg),
    }
