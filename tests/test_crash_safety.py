"""kill -9 in the middle of a write leaves the old output or the complete new one, never half of one,
and the next write to the same place removes what the killed writer left behind.

The writes run in processes forked from one "zygote" subprocess that has imported torch and
fastforget and built the models once (a fresh interpreter per trial would spend seconds importing);
the zygote sends SIGKILL to each child after a random (seeded) delay drawn over the write's
measured duration, reaps it, and reports. The test then inspects the destination and its folder.
"""
import hashlib
import json
import os
import random
import selectors
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastforget import io as ffio

TESTS_DIR = Path(__file__).resolve().parent
TRIALS = 20

ZYGOTE = r'''
import json, os, signal, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)  # no OpenMP pool in the zygote: its forked children can run torch safely
import fastforget as ff
from fastforget.api import ErasureResult
from fastforget.patch import Patch

demo = ff.load("demo")
chosen, total = {}, 0
for name, p in demo.unet.named_parameters():  # a patch of ~1M parameters: a write takes milliseconds, not microseconds
    if p.ndim >= 2 and total < 1_000_000:
        chosen["unet." + name] = p.detach()
        total += p.numel()
patches = [Patch.from_edit(demo, {k: v * (1.01 + 0.01 * i) for k, v in chosen.items()},
                           {"method": f"crash-test-{i}"}) for i in range(2)]
models = [demo, patches[0].apply(demo.clone())]

import tempfile
from test_models import tiny_shuffle_model

tiny = tiny_shuffle_model()
tiny2 = tiny.clone()
with torch.no_grad():
    tiny2.unet.conv_out.weight.mul_(1.5)
tinies = [tiny, tiny2]

JOBS = {
    "patch": lambda v, dest: patches[v].save(dest, overwrite=True),
    "model": lambda v, dest: ErasureResult(models[v], patches[v], None).save(dest, overwrite=True),
    "onnx": lambda v, dest: ff.export.to_onnx(tinies[v], dest, overwrite=True, verify=False),
}
warm = tempfile.mkdtemp()  # first calls import and compile lazily: do that once here, not in every child
for job, fn in JOBS.items():
    fn(0, os.path.join(warm, job))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)  # the child's prints must not reach the protocol pipe
        code = 0
        try:
            JOBS[cmd["job"]](cmd["variant"], cmd["dest"])
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    killed = started = False
    if cmd["delay"] is None:
        _, status = os.waitpid(pid, 0)
    else:
        deadline = None if cmd["after_temp"] else t0 + cmd["delay"]
        parent, mark = os.path.dirname(cmd["dest"]), f".tmp-p{pid}s"
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.monotonic()
            if deadline is None:  # count the delay from the moment the child's temporary appears
                if any(mark in n for n in os.listdir(parent)):
                    started, deadline = True, now + cmd["delay"]
                else:
                    time.sleep(0.0002)
                    continue
            if now >= deadline:
                os.kill(pid, signal.SIGKILL)  # our unreaped child: its pid cannot have been reused
                _, status = os.waitpid(pid, 0)
                killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                break
            time.sleep(min(0.0005, deadline - now))
    print(json.dumps({"pid": pid, "killed": killed, "elapsed": time.monotonic() - t0, "started": started,
                      "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)}), flush=True)
'''


