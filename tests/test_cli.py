"""The `fastforget` command as a user runs it (installed console script)."""
import json
import shutil
import subprocess
import sys

import pytest


def _run(*args, check=True):
    exe = shutil.which("fastforget")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "fastforget.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_demo_generation_table_and_grid(tmp_path):
    out = tmp_path / "demo"
    p = _run("demo", "--no-erase", "--identities", "3", "--per-identity", "1", "--steps", "6", "--out", str(out))
    assert "nearest-centroid accuracy" in p.stdout
    assert (out / "demo_grid.png").stat().st_size > 0


def test_erase_writes_model_patch_report_and_refuses_overwrite(tmp_path):
    import fastforget as ff

    out = tmp_path / "erased"
    p = _run("erase", "demo", "--target", "3", "--method", "closed_form", "--out", str(out), "--verify-n", "1")
    assert "patch" in p.stdout
    for name in ("model/fastforget.json", "patch.safetensors", "report.json", "report.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["acc_u"] is not None and len(report["targets"][0]) == 16  # fingerprints only
    m = ff.load(out / "model")
    patch = ff.Patch.load(out / "patch.safetensors")
    patch.revert(m)  # the saved model is the base model plus exactly this patch
    base = ff.load("demo")
    for name in patch.names:
        assert (ff.patch.get_parameter(m, name) == ff.patch.get_parameter(base, name)).all()
    again = _run("erase", "demo", "--target", "3", "--out", str(out), "--verify-n", "1", check=False)
    assert again.returncode == 2 and "exists" in again.stderr


def test_method_options_from_the_command_line(tmp_path):
    """--option KEY=VALUE reaches the method (JSON values: numbers, lists) and lands in the patch metadata."""
    import fastforget as ff

    out = tmp_path / "erased"
    _run("erase", "demo", "--target", "3", "--method", "closed_form", "--out", str(out), "--verify-n", "1",
         "--option", "neighbours=0", "--option", "neighbour_cos=[0.7,0.9]")
    cfg = ff.Patch.load(out / "patch.safetensors").metadata["config"]
    assert cfg["neighbours"] == 0 and cfg["neighbour_cos"] == [0.7, 0.9]


@pytest.mark.parametrize("args,match", [
    (["erase", "demo", "--target", "3", "--retain", "3", "--out", "x"], "also in retain"),
    (["erase", "demo", "--target", "3", "--method", "nope", "--out", "x"], "unknown method"),
    (["erase", "/nonexistent/model", "--target", "3", "--out", "x"], "not found"),
    (["erase", "demo", "--target", "3", "--out", "x", "--option", "neighbours"], "expected KEY=VALUE"),
    (["erase", "demo", "--target", "3", "--out", "x", "--option", "nonsense=2"], "unknown option(s) 'nonsense'"),
    (["erase", "demo", "--target", "3", "--out", "x", "--option", "neighbours=-1"], "neighbours"),
])
def test_bad_requests_exit_2_with_a_named_error(tmp_path, args, match):
    p = _run(*args, check=False)
    assert p.returncode == 2, p.stderr
    assert match in p.stderr and "Traceback" not in p.stderr
