"""PIU fine-tuning on the testbed in one process vs data-parallel over torchrun (gloo, CPU, 1 thread a process).

    python benchmarks/bench_distributed.py [--steps 10] [--nproc 2]

The same request, seed and global batch (PIU's micro-batch 16 x accumulation 2) run once in a single process
(the anchor) and once under `python -m torch.distributed.run --standalone --nproc_per_node N`; each run times
only the fit (train_student and its setup inside fit_piu), not imports or model loading. Prints one table:
processes, fit seconds, speed-up over one process, and how far the patch is from the single-process patch (max
abs, max relative to each tensor's scale, relative norm of the update difference). Writes
benchmarks/results/bench_distributed.txt / .json."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _request():
    import torch
    import torch.nn.functional as F

    import fastforget as ff
    from fastforget.methods import ErasureRequest

    enc = ff.load_encoder("demo")

    def emb(ids):
        imgs, who = ff.testbed.render(ids, per_identity=4, seed=0)
        e = enc.encode(imgs)
        return F.normalize(torch.stack([e[torch.as_tensor(who) == i].mean(0) for i in ids]), dim=1)

    return ErasureRequest(emb([3]), emb([50]), retain=emb(list(range(10, 18))))


def worker(out: str, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    import fastforget as ff
    from fastforget import distributed
    from fastforget.methods import get_method

    distributed.init_from_env()
    model, request = ff.load("demo"), _request()
    distributed.barrier()
    t = time.perf_counter()
    patch = get_method("piu")(model, request, seed=0, progress=False, steps=steps)
    fit_s = time.perf_counter() - t
    if distributed.is_main():
        patch.save(out)
        Path(out + ".json").write_text(json.dumps({"fit_s": fit_s, "world_size": distributed.world_size()}))
    distributed.barrier()
    distributed.shutdown()


def _compare(single, dist) -> dict:
    num = den = 0.0
    max_abs = max_rel = 0.0
    for k in single.names:
        a, b = single.new[k].float(), dist.new[k].float()
        d = (a - b).abs().max().item()
        max_abs, max_rel = max(max_abs, d), max(max_rel, d / a.abs().max().item())
        num += ((a - b) ** 2).sum().item()
        den += ((a - single.old[k].float()) ** 2).sum().item()
    return {"max_abs": max_abs, "max_rel_tensor": max_rel, "update_rel": (num / den) ** 0.5}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    from fastforget.patch import Patch

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    me = [str(Path(__file__).resolve()), "--steps", str(args.steps)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(1, [sys.executable, *me]),
                (args.nproc, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              str(args.nproc), *me])]
        for n, cmd in runs:
            out = f"{tmp}/piu_{n}.safetensors"
            subprocess.run(cmd + ["--worker", out], env=env, check=True, stdout=subprocess.DEVNULL)
            rows.append({"processes": n, **json.loads(Path(out + ".json").read_text()),
                         "patch": Patch.load(out)})
    single = rows[0]["patch"]
    for r in rows:
        r.update(_compare(single, r.pop("patch")))
        r["speedup"] = rows[0]["fit_s"] / r["fit_s"]
    lines = [f"PIU fit on the testbed, {args.steps} steps of micro-batch 16 x accumulation 2, 1 thread a process "
             f"(CPU: {os.cpu_count()} cores, shared with other jobs)",
             f"{'processes':>9} {'fit s':>7} {'speed-up':>8} {'max |diff|':>11} {'max rel':>9} {'update rel':>10}"]
    for r in rows:
        lines.append(f"{r['processes']:>9} {r['fit_s']:>7.1f} {r['speedup']:>7.2f}x {r['max_abs']:>11.2e} "
                     f"{r['max_rel_tensor']:>9.2e} {r['update_rel']:>10.2e}")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_distributed.txt").write_text(text + "\n")
    (RESULTS / "bench_distributed.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
