"""Mistakes users make, through the CLI and the Python API: each gets exactly one line naming
the culprit (``meshjax: error: ...`` and status 2 on the command line), never a traceback, and
nothing is planned, compiled or trained first.

CLI cases run ``meshjax.cli.main`` in this process (cheap); a few run the real console script.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import meshjax as mj
from meshjax import models, validate
from meshjax.cli import main
from meshjax.errors import MeshjaxError
from meshjax.solve import solve


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exit_:
            rc = exit_.code
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(result, *culprits: str, after_progress: bool = False) -> str:
    """Status 2 and one error line on stderr. ``after_progress``: the error stopped a run whose
    progress bar (on stderr too) came first."""
    rc, out, err = result
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out[-500:], err[-2000:])
    assert "Traceback (most recent call last)" not in err, err
    assert len(lines) == 1 or after_progress and not any(l.startswith("meshjax: error") for l in lines[:-1]), err
    line = lines[-1]
    assert line.startswith("meshjax: error: "), line
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not in {line!r}"
    return line


def assert_api_error(fn, *culprits: str, kind=MeshjaxError) -> str:
    with pytest.raises(kind) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def gpt_graph():
    ex = models.example("gpt-tiny", abstract=True)
    return mj.trace(ex.loss, ex.params, *ex.batch)


# --- meshes ----------------------------------------------------------------------------------


def test_repeated_axis_name():
    assert_one_line_error(cli("plan", "--mesh", "4x2", "--axes", "data,data", "--no-verify"), "'data'", "twice")
    assert_one_line_error(cli("train", "--mesh", "4x2", "--axes", "data,data"), "'data'", "twice")


@pytest.mark.parametrize(
    "mesh, culprits",
    [
        ({"data": 0, "model": 8}, ("'data'", "size 0")),
        ({"data": -2}, ("'data'", "size -2")),
        ({"data": 2.5}, ("'data'", "2.5")),
        ("4x2", ("'4x2'", "dict")),
    ],
)
def test_solve_checks_the_mesh(gpt_graph, mesh, culprits):
    assert_api_error(lambda: solve(gpt_graph, mesh, hardware="cpu-sim"), *culprits)


def test_cli_mesh_sizes():
    assert_one_line_error(cli("plan", "--mesh", "4x0", "--no-verify"), "'4x0'", "positive")
    assert_one_line_error(cli("plan", "--mesh", "4xa", "--no-verify"), "'4xa'")


# --- --set values, typed by the config field -------------------------------------------------


@pytest.mark.parametrize(
    "setting, culprits",
    [
        ("scan_layers=off", ("scan_layers=off", "true or false")),
        ("scan_layers=2", ("scan_layers=2",)),
        ("batch=0", ("batch=0", "positive integer")),
        ("seq=2.5", ("seq=2.5", "integer")),
        ("batch=abc", ("batch=abc", "integer")),
        ("dtype=bogus", ("dtype=bogus", "float32")),
        ("dtype=float64", ("float64", "float32")),
        ("layer=3", ("'layer'", "layers")),
        ("batch", ("'batch'", "key=value")),
        ("batch=8,batch=16", ("'batch'", "twice")),
    ],
)
def test_bad_set_values(setting, culprits):
    assert_one_line_error(cli("plan", "gpt-tiny", "--set", setting, "--no-verify"), *culprits)


def test_set_values_through_the_api():
    assert models.get("gpt-tiny", scan_layers="no")[1].scan_layers is False
    assert models.get("gpt-tiny", scan_layers="yes")[1].scan_layers is True
    assert models.get("gpt-tiny", batch="16")[1].batch == 16
    assert_api_error(lambda: models.get("gpt-tiny", batch=0), "batch=0")
    assert_api_error(lambda: models.get("gpt-tiny", seq=2.5), "seq=2.5")
    assert_api_error(lambda: models.get("gpt-tiny", scan_layers="off"), "scan_layers=off")
    assert_api_error(lambda: models.get("gpt-tiny", dtype="float64"), "float64")
    assert_api_error(lambda: models.get("gpt-tiny", dtype=np.float64), "float64")


# --- rules and pins: the reason, not just "infeasible" ----------------------------------------


def test_rules_that_do_not_divide():
    line = assert_one_line_error(
        cli("plan", "gpt-tiny", "--mesh", "8", "--axes", "model", "--rules", "heads:model", "--no-verify"),
        "'heads'", "size 4", "model=8",
    )
    assert "divide" in line
    assert_one_line_error(
        cli("plan", "gpt-tiny", "--set", "batch=7", "--rules", "batch:data", "--no-verify"), "'batch'", "size 7", "data=4"
    )


@pytest.mark.parametrize(
    "rules, culprits",
    [
        ("batch=", ("'batch'", "batch:none")),
        ("batch:data+data", ("'batch'", "'data'", "twice")),
        ("batch:dta", ("'dta'", "did you mean data")),
        ("bacth:data", ("'bacth'", "did you mean batch")),
    ],
)
def test_bad_rules(rules, culprits):
    assert_one_line_error(cli("plan", "gpt-tiny", "--rules", rules, "--no-verify"), *culprits)


def test_bad_rules_and_pins_through_the_api(gpt_graph):
    mesh = {"data": 4, "model": 2}
    assert_api_error(lambda: solve(gpt_graph, {"model": 8}, rules="heads:model"), "'heads'", "size 4", "model=8")
    assert_api_error(lambda: solve(gpt_graph, mesh, rules="batch:data+data"), "'data'", "twice")
    pin = lambda value: solve(gpt_graph, mesh, pins={"block_0/mlp/w_in": value})  # noqa: E731
    assert_api_error(lambda: pin({"mlp": ("model", "model")}), "'model'", "twice")
    assert_api_error(lambda: pin({"mlp": "modle"}), "'modle'", "did you mean model")
    assert_api_error(lambda: pin({"embed": "data", "mlp": "data"}), "'data'", "'embed'", "'mlp'")
    assert_api_error(
        lambda: solve(gpt_graph, mesh, pins={"block_0/attn/w_q": {"heads": ("data", "model")}}),
        "'heads'", "size 4", "data=4+model=2",
    )


# --- budgets ---------------------------------------------------------------------------------


def test_memory_budgets(gpt_graph):
    assert_one_line_error(cli("plan", "--memory-limit", "-5GB", "--no-verify"), "'-5GB'", "positive")
    assert_one_line_error(cli("plan", "--memory-limit", "lots", "--no-verify"), "'lots'")
    assert_one_line_error(cli("train", "--memory-limit", "-5GB", "--steps", "1"), "'-5GB'", "positive")
    assert_api_error(lambda: solve(gpt_graph, {"data": 8}, memory_budget="-5GB"), "'-5GB'")
    assert_api_error(lambda: solve(gpt_graph, {"data": 8}, memory_budget=0), "0")
    plan = solve(gpt_graph, {"data": 8}, hardware="cpu-sim", memory_budget="16GB")
    assert plan.memory_budget == 16e9
    message = assert_api_error(lambda: solve(gpt_graph, {"data": 8}, hardware="cpu-sim", memory_budget="1kB"), "1.00 kB")
    assert "GiB" not in message


def test_memory_limit_is_echoed_as_typed(capsys):
    rc, out, _ = cli("plan", "gpt-tiny", "--memory-limit", "80GB", "--no-verify", "--top", "1")
    assert rc == 0 and "memory limit 80.00 GB per device" in out


# --- counts and numbers ----------------------------------------------------------------------


def test_counts():
    assert_one_line_error(cli("plan", "--top", "-1", "--no-verify"), "--top -1")
    assert_one_line_error(cli("train", "--steps", "-3"), "--steps -3")
    assert_one_line_error(cli("train", "--lr", "nan"), "--lr nan")
    assert_one_line_error(cli("train", "--lr", "-1"), "--lr -1")
    assert_one_line_error(cli("train", "--batch", "0"), "--batch 0")


def test_train_needs_a_language_model():
    assert_one_line_error(cli("train", "mlp-tiny"), "'mlp-tiny'", "language model", "gpt-tiny")


# --- output paths, checked before any work ---------------------------------------------------


def test_output_paths(tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir" / "x.json")
    assert_one_line_error(cli("plan", "--json", missing), "--json", "does not exist")
    assert_one_line_error(cli("plan", "--hlo", str(tmp_path)), "--hlo", "directory")
    assert_one_line_error(cli("train", "--losses-json", missing), "--losses-json")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(cli("train", "--checkpoint", str(a_file)), "--checkpoint", "not a directory")


def test_resume_needs_a_directory(tmp_path):
    assert_one_line_error(cli("train", "--resume", str(tmp_path / "nope")), "--resume", "nope")
    assert_one_line_error(cli("train", "--skip-damaged"), "--skip-damaged", "--resume")


# --- the loss and the model ------------------------------------------------------------------


MODEL_FILE = '''
import jax
import meshjax as mj

def make(batch=8, size="small", fail=False):
    if fail:
        raise ValueError(f"size {size!r} is not one I know")
    params = {"w": mj.abstract("embed mlp", {"embed": 16, "mlp": 32})}
    x = mj.abstract("batch embed", {"batch": batch, "embed": 16})
    def loss(params, x):          # returns "batch mlp", not a scalar
        return mj.einsum("batch embed, embed mlp -> batch mlp", x, params["w"], name="h")
    return loss, params, (x,)
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(MODEL_FILE)
    return str(path)


def test_a_training_plan_needs_a_scalar_loss(model_file):
    assert_one_line_error(cli("plan", f"{model_file}:make", "--no-verify"), "one scalar", "'h'", "batch mlp")
    rc, out, err = cli("plan", f"{model_file}:make", "--inference", "--no-verify", "--top", "1")
    assert rc == 0, err


def test_user_model_errors_are_one_line(model_file):
    assert_one_line_error(cli("plan", f"{model_file}:make", "--set", "fail=true", "--no-verify"), "ValueError", "'small'")
    assert_one_line_error(cli("plan", f"{model_file}:make", "--set", "fail=perhaps", "--no-verify"), "fail=perhaps")
    assert_one_line_error(cli("plan", f"{model_file}:make", "--set", "bacth=4", "--no-verify"), "'bacth'", "batch")
    assert_one_line_error(cli("plan", f"{model_file}:nope", "--no-verify"), "'nope'")


def test_loss_checked_through_the_api():
    x = mj.abstract("batch embed", {"batch": 8, "embed": 16})
    params = {"w": mj.abstract("embed mlp", {"embed": 16, "mlp": 32})}
    graph = mj.trace(lambda p, x: mj.einsum("batch embed, embed mlp -> batch mlp", x, p["w"], name="h"), params, x)
    assert_api_error(lambda: solve(graph, {"data": 8}, train=True), "one scalar", "'h'")


def test_cross_entropy_and_embed_name_the_vocab_keyword():
    logits = mj.named(jax.numpy.zeros((2, 10)), "img cls")
    labels = mj.named(jax.numpy.zeros((2,), jax.numpy.int32), "img")
    assert_api_error(lambda: mj.cross_entropy(logits, labels), "'vocab'", "vocab=")
    assert mj.cross_entropy(logits, labels, vocab="cls").dims == ("img",)
    table = mj.named(jax.numpy.zeros((10, 4)), "cls embed")
    assert_api_error(lambda: mj.embed(labels, table), "'vocab'", "vocab=")


def test_an_op_may_not_take_a_params_name():
    params = {"wi": mj.abstract("embed mlp", {"embed": 4, "mlp": 8})}
    x = mj.abstract("batch embed", {"batch": 2, "embed": 4})
    fn = lambda p, x: mj.sum(mj.einsum("batch embed, embed mlp -> batch mlp", x, p["wi"], name="wi"), "batch mlp")  # noqa: E731
    assert_api_error(lambda: mj.trace(fn, params, x), "'wi'", "param")


def test_where_keeps_the_values_dim_order():
    scores = mj.named(jax.numpy.ones((2, 3, 3)), "heads seq key_seq")
    keep = mj.named(jax.numpy.tri(3, dtype=bool), "seq key_seq")
    out = mj.where(keep, scores, -1e9)
    assert out.dims == ("heads", "seq", "key_seq")
    np.testing.assert_array_equal(np.asarray(out.value[0]), np.where(np.tri(3, dtype=bool), 1.0, -1e9))
    assert mj.mask(scores, keep).dims == ("heads", "seq", "key_seq")


def test_scalar_repr():
    assert repr(mj.named(jax.numpy.float32(1.5), "")) == "NamedArray(scalar 1.5, dtype=float32)"


def test_rules_none_says_why():
    ex = models.example("gpt-demo", abstract=True)
    plan = solve(mj.trace(ex.loss, ex.params, *ex.batch), {"data": 4, "model": 2}, hardware="cpu-sim", train=True)
    if plan.rules is None:
        why = plan.rules_conflict()
        assert why and "split" in why and "'" in why
    else:
        assert plan.rules_conflict() is None


# --- a plan run on arrays of other shapes ----------------------------------------------------


def test_plan_refuses_arrays_of_other_shapes():
    from meshjax.devices import make_mesh

    ex = models.example("mlp-tiny", embed=32)
    plan = solve(mj.trace(ex.loss, ex.params, *ex.batch), {"data": 4, "model": 2}, hardware="cpu-sim", train=True)
    program = plan.program(ex.loss, make_mesh({"data": 4, "model": 2}))
    wider = models.example("mlp-tiny", embed=64)
    bigger_batch = models.example("mlp-tiny", embed=32, batch=16)
    assert_api_error(lambda: program.jit()(wider.params, *wider.batch), "'mlp/w_in'", "(64, 64)", "(32, 64)")
    assert_api_error(lambda: program.jit()(ex.params, *bigger_batch.batch), "'x'", "(16, 32)", "(8, 32)")
    assert_api_error(lambda: program.place(wider.params, *wider.batch), "'mlp/w_in'")


# --- help and version ------------------------------------------------------------------------


def test_version_and_help():
    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip() == f"meshjax {mj.__version__}"
    rc, out, _ = cli("plan", "--help")
    assert rc == 0 and "``" not in out
    for word in ("gpt-tiny", "gpt-demo", "h100-node", "cpu-sim", "GB", "GiB"):
        assert word in out


@pytest.mark.slow
def test_console_script_errors_are_one_line():
    exe = shutil.which("meshjax") or os.path.join(os.path.dirname(sys.executable), "meshjax")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for argv, culprit in ((["plan", "--set", "batch=abc"], "batch=abc"), (["plan", "--memory-limit", "-5GB"], "-5GB")):
        done = subprocess.run([exe, *argv], capture_output=True, text=True, env=env, timeout=120)
        assert_one_line_error((done.returncode, done.stdout, done.stderr), culprit)


# --- training and checkpoints (these train a few steps: slow) --------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    rc, out, err = cli("train", "gpt-tiny", "--mesh", "2", "--steps", "2", "--save-every", "1",
                       "--checkpoint", str(root / "ckpt"))
    assert rc == 0, err
    assert "steps 1..2" in out  # the summary is on stdout
    return root / "ckpt"


def _damaged(checkpoint_dir, tmp_path, how: str):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, copy)
    step = copy / "2"
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(step / "default") for f in fs
                  if "/d/" in os.path.join(r, f) + "/" and os.path.basename(r) == "d"]
    if how == "empty step folder":
        shutil.rmtree(step)
        step.mkdir()
    elif how == "truncated _METADATA":
        meta = step / "default" / "_METADATA"
        meta.write_text(meta.read_text()[:100])
    elif how == "emptied data files":
        for f in data_files:
            open(f, "w").close()
    elif how == "garbage data files":
        for f in data_files:
            with open(f, "wb") as out:
                out.write(os.urandom(max(64, os.path.getsize(f))))
    elif how == "deleted commit markers":
        for root, _, files in os.walk(step):
            for f in files:
                if f == "commit_success.txt":
                    os.remove(os.path.join(root, f))
    return copy


DAMAGE = {
    "empty step folder": "is empty",
    "truncated _METADATA": "_METADATA",
    "emptied data files": "is empty",
    "garbage data files": "cannot be read",
    "deleted commit markers": "commit marker",
}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoints(checkpoint_dir, tmp_path, how):
    copy = _damaged(checkpoint_dir, tmp_path, how)
    line = assert_one_line_error(cli("train", "gpt-tiny", "--mesh", "2", "--steps", "3", "--resume", str(copy)),
                                 "step 2", DAMAGE[how])
    assert str(copy) in line
    rc, out, err = cli("train", "gpt-tiny", "--mesh", "2", "--steps", "3", "--resume", str(copy), "--skip-damaged")
    assert rc == 0, err
    assert "resumed from" in out and "at step 1" in out and "steps 2..3" in out
    assert "step 2" in err and "skipped" in err


@pytest.mark.slow
def test_steps_must_exceed_the_resumed_step(checkpoint_dir):
    assert_one_line_error(cli("train", "gpt-tiny", "--mesh", "2", "--steps", "2", "--resume", str(checkpoint_dir)),
                          "--steps 2", "step 2")


@pytest.mark.slow
def test_non_finite_loss_stops_training(tmp_path):
    ckpt = tmp_path / "ckpt"
    losses = tmp_path / "losses.json"
    line = assert_one_line_error(
        cli("train", "gpt-tiny", "--mesh", "2", "--steps", "5", "--lr", "1e38", "--save-every", "1",
            "--checkpoint", str(ckpt), "--losses-json", str(losses)),
        "loss is nan", "last checkpoint: step 1", after_progress=True,
    )
    assert "step 2" in line
    assert sorted(os.listdir(ckpt)) == ["1"]  # the last good step is kept, nothing after it
    assert not losses.exists()


def test_validate_is_one_place():
    # The CLI's --set reader and the API's config check are the same function.
    assert validate.config_value("m", "scan_layers", "0", False) is False
    assert validate.memory_budget("80GB") == 80e9
    with pytest.raises(MeshjaxError):
        validate.axis_names("data,data")
