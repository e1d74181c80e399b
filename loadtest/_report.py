"""Write the report folder: summary.json, requests.jsonl/csv, report.html; print the KPI table.

Every file passes through ``Secrets.scrub`` on its way to disk, so a secret
option's value cannot reach a report even through an error message.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from contract.record import RequestRecord  # noqa: E402
from loadtest import _hops  # noqa: E402
from loadtest._options import Secrets  # noqa: E402

CSV_SKIP = ("itl_s",)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value * 1000:.1f} ms"
    if unit == "ratio":
        return f"{value:.2%}"
    return f"{value:.4g} {unit}".strip()


def interval(k: dict, unit: str) -> str:
    """'[low, high]' of the 95 % bounds; '?' where too few samples bound that side."""
    if k.get("low") is None and k.get("high") is None:
        return ""
    side = lambda v: "?" if v is None else fmt(v, unit)  # noqa: E731
    return f"[{side(k['low'])}, {side(k['high'])}]"


def kpi_rows(kpis: dict[str, dict]) -> list[dict]:
    """Rows (strings) shared by the console table, the web UI tab and the HTML report."""
    return [
        {
            "kpi": name,
            "title": k["title"],
            "value": fmt(k["value"], k["unit"]),
            "bounds": interval(k, k["unit"]),
            "target": f"{k['op']} {fmt(k['target'], k['unit'])}" + ("" if k.get("enforced", True) else " (not enforced)"),
            "status": k["status"] or "NOT MEASURED",
            "samples": "" if k["samples"] is None else str(k["samples"]),
            "note": k["note"],
        }
        for name, k in kpis.items()
    ]


LEVEL_KPIS = ("ttft_p95", "e2e_short_p95", "decode_tokens_per_s_p10", "output_tokens_per_s_mean", "error_rate")


def attainment_text(att: dict) -> str:
    """'97.3% (143/147), goodput 2.1 req/s 310 tok/s' of one level or class."""
    return (f"{fmt(att['attainment'], 'ratio')} ({att['met']}/{att['requests']}), goodput "
            f"{fmt(att['goodput_requests_per_s'], 'req/s')} {fmt(att['goodput_tokens_per_s'], 'tok/s')}")


def stream_text(stream: dict) -> str:
    """Time to second token, per-user speed and stalls of one level."""
    ttst, user, gap = stream["ttst_seconds"], stream["per_user_tokens_per_s"], stream["max_gap_seconds"]
    return (f"TTST p50 {fmt(ttst.get('p50'), 's')} p95 {fmt(ttst.get('p95'), 's')}; per-user "
            f"p50 {fmt(user.get('p50'), 'tok/s')}; longest gap max {fmt(gap.get('max'), 's')}; "
            f"{stream['stalls']} stall(s) in {stream['stalled_requests']} request(s)")


def attainment_rows(levels: list[dict]) -> list[dict]:
    """Per level, per traffic class (and all): SLO attainment and goodput."""
    return [{"level": row["level"], "class": cls, "SLO attainment and goodput": attainment_text(att)}
            for row in levels
            for cls, att in [("all", row["slo_attainment"]), *row["slo_attainment"]["classes"].items()]]


def capacity_line(cap: dict) -> str:
    """The capacity search's answer and its probes in one sentence."""
    probes = ", ".join(f"{p['level']} {p['status']}" for p in cap["probe_levels"])
    how = "converged" if cap["converged"] else f"not converged (limit {cap['limit']} streams or the probe budget)"
    return (f"{cap['max_passing']} streams meet every SLO, lowest not passing: {cap['lowest_not_passing'] or 'none'}; "
            f"{how}; {cap['probes']} probes: {probes}")


def _short(value: float | None, unit: str) -> str:
    """A bound without its unit (the value beside it carries it)."""
    return "?" if value is None else fmt(value, unit).replace(f" {unit}", "").replace(" ms", "")


