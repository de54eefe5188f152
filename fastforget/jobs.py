"""Independent jobs (one deletion queue per served model, a withdrawal, the verification of each result) run
here or fanned out over Ray.

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
    options: dict | None = None   # the structure's options (closed_form's, or keyed's)

    def run(self) -> dict:
        from fastforget.batch import erase_batch

        res = erase_batch(self.model, self.requests, encoder=self.encoder, seed=self.seed, preserve=self.preserve,
                          structure=self.structure, progress=self.progress, **(self.options or {}))
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


@dataclass
class VerifyJob:
    """ff.verify on a saved batch folder: an evenly spaced sample of its erased requests, against the unedited
    model (the folder's patch reverted). The folder keeps no embeddings, so the targets are re-read from the
    request file the batch was made from (checked against the ledger's fingerprints). Writes `out` (JSON,
    atomically): request ids, metrics and fingerprints only."""
    folder: str
    requests: str
    out: str
    encoder: str | None = None
    sample: int = 8
    n: int = 2
    steps: int = 25
    seed: int = 0
    overwrite: bool = False

    def run(self) -> dict:
        import json

        import torch

        from fastforget.batch import _embed, _load_previous, parse_requests
        from fastforget.identity.encoder import resolve_encoder
        from fastforget.io import atomic_write_bytes
        from fastforget.models import load
        from fastforget.patch import fingerprint_embeddings
        from fastforget.verify import verify

        base, stats = _load_previous(self.folder)
        erased = {r.id: r for r in stats.requests if r.status == "erased"}
        reqs = [r for r in parse_requests(self.requests) if r.id in erased]
        if not reqs:
            raise InputError(f"{self.requests}: none of its requests is erased in {self.folder}")
        step = max(1, len(reqs) // self.sample)
        reqs = reqs[::step][:self.sample]
        enc = resolve_encoder(self.encoder if self.encoder is not None or stats.preserve.get("kind") != "testbed"
                              else "demo", base, "verify")
        for r in reqs:
            _embed(r, enc, stats.seed)
            if fingerprint_embeddings(r.target_emb, stats.salt) != erased[r.id].fingerprints:
                raise InputError(f"{r.where}: its targets are not the ones request {r.id!r} erased in {self.folder} "
                                 "(fingerprints differ): pass the request file the batch was made from")
        model = load(str(Path(self.folder) / "model"))
        rep = verify(model, torch.cat([r.target_emb for r in reqs]), encoder=enc, n=self.n, seed=self.seed,
                     baseline=base, steps=self.steps)
        result = {"folder": str(self.folder), "requests": [r.id for r in reqs], "metrics": rep.metrics,
                  "targets": rep.details["targets"]}
        atomic_write_bytes(self.out, json.dumps(result, indent=2, sort_keys=True, default=float).encode(),
                           overwrite=self.overwrite)
        return {"out": str(self.out), **result}


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
