"""Generated files (alerts/, dashboards/) must match what slo.yaml renders to today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from llmslo.generate import main, render, stale
from contract.slo import load_slo

ROOT = Path(__file__).resolve().parent.parent


def test_committed_files_are_up_to_date_with_slo_yaml() -> None:
    result = subprocess.run([sys.executable, "-m", "llmslo.cli", "generate", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stale generated files, run `llmslo generate`:\n{result.stdout}{result.stderr}"


def test_check_flags_a_target_change_and_generate_fixes_it(tmp_path: Path) -> None:
    """Changing a target in slo.yaml makes the rules, their tests and the dashboard stale."""
    for folder in ("alerts", "dashboards"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    slo = tmp_path / "slo.yaml"
    slo.write_text((ROOT / "slo.yaml").read_text().replace("target: 0.6\n", "target: 0.5\n", 1))
    assert load_slo(slo).kpis["ttft_p95"].target == 0.5
    out_of_date = stale(render(load_slo(slo)), tmp_path)
    assert {"alerts/rules/llmslo.yml", "alerts/tests/TTFTP95High.yml", "dashboards/json/llmslo.json"} <= set(out_of_date)
    assert main(["--check", "--slo", str(slo), "--root", str(tmp_path)]) == 1
    assert main(["--slo", str(slo), "--root", str(tmp_path)]) == 0
    assert main(["--check", "--slo", str(slo), "--root", str(tmp_path)]) == 0


def test_a_file_no_longer_generated_is_stale(tmp_path: Path) -> None:
    (tmp_path / "alerts" / "tests").mkdir(parents=True)
    (tmp_path / "alerts" / "tests" / "Removed.yml").write_text("tests: []\n")
    assert "alerts/tests/Removed.yml" in stale(render(load_slo()), tmp_path)


def test_a_broken_slo_yaml_is_one_clear_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "slo.yaml"
    bad.write_text((ROOT / "slo.yaml").read_text().replace("objective: 0.99", "objective: 1.5"))
    assert main(["--check", "--slo", str(bad), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmslo generate: ") and "objective" in err and "\n" not in err