def level_rows(levels: list[dict], kpis: dict[str, dict]) -> list[dict]:
    """The level table turned on its side (a row per measure, a column per level), so it fits a terminal.

    Each KPI cell is 'value [low, high] n=N STATUS' (bounds: see the glossary).
    """
    def cell(k: dict, unit: str) -> str:
        bounds = f" [{_short(k['low'], unit)}, {_short(k['high'], unit)}]" if k["low"] is not None or k["high"] is not None else ""
        return f"{fmt(k['value'], unit)}{bounds} n={k['samples']} {k['status'] or 'NOT MEASURED'}"

    columns = {f"{r['level']} streams ({r['scope']})": r for r in levels}
    def status(r: dict) -> str:
        return (r["status"] or "NOT MEASURED") + (f" ({r['note']})" if r.get("note") else "")

    rows = [{"measure": "status", **{c: status(r) for c, r in columns.items()}},
            {"measure": "sent / judged / drain / failed",
             **{c: f"{r['requests']} / {r['judged_requests']} / {r['drain_requests']} / {r['failed']}" for c, r in columns.items()}},
            {"measure": "achieved concurrency", **{c: fmt(r["achieved_concurrency"]) for c, r in columns.items()}},
            {"measure": "requests in flight", **{c: fmt(r.get("in_flight")) for c, r in columns.items()}},
            {"measure": "output tokens/s", **{c: fmt(r["output_tokens_per_s"]) for c, r in columns.items()}},
            {"measure": "SLO attainment", **{c: fmt(r["slo_attainment"]["attainment"], "ratio") for c, r in columns.items()}}]
    rows += [{"measure": name, **{c: cell(r["kpis"][name], kpis[name]["unit"]) for c, r in columns.items()}}
             for name in LEVEL_KPIS]
    return rows


def level_rows_live(summary: dict) -> list[dict]:
    """The level table folded into the SLO tab's columns (status, accounting, attainment by class,
    stream shape), after the capacity search's answer when one ran."""
    rows = []
    cap, conc = summary.get("capacity_search"), summary["kpis"]["concurrency"]
    if cap:
        rows.append({"kpi": "capacity search", "value": str(cap["max_passing"]), "bounds": "",
                     "target": f"{conc['op']} {conc['target']:g}", "status": conc["status"] or "NOT MEASURED",
                     "samples": str(cap["probes"]), "note": capacity_line(cap)})
    for r in summary["levels"]:
        att = r["slo_attainment"]
        by_class = ", ".join(f"{c} {fmt(a['attainment'], 'ratio')}" for c, a in att["classes"].items())
        rows.append({"kpi": f"level {r['level']} ({r['scope']})", "value": r["status"] or "NOT MEASURED", "bounds": "",
                     "target": "", "status": r["status"] or "NOT MEASURED", "samples": str(r["judged_requests"]),
                     "note": f"{r['requests']} sent, {r['failed']} failed, {r['drain_requests']} drain; SLO attainment "
                             f"{attainment_text(att)} ({by_class}); {stream_text(r['stream'])}"})
    return rows


def headline(summary: dict) -> str:
    """'SLO verdict: PASS  (run VALID)': every place that shows the verdict shows the run's validity with
    it, so an invalid run's PASS is never read alone."""
    return f"SLO verdict: {summary['verdict']}  (run {'VALID' if summary['validity']['valid'] else 'INVALID'})"


