"""Every notebook runs top to bottom (a fresh kernel each, 8 simulated CPU devices) and shows
what its introduction says the reader will see: a check cell run in the notebook's kernel after
its own cells asserts it."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_exploring_layouts.ipynb", "03_training.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert "use_cpu_devices(8)" in nb.cells[0].source
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs not stripped"


# What each notebook promises, checked on its own variables.
CHECKS = {
    "01_quickstart.ipynb": """
from jax.sharding import PartitionSpec as P
assert plan.param_specs["w_in"] != P() and plan.param_specs["w_out"] != P(), plan.param_specs
w_in = p_placed["w_in"].value
assert w_in.sharding.shard_shape(w_in.shape) == (256, 128), w_in.sharding.shard_shape(w_in.shape)
assert plan.comm_bytes > 0 and check.compiled.comm_bytes > 0
assert abs(check.compiled.comm_bytes - plan.comm_bytes) <= 0.05 * plan.comm_bytes
""",
    "02_exploring_layouts.ipynb": """
one_d, two_d = [l for l in results if "x" not in l], [l for l in results if "x" in l]
assert max(split[l] for l in one_d) < min(split[l] for l in two_d), split
assert max(results[l].step_time_s for l in two_d) < min(results[l].step_time_s for l in one_d)
assert all(results[l].comm_bytes > 0 for l in results) and len(compiled_comm) == 2
assert all(abs(compiled_comm[l] - results[l].comm_bytes) <= 0.05 * results[l].comm_bytes for l in compiled_comm)
assert len({str(results[l].param_specs["block_0/mlp/w_in"]) for l in results}) > 1
assert tight.peak_memory_bytes <= budget < free.peak_memory_bytes, (tight.peak_memory_bytes, budget)
assert tight.remat.get("blocks", "none") != "none" or tight.microbatches > 1, (tight.remat, tight.microbatches)
assert tight.step_time_s > free.step_time_s
""",
    "03_training.ipynb": """
assert tuple(plan.param_specs["block_0/mlp/w_in"]) != (), plan.param_specs["block_0/mlp/w_in"]
assert w.sharding.shard_shape(w.shape) != w.shape
assert mu.sharding.spec == w.sharding.spec
assert losses[-1] < losses[0]
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    # The kernel is a fresh process: let its first cell choose the device count.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name]))
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