class Zygote:
    def __init__(self, folder: Path):
        script = folder / "zygote.py"
        script.write_text(ZYGOTE)
        self.stderr_path = folder / "zygote.stderr"
        self._err = open(self.stderr_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
        self.proc = subprocess.Popen([sys.executable, str(script), str(TESTS_DIR)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        assert self._read(timeout=300).get("ready")

    def _read(self, timeout: float) -> dict:
        if not self._sel.select(timeout):
            raise AssertionError(f"zygote silent for {timeout} s; stderr:\n{self.stderr_path.read_text()[-3000:]}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"zygote died; stderr:\n{self.stderr_path.read_text()[-3000:]}")
        return json.loads(line)

    def run(self, job: str, variant: int, dest: Path, delay: float | None, after_temp: bool = False) -> dict:
        """Write `variant` of `job` to `dest` in a forked child; SIGKILL it `delay` s after the fork
        (after_temp: after its temporary appears beside `dest`) unless it is done by then."""
        self.proc.stdin.write(json.dumps({"job": job, "variant": variant, "dest": str(dest), "delay": delay,
                                          "after_temp": after_temp}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout=120)

    def close(self):
        self.proc.kill()  # idle, between commands: nothing of its own is being written
        self.proc.wait(timeout=30)
        self._err.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def _digest(path: Path):
    """None if absent; the bytes' hash for a file; (relative path, hash) of every entry for a folder."""
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + b"\0")
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _others(dest: Path) -> list[Path]:
    return sorted(p for p in dest.parent.iterdir() if p.name != dest.name)


def _kill_trials(zygote, tmp_path, job: str, name: str, seed: int):
    """TRIALS writes killed at random moments; returns the outcome counts."""
    ref = {}
    durations = []
    for v in (0, 1):  # reference outputs, written without interruption
        d = tmp_path / f"ref{v}" / name
        d.parent.mkdir()
        r = zygote.run(job, v, d, None)
        assert r["exit"] == 0, zygote.stderr_path.read_text()[-3000:]
        ref[v] = _digest(d)
        durations.append(r["elapsed"])
    assert ref[0] != ref[1]
    span = 1.2 * max(durations)  # kill times cover the whole write, and a little after it
    rng = random.Random(seed)
    dest = tmp_path / "work" / name
    dest.parent.mkdir()
    state, counts, killed_pids = None, {"old": 0, "new": 0, "left_temporaries": 0, "killed": 0}, set()
    for i in range(TRIALS):
        if i % 4 == 3:  # now and then the destination is absent before the write
            for p in [dest, *_others(dest)]:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            state = None
        v = 1 if state == ref[0] else 0  # always write something other than what is there
        # even trials: a time anywhere in the whole call (serialising, tracing, writing, renaming);
        # odd trials: a time after the temporary exists, i.e. while files are being written or renamed
        r = zygote.run(job, v, dest, rng.uniform(0.0, span if i % 2 == 0 else span / 2), after_temp=i % 2 == 1)
        assert r["killed"] or r["exit"] == 0, zygote.stderr_path.read_text()[-3000:]
        now = _digest(dest)
        assert now in (state, ref[v]), f"trial {i}: {dest} is neither its previous state nor the complete new output"
        counts["killed"] += r["killed"]
        counts["new" if now == ref[v] and now != state else "old"] += 1
        temps = _others(dest)
        killed_pids.add(r["pid"])
        mine = [p for p in temps if f"-p{r['pid']}s" in p.name]
        if mine or not r["killed"]:
            # it got as far as its own temporary (or finished): it first removed what earlier killed
            # writers had left, so anything here is its own
            assert mine == temps, (i, r["pid"], [p.name for p in temps])
        else:  # killed before it started writing: leftovers, if any, are killed writers'
            assert all(any(f"-p{k}s" in p.name for k in killed_pids) for p in temps), [p.name for p in temps]
        counts["left_temporaries"] += bool(temps)
        state = now
    # one more write, not interrupted: complete, and no temporary of any killed writer remains
    v = 1 if state == ref[0] else 0
    r = zygote.run(job, v, dest, None)
    assert r["exit"] == 0, zygote.stderr_path.read_text()[-3000:]
    assert _digest(dest) == ref[v]
    assert _others(dest) == [], [p.name for p in _others(dest)]
    # the trials did interrupt writes half-way (else they would prove nothing)
    assert counts["killed"] >= TRIALS // 4 and counts["left_temporaries"] >= 3, counts
    print(f"\n{job}: {TRIALS} kill -9 trials, write {min(durations):.3f}-{max(durations):.3f} s: {counts}")
    return counts


def test_kill_9_during_patch_save(zygote, tmp_path):
    _kill_trials(zygote, tmp_path, "patch", "patch.safetensors", seed=1)


def test_kill_9_during_erasure_result_save(zygote, tmp_path):
    """ErasureResult.save: model/ (the demo model's folder, itself written atomically inside) + patch."""
    _kill_trials(zygote, tmp_path, "model", "erased", seed=2)


def test_kill_9_during_onnx_export(zygote, tmp_path):
    _kill_trials(zygote, tmp_path, "onnx", "onnx_out", seed=3)


# ---------------------------------------------------------------- the cleanup rule itself
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp_name(target: str, kind: str, pid: int, start: int, host: str = ffio._HOST) -> str:
    return f".{target}.{kind}-p{pid}s{start}h{host}-abc123"


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    dest = tmp_path / "out"
    me = os.getpid()
    dead = _dead_pid()
    live = tmp_path / _temp_name("out", "tmp", me, ffio._start_time(me))
    reused = tmp_path / _temp_name("out", "tmp", me, ffio._start_time(me) + 1)  # same pid, another process
    stale_dir = tmp_path / _temp_name("out", "tmp", dead, 0)
    stale_file = tmp_path / _temp_name("out", "probe", dead, 0)
    foreign = tmp_path / _temp_name("out", "tmp", dead, 0, host="ffffff" if ffio._HOST != "ffffff" else "eeeeee")
    other_target = tmp_path / _temp_name("other", "tmp", dead, 0)
    for p in (live, reused, stale_dir, foreign, other_target):
        p.mkdir()
        (p / "partial.bin").write_bytes(b"x" * 10)
    stale_file.write_bytes(b"")
    ffio.atomic_write_bytes(dest, b"new")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out", live.name, foreign.name, other_target.name}, left
    assert dest.read_bytes() == b"new"


def test_a_writer_killed_between_the_two_renames_is_rolled_back(tmp_path, monkeypatch):
    """Where the atomic swap is unavailable, the old folder is moved aside first; if the writer dies
    before moving the new one in, the next write (or check) puts the old one back."""
    dest = tmp_path / "out"
    old = tmp_path / _temp_name("out", "old", _dead_pid(), 0)
    (old / "x").mkdir(parents=True)
    (old / "x" / "weights.bin").write_bytes(b"previous")
    with pytest.raises(ff_errors().OutputExistsError, match="out"):  # the old output is back, so it exists
        ffio.check_output_path(dest)
    assert (dest / "weights.bin").read_bytes() == b"previous" and not old.exists()
    monkeypatch.setattr(ffio, "_exchange", lambda a, b: False)
    with ffio.atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"next")
    assert (dest / "weights.bin").read_bytes() == b"next" and [p.name for p in tmp_path.iterdir()] == ["out"]


def ff_errors():
    import fastforget.errors

    return fastforget.errors


def test_an_error_inside_the_write_leaves_the_old_output_and_nothing_else(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    with ffio.atomic_directory(dest) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with ffio.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("boom")
    assert (dest / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    # an output that appears while a non-overwriting write runs is not replaced
    with pytest.raises(ff_errors().OutputExistsError, match="appeared"):
        with ffio.atomic_directory(tmp_path / "late") as tmp:
            (tmp_path / "late").mkdir()
            (tmp_path / "late" / "theirs").write_text("keep")
    assert (tmp_path / "late" / "theirs").read_text() == "keep"
    real = ffio.check_output_path

    def check_then_someone_writes(*a, **k):
        out = real(*a, **k)
        (tmp_path / "f").write_bytes(b"theirs")
        return out

    monkeypatch.setattr(ffio, "check_output_path", check_then_someone_writes)
    with pytest.raises(ff_errors().OutputExistsError, match="appeared"):
        ffio.atomic_write_bytes(tmp_path / "f", b"mine")
    assert (tmp_path / "f").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "late", "out"]
