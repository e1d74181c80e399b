"""Alertmanager configuration: page and ticket routes, grouping, page-inhibits-ticket.

Severity comes from the rules (``severity: page|ticket``). The receivers are
webhooks to a placeholder URL: point ``WEBHOOK_PLACEHOLDER`` at your on-call
integration (or render with ``webhook_url=``, as the end-to-end test does).
"""

from __future__ import annotations

WEBHOOK_PLACEHOLDER = "http://127.0.0.1:5001/llmslo"

PAGE_GROUP_WAIT = "10s"   # a page should reach a human fast; also bounds OOM -> notification time


def config(webhook_url: str = WEBHOOK_PLACEHOLDER) -> dict:
    def receiver(name: str) -> dict:
        return {"name": name, "webhook_configs": [{"url": f"{webhook_url}/{name}", "send_resolved": True}]}

    return {
        "route": {
            "receiver": "ticket",
            "group_by": ["alertname", "model", "slo"],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "12h",
            "routes": [
                {"matchers": ['severity="page"'], "receiver": "page", "group_wait": PAGE_GROUP_WAIT,
                 "group_interval": "1m", "repeat_interval": "1h"},
                {"matchers": ['severity="ticket"'], "receiver": "ticket", "group_wait": "1m",
                 "repeat_interval": "12h"},
            ],
        },
        # A fast burn (page) and a slow burn (ticket) of the same SLO: the page says it all.
        "inhibit_rules": [{
            "source_matchers": ['severity="page"', 'slo=~".+"'],
            "target_matchers": ['severity="ticket"', 'slo=~".+"'],
            "equal": ["model", "slo"],
        }],
        "receivers": [receiver("page"), receiver("ticket")],
    }
