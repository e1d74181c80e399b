from pathlib import Path

import pytest

from contract.slo import SLOFileError, load_slo


def test_shipped_slo_yaml_holds_the_seed_targets():
    cfg = load_slo()
    assert cfg.kpis["ttft_p95"].target == 0.6
    assert cfg.kpis["decode_tokens_per_s_p10"].target == 45
    assert cfg.concurrency_target == 8
    assert cfg.kpis["gpu_memory_gb"].target == 50
    assert cfg.benchmark.input_tokens == 512 and cfg.benchmark.output_tokens == 256


@pytest.mark.parametrize(
    ("value", "expected"), [(0.599, True), (0.6, False), (0.7, False)]
)
def test_kpi_passes_uses_the_strict_operator(value, expected):
    assert load_slo().kpis["ttft_p95"].passes(value) is expected


def test_invalid_file_gives_one_line_error(tmp_path: Path):
    bad = tmp_path / "slo.yaml"
    bad.write_text("service: {model: x, gpus_per_replica: -1}\n")
    with pytest.raises(SLOFileError) as err:
        load_slo(bad)
    assert "\n" not in str(err.value)
    assert "service.gpus_per_replica" in str(err.value)
