"""Independent jobs (one deletion queue per served model, a withdrawal) run here or fanned out over Ray.

    results = run_jobs([BatchJob("model-a", "q.jsonl", "out/a"), BatchJob("model-b", "q.jsonl", "out/b")],
                       workers=2)                      # Ray: a local instance, or ray_address="ray://host:10001"

Each job loads its own model in its worker and writes its output folder through
fastforget.io.atomic_directory: a worker killed mid-job leaves only a temporary that the retry (Ray
re-runs a task whose worker died, up to MAX_RETRIES times) removes before it writes the folder whole. A
job that raises (bad input) is not retried: the error is the answer. Ray is optional (`pip install
fastforget[ray]`); with workers=1 and no address the jobs run one after another in this process.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastforget.errors import InputError

MAX_RETRIES = 3  # a worker lost to OOM / a killed node: re-run; an exception from the job itself is not


@dataclass
class BatchJob:
    """erase_batch(model, requests) saved to `out`."""
    model: str
    requests: str
    out: str
    encoder: str | None = None
    seed: int = 0
    preserve: str = "auto"
    structure: str | None = None
    overwrite: bool = False
    progress: bool = False

    def run(self) -> dict:
        from fastforget.batch import erase_batch

        res = erase_batch(self.model, self.requests, encoder=self.encoder, seed=self.seed, preserve=self.preserve,
                          structure=self.structure, progress=self.progress)
        self.write(res)
        return _summary(self, res)

    def write(self, res) -> None:
        res.save(self.out, overwrite=self.overwrite)


@dataclass
class WithdrawJob:
    """withdraw(folder, ids) saved to `out`."""
    folder: str
    request_ids: list
    out: str
    overwrite: bool = False

    def run(self) -> dict:
        from fastforget.batch import withdraw

        res = withdraw(self.folder, list(self.request_ids))
        res.save(self.out, overwrite=self.overwrite)
        return _summary(self, res)


def _summary(job, res) -> dict:
    return {"out": str(job.out), "patch": res.patch.fingerprint(), "requests": res.statistics.ids("erased"),
            "withdrawn": res.statistics.ids("withdrawn"), "metrics": res.report.metrics if res.report else None}


def _run_one(job):
    import torch

    torch.set_num_threads(1)  # a worker owns one CPU: two torch pools on one core collapse
    return job.run()


def run_jobs(jobs: list, *, workers: int = 1, ray_address: str | None = None, progress: bool = True) -> list:
    """Run `jobs` (objects with .run() -> dict); returns their results in order. workers > 1 or an address
    fans them out over Ray (a local instance with `workers` CPUs unless one is running or an address is given)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers: expected an integer >= 1, got {workers!r}")
    outs = [Path(getattr(j, "out", "")) for j in jobs]
    if len(set(outs)) != len(outs):
        raise InputError("jobs: two jobs write the same output folder")
    if workers == 1 and ray_address is None:
        from tqdm import tqdm

        return [j.run() for j in tqdm(jobs, desc="jobs", disable=not progress or len(jobs) < 2)]
    try:
        import ray
    except ImportError:
        raise InputError("workers / ray_address: Ray is not installed (pip install 'fastforget[ray]')") from None
    if not ray.is_initialized():
        if ray_address is not None:
            ray.init(address=ray_address, log_to_driver=progress)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=progress)
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_run_one)
    refs = [task.remote(j) for j in jobs]
    return ray.get(refs)
