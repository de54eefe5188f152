"""Independent batch jobs over Ray (`fastforget batch --workers N`), on a local instance with 2 CPUs.

Results equal a single-process run; a worker killed while writing its output is retried and leaves no
half-written folder. Skipped where Ray is not installed (it is the optional extra `fastforget[ray]`)."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install 'fastforget[ray]')")

from fastforget.jobs import BatchJob, run_jobs  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillOnceJob travels to the workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _queues(tmp_path, encoder):
    from fastforget.identity.embeddings import to_embeddings

    e = to_embeddings([7500, 7501, 7502], encoder, per_identity=2)
    paths = []
    for name, rows in (("week1", [0, 1]), ("week2", [2])):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"id": f"{name}-{i}", "targets": [e[i].tolist()]}) + "\n" for i in rows))
        paths.append(str(p))
    return paths


class KillOnceJob(BatchJob):
    """The first attempt dies (SIGKILL) halfway through writing its output folder."""

    marker: str = ""

    def write(self, res):
        from fastforget.io import atomic_directory

        if not os.path.exists(self.marker):
            Path(self.marker).write_text("killed once")
            with atomic_directory(self.out) as tmp:
                res.model.save_pretrained(tmp / "model")
                os.kill(os.getpid(), signal.SIGKILL)
        super().write(res)


def _files(folder: Path) -> dict:
    """Every output file's bytes; the statistics by their tensors (their header, like the ledger and the
    report, carries the time each request was applied)."""
    import torch

    from fastforget.batch import BatchStatistics

    out = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
           and p.name not in ("report.json", "ledger.json", "statistics.safetensors")}
    tensors, meta = BatchStatistics.load(folder / "statistics.safetensors").to_tensors()
    out["statistics"] = {k: v.numpy().tobytes() for k, v in tensors.items()}
    out["requests"] = [{k: v for k, v in r.items() if k != "time"} for r in meta["requests"]]
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    return out


def _one_thread(fn):
    """Ray workers run one torch thread each; float reductions differ between thread counts, so the
    single-process reference runs with one thread too (bytes are equal at equal thread counts)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


def test_ray_jobs_equal_a_single_process_run(local_ray, tmp_path, encoder):
    queues = _queues(tmp_path, encoder)
    one = _one_thread(lambda: run_jobs([BatchJob("demo", q, str(tmp_path / "single" / Path(q).stem))
                                        for q in queues], progress=False))
    two = run_jobs([BatchJob("demo", q, str(tmp_path / "ray" / Path(q).stem)) for q in queues], workers=2,
                   progress=False)
    assert [r["patch"] for r in one] == [r["patch"] for r in two]
    for q in queues:
        a, b = tmp_path / "single" / Path(q).stem, tmp_path / "ray" / Path(q).stem
        assert _files(a) == _files(b)


def test_a_killed_worker_is_retried_without_a_half_written_output(local_ray, tmp_path, encoder):
    q = _queues(tmp_path, encoder)[0]
    job = KillOnceJob("demo", q, str(tmp_path / "out"))
    job.marker = str(tmp_path / "killed")
    (res,) = run_jobs([job], workers=2, progress=False)
    assert Path(job.marker).exists()  # the first attempt did die mid-write
    (ref,) = _one_thread(lambda: run_jobs([BatchJob("demo", q, str(tmp_path / "ref"))], progress=False))
    assert res["patch"] == ref["patch"]
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert leftovers == []  # the dead attempt's temporary was removed by the retry


def test_verification_jobs_over_ray_equal_in_process(local_ray, tmp_path, encoder):
    from fastforget.jobs import VerifyJob

    q = _queues(tmp_path, encoder)[0]
    run_jobs([BatchJob("demo", q, str(tmp_path / "out"))], progress=False)
    kw = dict(sample=2, n=1, steps=4)
    (a,) = _one_thread(lambda: run_jobs([VerifyJob(str(tmp_path / "out"), q, str(tmp_path / "v1.json"), **kw)],
                                        progress=False))
    (b,) = run_jobs([VerifyJob(str(tmp_path / "out"), q, str(tmp_path / "v2.json"), **kw)], workers=2,
                    progress=False)
    assert a["metrics"] == b["metrics"] and a["requests"] == ["week1-0", "week1-1"]
    assert a["metrics"]["ism_f"] < a["metrics"]["ism_f_before"]  # the erased generate someone else
    other = tmp_path / "other.jsonl"  # a request file that is not the one the batch was made from
    other.write_text(json.dumps({"id": "week1-0", "targets": [7600]}) + "\n")
    from fastforget.errors import InputError

    with pytest.raises(InputError, match="fingerprints differ"):
        VerifyJob(str(tmp_path / "out"), str(other), str(tmp_path / "v3.json"), **kw).run()
