"""``llmslo compare RUN…``: the seed's platform table, with your runs in it.

The seed article (001 §4.2) compares hardware by four numbers. This command
puts the same four numbers from one or more load-test reports next to the
published rows (``llmslo/reference/platforms.yaml``), so a user's run lands in
the table the model's authors published. It renders the table three ways: a
terminal table, Markdown (for a PR or an issue) and a PNG plot.

It computes nothing itself: every number of a run is read from that run's
``summary.json`` as the load test wrote it (definitions: docs/glossary.md).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

COLUMNS = (
    "Platform",
    "GPU(s)",
    "TTFT (ms, mean ± sd)",
    "ms/token (mean ± sd)",
    "Max throughput (tokens/s)",
    "Max concurrency meeting all SLOs",
)


@dataclass(frozen=True)
class Row:
    """One platform: published by the seed (``reference``) or measured by a run."""

    platform: str
    gpus: str
    ttft_ms: tuple[float, float | None]
    ms_per_token: tuple[float, float | None]
    max_throughput_tokens_s: float | None
    max_concurrency: int | None
    reference: bool

    def cells(self) -> list[str]:
        return [
            self.platform,
            self.gpus,
            _mean_sd(*self.ttft_ms),
            _mean_sd(*self.ms_per_token),
            _num(self.max_throughput_tokens_s),
            _num(self.max_concurrency),
        ]


def _num(value: float | int | None) -> str:
    """Integers (the seed's published values) as they are; measured floats to one decimal."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    return f"{value:.1f}"


def _mean_sd(mean: float, sd: float | None) -> str:
    return _num(mean) if sd is None else f"{_num(mean)} ± {_num(sd)}"


def reference_rows() -> list[Row]:
    """The seed's published rows, read from the package data file."""
    text = resources.files("llmslo.reference").joinpath("platforms.yaml").read_text("utf-8")
    return [
        Row(
            platform=p["platform"],
            gpus=p["gpus"],
            ttft_ms=(p["ttft_ms"]["mean"], p["ttft_ms"]["sd"]),
            ms_per_token=(p["ms_per_token"]["mean"], p["ms_per_token"]["sd"]),
            max_throughput_tokens_s=p["max_throughput_tokens_s"],
            max_concurrency=p["max_concurrency"],
            reference=True,
        )
        for p in yaml.safe_load(text)["platforms"]
    ]


def _ms(metric: dict[str, Any]) -> tuple[float, float | None]:
    """Mean and standard deviation of a seconds metric, in ms."""
    sd = metric.get("sd")
    return metric["mean"] * 1000, None if sd is None else sd * 1000


def run_row(summary: dict[str, Any], label: str, platform: dict[str, str]) -> Row:
    """The seed's four numbers of one run, as its summary.json states them.

    TTFT and ms/token are the mean ± sd over all successful requests
    (``metrics.<name>.all``), max throughput is the best concurrency level's
    output tokens/s over all streams, and the concurrency is the ``concurrency``
    KPI: the highest level L such that every level <= L held every client-side KPI (a
    ``--capacity-search`` run's answer, ``capacity_search.max_passing``, is this same number).
    """
    metrics = summary["metrics"]
    throughputs = [lvl["output_tokens_per_s"] for lvl in summary["levels"] if lvl["output_tokens_per_s"]]
    concurrency = summary["kpis"]["concurrency"]["value"]
    return Row(
        platform=label,
        gpus=platform.get("gpus", "—"),
        ttft_ms=_ms(metrics["ttft_seconds"]["all"]),
        ms_per_token=_ms(metrics["tpot_seconds"]["all"]),
        max_throughput_tokens_s=max(throughputs, default=None),
        max_concurrency=None if concurrency is None else int(concurrency),
        reference=False,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SystemExit(f"llmslo compare: cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise SystemExit(f"llmslo compare: {path} is not JSON: {exc}") from exc


def load_run(spec: str) -> Row:
    """``PATH`` or ``LABEL=PATH``; PATH is a report folder or its summary.json.

    The platform (engine, GPUs) comes from the ``platform.json`` that
    ``llmslo demo`` writes beside the summary, when there is one.
    """
    label, _, path_text = spec.rpartition("=")
    path = Path(path_text)
    folder = path if path.is_dir() else path.parent
    summary_file = path / "summary.json" if path.is_dir() else path
    summary = _read_json(summary_file)
    platform_file = folder / "platform.json"
    platform = _read_json(platform_file) if platform_file.exists() else {}
    label = label or platform.get("platform") or folder.name
    try:
        return run_row(summary, label, platform)
    except (KeyError, TypeError) as exc:
        raise SystemExit(f"llmslo compare: {summary_file} lacks field {exc} (not a load-test summary?)") from exc


def to_markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = row.cells()
        if not row.reference:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_rich(rows: list[Row]) -> Table:
    table = Table(title="AutoGLM-Phone-9B across platforms (seed 001 §4.2 + your runs)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in COLUMNS[:2] else "right")
    for row in rows:
        table.add_row(*row.cells(), style=None if row.reference else "bold cyan")
    return table


def plot(rows: list[Row], path: Path) -> None:
    """Four bar charts, one per seed number; seed rows grey, runs coloured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [r.platform for r in rows]
    colours = ["#9e9e9e" if r.reference else "#1f77b4" for r in rows]
    panels = [
        ("TTFT (ms)", [r.ttft_ms[0] for r in rows], [r.ttft_ms[1] or 0 for r in rows]),
        ("ms/token", [r.ms_per_token[0] for r in rows], [r.ms_per_token[1] or 0 for r in rows]),
        ("Max throughput (tokens/s)", [r.max_throughput_tokens_s or 0 for r in rows], None),
        ("Max concurrency meeting SLOs", [r.max_concurrency or 0 for r in rows], None),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(4 * 4, 4.5))
    for ax, (title, values, errors) in zip(axes, panels):
        ax.bar(names, values, yerr=errors, color=colours, capsize=4)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    axes[-1].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("grey: seed 001 §4.2 published rows; blue: your runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmslo compare",
        description="Print the seed's platform table (seed 001 §4.2) with your runs added.",
    )
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="a report folder or its summary.json; LABEL=PATH names the row",
    )
    parser.add_argument("--out", type=Path, default=Path("reports/compare"),
                        help="folder for compare.md and compare.png (default: %(default)s)")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the seed's published rows")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    rows = ([] if args.no_reference else reference_rows()) + [load_run(r) for r in args.runs]
    if not rows:
        print("llmslo compare: nothing to compare (no RUN given and --no-reference)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    markdown, png = args.out / "compare.md", args.out / "compare.png"
    markdown.write_text(to_markdown(rows), encoding="utf-8")
    plot(rows, png)
    console = Console()
    console.print(to_rich(rows))
    console.print(f"Markdown: {markdown}\nPlot:     {png}")
    return 0
