from pathlib import Path

import pytest

from contract.slo import DEFAULT_PATH, SLOFileError, load_slo


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


@pytest.mark.parametrize(("kpi", "extra", "message"), [
    ("ttft_p95", "classes: {video: 1.0}", "classes.video"),
    ("decode_tokens_per_s_p10", "grows_with_prompt: true", "grows_with_prompt needs a latency KPI"),
])
def test_per_request_budgets_are_checked_strictly(tmp_path: Path, kpi: str, extra: str, message: str):
    text = DEFAULT_PATH.read_text().replace(f"  {kpi}:\n", f"  {kpi}:\n    {extra}\n", 1)
    bad = tmp_path / "slo.yaml"
    bad.write_text(text)
    with pytest.raises(SLOFileError, match=message):
        load_slo(bad)


def test_a_budget_grows_with_the_prompt_from_the_benchmark_length_on():
    cfg = load_slo()
    base, per_token = cfg.kpis["ttft_p95"].target, cfg.benchmark.prefill_s_per_token
    assert cfg.target_for("ttft_p95", "image", cfg.benchmark.input_tokens - 100) == base  # shorter: no discount
    assert cfg.target_for("ttft_p95", "image", cfg.benchmark.input_tokens + 100) == pytest.approx(base + 100 * per_token)
    assert cfg.target_for("decode_tokens_per_s_p10", "image", 5000) == cfg.kpis["decode_tokens_per_s_p10"].target
