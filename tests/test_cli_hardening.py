"""Every bad input is refused before any work, as one `fastforget: error: ...` line naming the input,
exit status 2, no traceback; outputs are checked up front; Patch.revert checks what it undoes."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastforget as ff
import fastforget.models
from fastforget.cli import main
from fastforget.errors import InputError, OutputExistsError, OutputPathError, PatchMismatchError
from fastforget.io import check_output_path
from fastforget.patch import Patch, get_parameter

from test_models import release  # noqa: F401  (fixture)


@pytest.fixture()
def no_work(monkeypatch):
    """Loading a model or an encoder is the start of the work: a refusal must come before it."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    for mod, name in ((ff, "load"), (ff, "load_encoder"), (fastforget.models, "load")):
        monkeypatch.setattr(mod, name, boom)


def _refused(capsys, argv, *names):
    """main(argv) exits 2 with one error line naming each of `names`, and no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("fastforget: error: ")]
    assert len(line) == 1, err
    for n in names:
        assert n in line[0], (n, line[0])
    assert "Traceback" not in err
    return line[0]


# ---------------------------------------------------------------- argument values (argparse level)
@pytest.mark.parametrize("argv,names", [
    (["demo", "--steps", "0"], ["--steps", "0"]),
    (["demo", "--steps", "5000"], ["--steps", "5000"]),
    (["demo", "--identities", "1", "--no-erase"], ["--identities", "1"]),
    (["demo", "--per-identity", "0"], ["--per-identity"]),
    (["demo", "--verify-n", "0"], ["--verify-n"]),
    (["demo", "--held-out", "0"], ["--held-out"]),
    (["demo", "--piu-steps", "0"], ["--piu-steps"]),
    (["demo", "--guidance", "nan"], ["--guidance", "finite"]),
    (["demo", "--guidance", "inf"], ["--guidance", "finite"]),
    (["demo", "--guidance", "-1"], ["--guidance"]),
    (["demo", "--anchor-tau", "inf"], ["--anchor-tau", "finite"]),
    (["demo", "--target", "-3"], ["--target"]),
    (["demo", "--seed", "-1"], ["--seed"]),
    (["demo", "--steps", "two"], ["--steps", "two"]),
    (["erase", "demo", "--target", "0", "--out", "o", "--anchor-tau", "nan"], ["--anchor-tau", "finite"]),
    (["erase", "demo", "--target", "0", "--out", "o", "--anchor-tau", "0.95"], ["--anchor-tau"]),
    (["erase", "demo", "--target", "0", "--out", "o", "--steps", "0"], ["--steps"]),
    (["erase", "demo", "--target", "0", "--out", "o", "--verify-n", "-2"], ["--verify-n"]),
    (["verify", "demo", "--target", "0", "--n", "0"], ["--n"]),
    (["export", "demo", "--out", "o", "--threshold", "nan"], ["--threshold", "finite"]),
    (["export", "demo", "--out", "o", "--threshold", "1.5"], ["--threshold"]),
    (["export", "demo", "--out", "o", "--opset", "13"], ["--opset", "13"]),
    (["export", "demo", "--out", "o", "--max-batch", "0"], ["--max-batch"]),
])
def test_bad_argument_values_are_refused_by_the_parser(capsys, no_work, tmp_path, monkeypatch, argv, names):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, argv, *names)
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------- inputs and outputs (typed errors)
def _npy(tmp_path):
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "shape.npy", np.zeros((2, 3), np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")


@pytest.mark.parametrize("target,names", [
    (["missing.npy"], ["--target", "missing.npy", "no such file"]),
    (["pickled.npy"], ["--target", "pickled.npy", "pickle"]),
    (["shape.npy"], ["--target", "shape.npy", "(2, 3)"]),
    (["junk.npy"], ["--target", "junk.npy"]),
    (["-1"], ["--target", "-1"]),
    (["3", "-7"], ["--target", "-7"]),
    (["99999999999999999999999"], ["--target", "99999999999999999999999"]),
    (["face.png"], ["--target", "face.png", "no such image file"]),
])
@pytest.mark.parametrize("command", ["erase", "verify"])
def test_bad_identities_are_refused_before_the_model_loads(capsys, no_work, tmp_path, monkeypatch, target, names,
                                                           command):
    monkeypatch.chdir(tmp_path)
    _npy(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = ["--out", "o"]
    _refused(capsys, [command, "demo", "--target", *target, *out], *names)
    _refused(capsys, [command, "demo", "--target", "0", "--retain", *target, *out], *[n.replace("--target", "--retain")
                                                                                     for n in names])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_outputs_are_checked_before_any_work(capsys, no_work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "k").write_text("keep")
    (tmp_path / "model").mkdir()
    # an existing folder (the issue's `mkdir -p d; touch d/k`): erase, export, verify's report
    for argv in (["erase", "demo", "--target", "0", "--out", "d"], ["export", "demo", "--out", "d"]):
        _refused(capsys, argv, "--out", "d", "exists")
    (tmp_path / "d" / "report.json").write_text("{}")
    _refused(capsys, ["verify", "demo", "--target", "0", "--out", "d"], "--out", "report.json", "exists")
    # a folder that cannot be created: under a file, under /proc
    for argv in (["erase", "demo", "--target", "0", "--out", "d/k/x"], ["export", "demo", "--out", "d/k/x"],
                 ["verify", "demo", "--target", "0", "--out", "d/k/x"], ["demo", "--out", "d/k"]):
        _refused(capsys, argv, "--out", "d/k")
    if os.path.isdir("/proc/self"):
        for argv in (["erase", "demo", "--target", "0", "--out", "/proc/x"], ["export", "demo", "--out", "/proc/x"],
                     ["demo", "--out", "/proc/x"], ["verify", "demo", "--target", "0", "--out", "/proc/x"]):
            _refused(capsys, argv, "--out", "/proc/x")
    # --overwrite never replaces the working directory, a root, or a folder holding an input
    _refused(capsys, ["erase", "demo", "--target", "0", "--out", ".", "--overwrite"], "--out", "working directory")
    _refused(capsys, ["export", "demo", "--out", "/", "--overwrite"], "--out", "root")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model").mkdir()
    _refused(capsys, ["erase", "run/model", "--target", "0", "--out", "run", "--overwrite"], "--out", "input")
    # export's other inputs are read before the model: a missing patch, a missing firewall bank
    _refused(capsys, ["export", "demo", "--out", "e", "--patch", "nope.safetensors"], "nope.safetensors")
    _refused(capsys, ["export", "demo", "--out", "e", "--firewall", "--patch", "nope.safetensors",
                      "--bank", "b.npz"], "nope.safetensors")
    # demo: a target that is one of the held-out identities it measures
    _refused(capsys, ["demo", "--target", "101"], "--target", "101", "held-out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "model", "run"]
    assert (tmp_path / "d" / "k").read_text() == "keep" and (tmp_path / "run" / "model").is_dir()


def test_check_output_path(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputExistsError, match=r"--out: .*f exists"):
        check_output_path(tmp_path / "f", name="--out")
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output_path(tmp_path / "dir", overwrite=True, kind="file", name="out")
    with pytest.raises(OutputPathError, match="not a folder"):
        check_output_path(tmp_path / "f", into=True)
    with pytest.raises(OutputPathError, match="not a folder"):
        check_output_path(tmp_path / "f" / "sub" / "x")
    assert check_output_path(tmp_path / "dir", into=True) == (tmp_path / "dir").resolve()
    assert check_output_path(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f"]  # the probe and the check leave nothing
    assert issubclass(OutputPathError, OSError) and issubclass(OutputExistsError, FileExistsError)


@pytest.mark.parametrize("argv,names", [
    (["erase", "demo", "--target", "-1", "--out", "x"], ["--target", "-1"]),
    (["export", "demo", "--out", "/proc/x"], ["--out", "/proc/x"]),
    (["demo", "--steps", "0"], ["--steps"]),
])
def test_console_script_exits_2_without_a_traceback(tmp_path, argv, names):
    """The installed command, as a user runs it (the in-process tests above cover the cases)."""
    if "/proc/x" in argv and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    exe = shutil.which("fastforget")
    cmd = [exe, *argv] if exe else [sys.executable, "-m", "fastforget.cli", *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "fastforget: error: " in p.stderr
    assert all(n in p.stderr for n in names), p.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- Patch.revert checks what it undoes
@pytest.fixture()
def tiny(release):  # noqa: F811
    return ff.load(*release)


def _two_patches(model):
    names = [n for n, _ in model.unet.named_parameters() if ".attn2.to_k." in n][:2]
    vals = {f"unet.{n}": get_parameter(model, f"unet.{n}").detach() for n in names}
    a = Patch.from_edit(model, {k: v + 1 for k, v in vals.items()}, {"method": "A"})
    b = Patch.from_edit(model, {k: v + 2 for k, v in vals.items()}, {"method": "B"})
    return a, b


def _snapshot(model):
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def test_revert_refuses_a_patch_the_model_does_not_hold(tiny):
    a, b = _two_patches(tiny)
    original = _snapshot(tiny)
    m = a.apply(tiny.clone())
    erased_by_a = _snapshot(m)
    with pytest.raises(PatchMismatchError, match=repr(b.names[0])) as exc:
        b.revert(m)  # B was never applied: reverting it must not undo A
    assert isinstance(exc.value, InputError) and "revert" in str(exc.value)
    assert all(torch.equal(erased_by_a[k], v) for k, v in m.unet.state_dict().items())  # untouched
    a.revert(m)
    assert all(torch.equal(original[k], v) for k, v in m.unet.state_dict().items())
    with pytest.raises(PatchMismatchError, match="already reverted"):
        a.revert(m)
    # one tensor edited after the patch: the first one that differs is named, nothing is changed
    a.apply(m)
    with torch.no_grad():
        get_parameter(m, a.names[1]).add_(0.5)
    edited = _snapshot(m)
    with pytest.raises(PatchMismatchError, match=repr(a.names[1])):
        a.revert(m)
    assert all(torch.equal(edited[k], v) for k, v in m.unet.state_dict().items())
    # the opt-out forces the originals back
    a.revert(m, check=False)
    assert all(torch.equal(original[k], v) for k, v in m.unet.state_dict().items())


def test_apply_mismatch_is_typed_and_names_the_tensor(tiny):
    a, b = _two_patches(tiny)
    m = a.apply(tiny.clone())
    with pytest.raises(PatchMismatchError, match=rf"does not fit this model: {a.names[0]!r}"):
        b.apply(m)