def console_table(summary: dict) -> str:
    """The verdict as fixed-width text."""
    rows = kpi_rows(summary["kpis"])
    head = f"{'KPI':<26} {'value':>14} {'95 % bounds':>24} {'target':>16} {'result':>13}  note"
    lines = ["", headline(summary), head]
    lines.append("-" * len(head))
    for r in rows:
        lines.append(f"{r['kpi']:<26} {r['value']:>14} {r['bounds']:>24} {r['target']:>16} {r['status']:>13}  {r['note']}")
    lines.append("")
    table = level_rows(summary["levels"], summary["kpis"])
    if table:
        widths = {k: max(len(k), *(len(str(r[k])) for r in table)) for k in table[0]}
        lines.append("  ".join(f"{k:<{w}}" for k, w in widths.items()))
        lines.extend("  ".join(f"{str(r[k]):<{w}}" for k, w in widths.items()) for r in table)

    lines.append("SLO attainment and goodput (judged requests; per traffic class):")
    for row in attainment_rows(summary["levels"]):
        lines.append(f"  {row['level']:>4} streams {row['class']:<6} {row['SLO attainment and goodput']}")
    lines.append("stream shape (judged successful requests):")
    for row in summary["levels"]:
        lines.append(f"  {row['level']:>4} streams {stream_text(row['stream'])}")
    if summary.get("capacity_search"):
        lines.append(f"capacity search: {capacity_line(summary['capacity_search'])}")
    cold = summary["cold_start"]
    lines.append(f"cold start: first {cold['requests']} requests, TTFT max {fmt(cold['ttft_max_s'], 's')}, "
                 f"{cold['failed']} failed, {'judged' if cold['judged'] else 'not judged (warm-up)'}")
    lines.extend(_hops.lines(summary.get("ttft_hops") or {}))
    lines.append(f"accounting: {summary['accounting_line']}")
    for note in summary["notes"]:
        lines.append(f"note: {note}")
    for reason in summary["validity"]["reasons"]:
        lines.append(f"invalid: {reason}")
    for err, n in summary["errors"].items():
        lines.append(f"error x{n}: {err}")
    lines.append(f"report: {summary['report_dir']}")
    return "\n".join(lines)


def write_report(folder: Path, summary: dict, records: list[RequestRecord], secrets: Secrets) -> None:
    """Write every file of the report folder (created if needed), secrets scrubbed."""
    folder.mkdir(parents=True, exist_ok=True)
    dicts = [r.as_dict() for r in records]
    (folder / "summary.json").write_text(secrets.scrub(json.dumps(summary, indent=2, default=str)))
    (folder / "requests.jsonl").write_text(secrets.scrub("".join(json.dumps(d) + "\n" for d in dicts)))
    out = io.StringIO()
    fields = [k for k in (dicts[0] if dicts else {}) if k not in CSV_SKIP] + ["itl_count", "itl_max_s"]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for d in dicts:
        writer.writerow({**d, "itl_count": len(d["itl_s"]), "itl_max_s": max(d["itl_s"], default=None)})
    (folder / "requests.csv").write_text(secrets.scrub(out.getvalue()))
    (folder / "report.html").write_text(secrets.scrub(render_html(summary, records)))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plots(summary: dict, records: list[RequestRecord]) -> list[str]:
    ok = [r for r in records if r.ok]
    kpis = summary["kpis"]
    ttft_target = kpis["ttft_p95"]["target"]
    tpot_target = 1.0 / kpis["decode_tokens_per_s_p10"]["target"]
    t0 = min((r.start_wall for r in records), default=0.0)
    classes = sorted({r.cls for r in ok})
    figs = []
    for field, target, label in (("ttft_s", ttft_target, "TTFT"), ("tpot_s", tpot_target, "TPOT")):
        fig, (hist, line) = plt.subplots(1, 2, figsize=(12, 3.5))
        for cls in classes:
            mine = [r for r in ok if r.cls == cls and getattr(r, field) is not None]
            if mine:
                hist.hist([getattr(r, field) * 1000 for r in mine], bins=40, alpha=0.6, label=cls)
                line.plot([r.start_wall - t0 for r in mine], [getattr(r, field) * 1000 for r in mine], ".", label=cls)
        hist.axvline(target * 1000, color="red", linestyle="--", label="target")
        line.axhline(target * 1000, color="red", linestyle="--", label="target")
        hist.set(title=f"{label} distribution", xlabel="ms", ylabel="requests")
        line.set(title=f"{label} over time", xlabel="request start (s into run)", ylabel="ms")
        hist.legend()
        figs.append(_png(fig))
    levels = summary["levels"]
    if levels:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [row["level"] for row in levels]
        ax.plot(xs, [row["output_tokens_per_s"] or 0 for row in levels], "o-", label="output tokens/s (all streams)")
        ax.set(title="Throughput vs concurrency", xlabel="concurrent users", ylabel="tokens/s")
        ax2 = ax.twinx()
        ax2.plot(xs, [row["achieved_concurrency"] or 0 for row in levels], "s--", color="gray", label="achieved")
        ax2.set_ylabel("achieved concurrency")
        ax.legend(loc="upper left")
        figs.append(_png(fig))
        figs.append(_attainment_plot(levels))
    return figs


