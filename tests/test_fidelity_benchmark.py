"""A fast subset of ``benchmarks/fidelity.py``: its grid, table, JSON and plot on mlp-tiny."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fidelity_subset_compares_and_writes(fidelity, tmp_path):
    rows, skipped = fidelity.run_grid(
        ["mlp-tiny"], ["4x2"], ["cpu-sim", "h100-node"],
        setting_filter=lambda s: s.label in (
            "no budget", "budget 50%", "rules batch:data", "rules batch=data,mlp=model,seq=none"
        ),
    )
    assert {r.setting for r in rows} == {"no budget", "budget 50%", "rules batch:data"}
    assert {r.hardware for r in rows} == {"cpu-sim", "h100-node"}
    for r in rows:
        assert r.comm_ok, (r.setting, r.hardware, r.comm_ratio, r.off_ops)
        assert r.memory_ok, (r.setting, r.hardware, r.memory_ratio)
        assert not r.over_budget, (r.setting, r.budget, r.compiled_memory_bytes)
        assert r.compiled_comm_bytes == pytest.approx(r.predicted_comm_bytes, rel=0.03)
    # A model without a seq dim: the rules example that names it has no plan, and says why.
    assert any("seq" in s["why"] for s in skipped)
    assert len({r.program for r in rows}) <= len(rows)  # identical plans compile once
    summary = fidelity.summary(rows)
    assert summary["rows"] == len(rows) and summary["comm_out_of_band"] == 0
    doc = {"quick": True, "machine": fidelity.machine(), "summary": summary, "rows": [r.__dict__ for r in rows],
           "skipped": skipped, "wall_s": 1.0}
    fidelity.write(doc, tmp_path)
    assert json.loads((tmp_path / "fidelity_quick.json").read_text())["summary"]["rows"] == len(rows)
    md = (tmp_path / "fidelity_quick.md").read_text()
    assert fidelity.summary_line(summary) in md and md.count("| mlp-tiny |") == len(rows)
    assert (tmp_path / "fidelity_quick.png").stat().st_size > 0
