"""The import rule: serve/ and loadtest/ share only the contract, and the contract imports none of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from contract import names, timing as T
from contract.record import RequestRecord

ROOT = Path(__file__).resolve().parent.parent
OURS = {"contract", "serve", "loadtest", "llmslo"}
ALLOWED = {"contract": set(), "serve": {"contract"}, "loadtest": {"contract"}}


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages of ours that a module imports (anywhere in it, lazily too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_part_imports_only_what_the_picture_allows(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        others = _imported_packages(path) - {package}
        assert others <= ALLOWED[package], f"{path.relative_to(ROOT)} imports {sorted(others - ALLOWED[package])}"


def test_a_record_with_a_renamed_or_missing_field_is_refused():
    data = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=8).as_dict()
    assert RequestRecord.from_dict(dict(data)) == RequestRecord.from_dict(data)
    data["ttft_ms"] = data.pop("ttft_s")
    with pytest.raises(ValueError, match="unknown field.*ttft_ms"):
        RequestRecord.from_dict(data)
    with pytest.raises(TypeError):
        RequestRecord.from_dict({"id": "r"})


def test_the_server_hops_are_the_hop_label_values_and_add_up_to_the_first_byte():
    t = {T.INGRESS_RECEIVED_UNIX: 1.0, T.INGRESS_DISPATCHED: 0.002, T.REPLICA_STARTED: 0.005,
         T.ENGINE_QUEUE_WAIT: 0.01, T.ENGINE_FIRST_TOKEN: 0.3, T.INGRESS_FIRST_BYTE: 0.301}
    hops = T.server_hops(t)
    assert tuple(hops) == names.TTFT_HOPS  # the histogram's labels, in path order
    assert hops["routing"] == pytest.approx(0.003) and hops["prefill"] == pytest.approx(0.285)
    assert sum(hops.values()) == pytest.approx(t[T.INGRESS_FIRST_BYTE])