def _attainment_plot(levels: list[dict]) -> str:
    """SLO attainment (per class) and goodput against concurrency: where good service ends."""
    fig, (att, good) = plt.subplots(1, 2, figsize=(12, 3.5))
    xs = [row["level"] for row in levels]
    for cls in ["all", *sorted({c for row in levels for c in row["slo_attainment"]["classes"]})]:
        shares = [(row["slo_attainment"] if cls == "all" else row["slo_attainment"]["classes"].get(cls, {}))
                  .get("attainment") for row in levels]
        att.plot(xs, [(share or 0) * 100 for share in shares], "o-", label=cls)
    att.set(title="SLO attainment vs concurrency", xlabel="concurrent users", ylabel="% of requests meeting every budget",
            ylim=(0, 105))
    att.legend()
    good.plot(xs, [row["slo_attainment"]["goodput_tokens_per_s"] or 0 for row in levels], "o-", label="goodput tokens/s")
    good.plot(xs, [row["output_tokens_per_s"] or 0 for row in levels], "s--", color="gray", label="all output tokens/s")
    good.set(title="Goodput vs concurrency", xlabel="concurrent users", ylabel="tokens/s")
    good.legend()
    return _png(fig)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(summary: dict, records: list[RequestRecord]) -> str:
    metric_rows = []
    for metric, per_class in summary["metrics"].items():
        for cls, d in per_class.items():
            if d["count"]:
                metric_rows.append(
                    {"metric": metric, "class": cls, "count": d["count"]}
                    | {k: f"{d[k]:.6g}" for k in ("mean", "p50", "p90", "p95", "p99")}
                )
    validity = summary["validity"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>llmslo load test</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}</style>
</head><body><h1>{html.escape(headline(summary))}</h1>
<p>Run {'valid' if validity['valid'] else 'INVALID: ' + html.escape('; '.join(validity['reasons']))}.
Duration {summary['duration_s']:.1f} s, {summary['requests']['total']} requests, {summary['requests']['failed']} failed.</p>
<h2>KPIs</h2>{_table(kpi_rows(summary['kpis']))}
<p>Accounting: {html.escape(summary['accounting_line'])}.</p>
<p>Cold start: first {summary['cold_start']['requests']} requests, TTFT max {fmt(summary['cold_start']['ttft_max_s'], 's')}.</p>
<p>{'<br>'.join(html.escape(line) for line in _hops.lines(summary.get('ttft_hops') or {}))}</p>
<h2>Concurrency levels</h2><p>Each level judged on its own: value [95 % bounds] samples status.</p>
{f"<p>Capacity search: {html.escape(capacity_line(summary['capacity_search']))}.</p>" if summary.get('capacity_search') else ''}
{_table(level_rows(summary['levels'], summary['kpis']))}
<h2>SLO attainment and goodput</h2><p>Share of each level's judged requests that met every per-request budget
(glossary: meets the SLO), and the throughput of those requests alone.</p>
{_table(attainment_rows(summary['levels']))}
<h2>Stream shape</h2>{_table([{'level': row['level'], 'stream': stream_text(row['stream'])} for row in summary['levels']])}
<h2>Plots</h2>{''.join(_plots(summary, records))}
<h2>Metrics (exact percentiles)</h2>{_table(metric_rows)}
<h2>Errors</h2>{_table([{'error': e, 'count': n} for e, n in summary['errors'].items()])}
<h2>Configuration</h2><pre>{html.escape(json.dumps(summary['config'], indent=2, default=str))}</pre>
</body></html>"""
