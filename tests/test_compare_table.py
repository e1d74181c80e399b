"""``llmslo compare``: the seed's table comes back exactly; a run lands beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llmslo import compare
from contract.slo import load_slo
from contract.record import RequestRecord
from loadtest import _verdict

# seed 001 §4.2, as published
SEED_LINES = [
    "| 2×RTX 4090 | 2× RTX 4090 24 GB (FP16) | 320 ± 15 | 18 ± 2 | 142 | 8 |",
    "| 1×A100 40GB | 1× A100 40 GB (FP16) | 380 ± 20 | 22 ± 3 | 118 | 6 |",
    "| 2×RTX 3090 | 2× RTX 3090 24 GB (FP16) | 450 ± 25 | 30 ± 4 | 85 | 4 |",
    "| 1×RTX 4090 + INT4 | 1× RTX 4090 24 GB (INT4) | 520 ± 30 | 38 ± 5 | 63 | 2 |",
]


def _record(ttft: float, tpot: float, tokens: int, level: int) -> RequestRecord:
    e2e = ttft + tpot * (tokens - 1)
    return RequestRecord(id="r", cls="text", thinking=False, short=True, max_tokens=tokens, level=level,
                         phase="steady", ok=True, ttft_s=ttft, ttfo_s=ttft, tpot_s=tpot, e2e_s=e2e, duration_s=e2e,
                         decode_tokens_per_s=1 / tpot, output_tokens_per_s=tokens / e2e, output_tokens=tokens,
                         itl_s=[tpot] * (tokens - 1))


@pytest.fixture
def sample_summary() -> dict:
    """summary.json's parts, computed by the load test's own code from known records."""
    slo = load_slo()
    # 60 requests per level: enough for a p95's 95 % bound, so both levels can pass
    records = [_record(0.1 + 0.01 * (i % 2), 0.012 + 0.001 * (i % 2), 32, level) for level in (8, 16) for i in range(60)]
    _verdict.assign(records, slo)
    # windows as long as 8 and 16 closed-loop users take for 60 requests of ~0.48 s each (a level
    # whose users were not all sending is not judged)
    levels = _verdict.level_table(records, slo, {8: 3.0, 16: 1.5})
    return {
        "metrics": _verdict.metric_table(records),
        "levels": levels,
        "kpis": _verdict.verdict(records, slo, levels, _verdict.ServerFacts(), 20.0),
    }


def test_reference_reproduces_the_seed_table(tmp_path: Path) -> None:
    assert compare.main(["--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.splitlines()[2:] == SEED_LINES
    with Image.open(tmp_path / "compare.png") as png:
        assert png.size[0] > 1000


def test_a_run_lands_next_to_the_seed(tmp_path: Path, sample_summary: dict) -> None:
    run = tmp_path / "run1"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(sample_summary))
    out = tmp_path / "cmp"
    assert compare.main([f"laptop sim={run}", "--out", str(out)]) == 0
    lines = (out / "compare.md").read_text().splitlines()
    assert lines[2:6] == SEED_LINES
    # TTFT 105 ± 5.02 ms, TPOT 12.5 ± 0.50 ms; 60 x 32 tokens / 1.5 s at 16 streams; both levels pass
    assert lines[6] == "| **laptop sim** | — | 105.0 ± 5.0 | 12.5 ± 0.5 | 1280.0 | 16 |"


def test_unreadable_run_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit, match=f"cannot read {missing}"):
        compare.main([str(missing), "--out", str(tmp_path)])
