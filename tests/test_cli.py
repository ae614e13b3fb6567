"""The ``meshjax`` command: plan, compare, and one-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from meshjax.cli import main


@pytest.mark.slow
def test_console_script_default_plan():
    exe = shutil.which("meshjax") or os.path.join(os.path.dirname(sys.executable), "meshjax")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["COLUMNS"] = "200"
    out = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "layout on mesh {'data': 4, 'model': 2}" in out.stdout  # the layout table
    assert "predicted step" in out.stdout                          # the cost table
    # The default shows sharding at work: split weights, comm predicted and compiled.
    assert "block_0/mlp/w_in" in out.stdout and "P(None, 'model')" in out.stdout
    line = next(l for l in out.stdout.splitlines() if l.startswith("comm bytes/step: predicted"))
    predicted, compiled = (float(n.replace(",", "")) for n in re.findall(r"(?:predicted|compiled) ([\d,]+)", line))
    assert predicted > 0 and compiled > 0, line


@pytest.mark.slow
def test_plan_gpt_small_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    hlo = tmp_path / "out.hlo"
    rc = main(["plan", "gpt-small", "--mesh", "4x2", "--train", "--verify", "--json", str(path), "--hlo", str(hlo),
               "--rules", "batch=data,seq=none"])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert list(doc) == [
        "model", "mesh", "hardware", "train", "tensors", "rules", "settings", "predicted", "compiled", "verification",
        "remat", "microbatches", "solve_time_s",
    ]
    assert doc["model"] == "gpt-small" and doc["mesh"] == {"data": 4, "model": 2} and doc["train"] is True
    assert set(doc["predicted"]) == {"step_time_s", "comm_bytes", "peak_memory_bytes", "memory_breakdown"}
    breakdown = doc["predicted"]["memory_breakdown"]
    assert {"params", "gradients", "optimizer_state", "activations"} <= set(breakdown)
    assert breakdown["total"] == pytest.approx(doc["predicted"]["peak_memory_bytes"])
    assert breakdown["optimizer_state"] == pytest.approx(2 * breakdown["params"])  # fp32 Adam: two moments
    assert doc["settings"]["memory_budget"] == pytest.approx(0.9 * 24 * 2**30 / 8)  # cpu-sim's usable memory
    assert doc["settings"]["optimizer"].startswith("adam")
    tensor = next(t for t in doc["tensors"] if t["name"] == "tokens")
    assert set(tensor) == {"name", "dims", "shape", "role", "spec"}
    assert tensor["spec"][0] in ("data", ["data"]) and tensor["spec"][1] is None
    assert all(len(t["spec"]) == len(t["dims"]) for t in doc["tensors"])
    compiled = doc["compiled"]
    assert compiled["comm_bytes"] > 0
    assert sum(v["bytes"] for v in compiled["collectives"].values()) == compiled["comm_bytes"]
    assert all(set(v) == {"count", "bytes"} for v in compiled["collectives"].values())
    assert compiled["memory"]["peak_bytes"] > 0
    check = doc["verification"]
    assert check["compiled_comm_bytes"] == compiled["comm_bytes"]
    assert check["comm_ratio"] == pytest.approx(compiled["comm_bytes"] / check["predicted_comm_bytes"])
    assert check["memory_ratio"] == pytest.approx(compiled["memory"]["peak_bytes"] / doc["predicted"]["peak_memory_bytes"])
    in_band = check["comm_band"][0] <= check["comm_ratio"] <= check["comm_band"][1] and (
        check["memory_band"][0] <= check["memory_ratio"] <= check["memory_band"][1]
    )
    assert check["within_band"] == in_band
    assert ("warning: compiled differs from the prediction" in capsys.readouterr().out) == (not in_band)
    assert "HloModule" in hlo.read_text()


def test_plan_model_from_file_with_overrides(tmp_path, capsys):
    (tmp_path / "mymodel.py").write_text(
        "from meshjax import models\n"
        "def make(batch=8):\n"
        "    ex = models.example('mlp-tiny', abstract=True, batch=batch)\n"
        "    return ex.loss, ex.params, ex.batch\n"
    )
    path = tmp_path / "p.json"
    rc = main(["plan", f"{tmp_path}/mymodel.py:make", "--mesh", "8", "--set", "batch=16", "--no-verify",
               "--inference", "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert "compiled" not in doc and doc["train"] is False
    assert next(t for t in doc["tensors"] if t["name"] == "x")["shape"] == [16, 16]


@pytest.mark.slow
def test_compare(tmp_path, capsys):
    path = tmp_path / "cmp.json"
    assert main(["compare", "gpt-tiny", "--devices", "8", "--no-verify", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    meshes = {tuple(r["mesh"].items()) for r in doc["rows"]}
    assert meshes == {(("data", 8),), (("model", 8),), (("data", 4), ("model", 2)), (("data", 2), ("model", 4))}
    strategies = {r["strategy"] for r in doc["rows"]}
    assert {"solver", "dp", "fsdp", "megatron", "mtf", "gspmd", "xla-prop"} <= strategies
    for mesh in meshes:
        rows = [r for r in doc["rows"] if tuple(r["mesh"].items()) == mesh]
        solver = next(r for r in rows if r["strategy"] == "solver")
        assert solver["predicted"]["step_time_s"] <= min(r["predicted"]["step_time_s"] for r in rows) * (1 + 1e-9)
    out = capsys.readouterr().out
    assert "fastest predicted" in out


def test_compare_verified(tmp_path, capsys):
    path = tmp_path / "cmp.json"
    assert main(["compare", "mlp-tiny", "--meshes", "4x2", "--strategies", "solver,dp,megatron",
                 "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["verified"] is True and len(doc["rows"]) == 3
    assert all(r["compiled"]["comm_bytes"] >= 0 and "collectives" in r["compiled"] for r in doc["rows"])
    # One compile path: every row (baselines priced as plans) compiles to its predicted comm bytes.
    for r in doc["rows"]:
        assert r["compiled"]["comm_bytes"] == pytest.approx(r["predicted"]["comm_bytes"], rel=0.03), r


VIT = """
import jax.numpy as jnp
import meshjax as mj

