"""``llmslo compare``: the seed's table comes back exactly; a run lands beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llmslo import compare

# seed 001 §4.2, as published
SEED_LINES = [
    "| 2×RTX 4090 | 2× RTX 4090 24 GB (FP16) | 320 ± 15 | 18 ± 2 | 142 | 8 |",
    "| 1×A100 40GB | 1× A100 40 GB (FP16) | 380 ± 20 | 22 ± 3 | 118 | 6 |",
    "| 2×RTX 3090 | 2× RTX 3090 24 GB (FP16) | 450 ± 25 | 30 ± 4 | 85 | 4 |",
    "| 1×RTX 4090 + INT4 | 1× RTX 4090 24 GB (INT4) | 520 ± 30 | 38 ± 5 | 63 | 2 |",
]


@pytest.fixture
def sample_summary() -> dict:
    """The parts of loadtest's summary.json that compare reads (docs/loadtest.md)."""
    return {
        "metrics": {
            "ttft_seconds": {"all": {"count": 40, "mean": 0.10125, "sd": 0.0075}},
            "tpot_seconds": {"all": {"count": 40, "mean": 0.012, "sd": 0.00125}},
        },
        "levels": [
            {"level": 8, "output_tokens_per_s": 320.0},
            {"level": 16, "output_tokens_per_s": 640.5},
        ],
        "kpis": {"concurrency": {"value": 16.0}},
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
    assert lines[6] == "| **laptop sim** | — | 101.2 ± 7.5 | 12.0 ± 1.2 | 640.5 | 16 |"


def test_unreadable_run_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit, match=f"cannot read {missing}"):
        compare.main([str(missing), "--out", str(tmp_path)])