def make(img=16, patch=8, width=32, ffn=64, classes=16):
    sizes = dict(img=img, patch=patch, width=width, ffn=ffn, classes=classes)
    params = mj.abstract_params({"w_in": mj.param("width ffn"), "w_out": mj.param("ffn width"),
                                 "head": mj.param("width classes")}, sizes)

    def loss(p, x, labels):
        h = mj.gelu(mj.einsum("img patch width, width ffn -> img patch ffn", x, p["w_in"], name="up"), name="act")
        y = mj.einsum("img patch ffn, ffn width -> img width", h, p["w_out"], name="down")
        logits = mj.einsum("img width, width classes -> img classes", y, p["head"], name="logits")
        return mj.mean(mj.cross_entropy(logits, labels, vocab="classes", name="xent"), "img", name="loss")

    return loss, params, (mj.abstract("img patch width", sizes), mj.abstract("img", sizes, jnp.int32))
"""


def test_compare_roles_map_a_models_dims(tmp_path, capsys):
    (tmp_path / "vit.py").write_text(VIT)
    path = tmp_path / "cmp.json"
    assert main(["compare", f"{tmp_path}/vit.py:make", "--meshes", "4x2", "--strategies", "dp,megatron",
                 "--no-verify"]) == 2
    assert "no dim plays the batch role" in capsys.readouterr().err
    assert main(["compare", f"{tmp_path}/vit.py:make", "--meshes", "4x2", "--strategies", "dp,megatron",
                 "--roles", "batch=img,mlp=ffn", "--no-verify", "--json", str(path)]) == 0
    rows = {r["strategy"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["dp"]["predicted"]["comm_bytes"] > 0 and rows["megatron"]["predicted"]["comm_bytes"] > 0
    assert rows["dp"]["predicted"]["comm_bytes"] != rows["megatron"]["predicted"]["comm_bytes"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "gpt-tinyy", "--no-verify"], "unknown model"),
        (["plan", "--mesh", "4x4", "--devices", "8"], "16 devices but --devices is 8"),
        (["plan", "--rules", "batch", "--no-verify"], "not of the form"),
        (["plan", "--rules", "batch=data,nosuch=model", "--no-verify"], "no tensor has that dim"),
        (["plan", "--hardware", "tpu-v9", "--no-verify"], "unknown hardware profile"),
        (["plan", "--memory-limit", "1KiB", "--no-verify"], "no layout fits"),
        (["plan", "--set", "nosuch=1", "--no-verify"], "no config field"),
        (["plan", "nofile.py:make", "--no-verify"], "no file"),
        (["compare", "mlp-tiny", "--meshes", "4x4"], "16 devices but --devices is 8"),
        (["compare", "mlp-tiny", "--strategies", "zero-9", "--no-verify"], "unknown strategy"),
        (["compare", "mlp-tiny", "--roles", "batch=img", "--no-verify"], "role batch=img: the model has no dim 'img'"),
        (["compare", "mlp-tiny", "--roles", "bacth=batch", "--no-verify"], "unknown role 'bacth'"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meshjax: error: ") and message in err, err
    assert "Traceback" not in err


def test_plan_solves_again_when_the_compiled_step_exceeds_the_budget(tmp_path, capsys):
    """mlp-small on 8 devices under 103,424 B: the first plan is predicted within the budget but
    compiles 76 B above it; ``meshjax plan`` solves again under the budget less the overshoot and
    reports the plan whose compiled step fits."""
    path = tmp_path / "out.json"
    budget = 103424
    assert main(["plan", "mlp-small", "--mesh", "8", "--hardware", "cpu-sim", "--memory-limit", str(budget),
                 "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    [first] = doc["budget_tries"]
    assert first["solved_for"] == budget and first["compiled_bytes"] > budget
    assert doc["compiled"]["memory"]["peak_bytes"] <= budget
    assert doc["predicted"]["peak_memory_bytes"] <= budget * first["solved_for"] / first["compiled_bytes"] * (1 + 1e-9)
    assert "solving again under a budget less the overshoot" in capsys.readouterr().out


def test_a_budget_no_compiled_plan_meets_is_one_line_naming_both_budgets():
    """When the plan's compiled step exceeds the budget and the budget less the overshoot fits no
    layout, the error says so in one line, with the solver's reason."""
    from types import SimpleNamespace

    from meshjax.errors import InfeasibleError
    from meshjax.verify import keep_budget

    def resolve(budget):
        raise InfeasibleError(f"no layout fits {budget:.0f} B per device: the least memory any layout needs is 95 B")

    with pytest.raises(InfeasibleError) as err:
        keep_budget(SimpleNamespace(peak_memory_bytes=100.0), 100.0, lambda plan: 125.0, resolve)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("no plan compiles within 100 B per device: the plan solved for 100 B compiled to 125 B")
    assert message.endswith("no layout fits 80 B per device: the least memory any layout needs is 95 B")
