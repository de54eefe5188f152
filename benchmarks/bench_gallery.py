"""Benchmark: exact proximity search over galleries in memory and in gallery files, side by side with faiss.

One run, one table: faiss-cpu IndexFlatIP (the anchor) and fastforget.kernels.proximity_topk on the
same 1,000,000 x 512 random unit gallery (float32 in memory), and proximity_topk over the same rows
saved as int8 and float16 gallery files (`ff.gallery.save(..., dtype=...)`, `ff.gallery.open`), each
file searched in a fresh process whose peak resident memory is measured. 1,000 queries, k = 10.
Indices are checked against faiss (in-memory rows) and against a float64 search of the rows each
method searched (file rows are quantised, so their exact answer is their own). The CPU model and flags,
the candidate format chosen at run time (per stored row type: a file's format is the one its search
process chose) and the thread count are recorded.

    python benchmarks/bench_gallery.py [--n 1000000] [--q 1000] [--k 10] [--threads auto|1|2]
                                       [--big-rows 10000000 --big-q 100]   # an extra, larger-than-RAM-style file row

Threads: "auto" uses 2 for both sides only when the machine is otherwise quiet (1-minute load average
below 0.5), else 1 for both; the table says which. Results: benchmarks/results/bench_gallery.{txt,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_kernels import exact_f64, timed, unit_rows  # noqa: E402  (same folder)


def cpu_info() -> dict:
    from fastforget.kernels import proximity

    model, flags = platform.processor(), []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                                     "amx_tile", "amx_bf16", "amx_int8") if f in have]
                break
    except OSError:
        pass
    return {"model": model, "flags": flags, "cores": os.cpu_count(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "candidate_format": proximity.cpu_candidate_format(), "torch": torch.__version__}


def choose_threads(arg: str) -> tuple[int, str]:
    if arg != "auto":
        return int(arg), "as asked"
    load = os.getloadavg()[0]
    if load < 0.5 and (os.cpu_count() or 1) >= 2:
        return 2, f"machine quiet (load {load:.2f})"
    return 1, f"machine busy (1-min load {load:.2f}): 1 thread for both sides"


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS) or its peak (VmHWM), MB. Not ru_maxrss: a child inherits its parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_search(path, queries_npy, k, threads, out_json):
    """Fresh process: open the file, search it, report time, CPU time and memory."""
    import fastforget as ff

    torch.set_num_threads(threads)
    q = torch.from_numpy(np.load(queries_npy))
    g = ff.gallery.open(path)
    ff.kernels.proximity_topk(q[:2], g, k)  # warm: imports, oneDNN kernels, the format choice (not the whole file)
    from fastforget.kernels import proximity

    fmt = proximity.cpu_candidate_format({"int8": "int8", "float16": "float16"}.get(g.dtype, "float32"))
    base = rss_mb()
    wall, cpu, (_, idx) = timed(lambda: ff.kernels.proximity_topk(q, g, k))
    peak = rss_mb("VmHWM")
    np.save(out_json + ".idx.npy", idx.numpy())
    json.dump({"wall": wall, "cpu": cpu, "rss_before_mb": base, "peak_rss_mb": peak, "format": fmt},
              open(out_json, "w"))


def run_child(path, queries, k, threads, tmp):
    qn, out = os.path.join(tmp, "q.npy"), os.path.join(tmp, "child.json")
    np.save(qn, queries.numpy())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, __file__, "--child", str(path), qn, str(k), str(threads), out], check=True, env=env)
    res = json.load(open(out))
    res["idx"] = torch.from_numpy(np.load(out + ".idx.npy"))
    return res


def exact_file(queries, g, k, chunk=1 << 16):
    """float64 search over a gallery file's stored values (cosine), ties to the lower index."""
    import torch.nn.functional as F

    q = F.normalize(queries.double(), dim=1)
    best_s = torch.empty(len(q), 0, dtype=torch.float64)
    best_j = torch.empty(len(q), 0, dtype=torch.int64)
    for s in range(0, g.shape[0], chunk):
        e = min(s + chunk, g.shape[0])
        rows, scale = g.read_rows(s, e)
        v = rows.double() * (scale.double()[:, None] if scale is not None else 1.0)
        sc = q @ F.normalize(v, dim=1).T
        sc, order = torch.cat([best_s, sc], 1).sort(dim=1, descending=True, stable=True)
        j = torch.arange(s, e)
        best_s, best_j = sc[:, :k], torch.cat([best_j, j.expand(len(q), -1)], 1).gather(1, order[:, :k])
    return best_j


def write_random_file(path, n, d, seed, dtype):
    import fastforget as ff

    gen = torch.Generator().manual_seed(seed)
    chunks = (unit_rows(min(1 << 16, n - s), d, gen) for s in range(0, n, 1 << 16))
    return ff.gallery.save(path, chunks, dtype=dtype, overwrite=True, progress=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--q", type=int, default=1000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", default="auto")
    p.add_argument("--check", type=int, default=64, help="queries checked against a float64 search")
    p.add_argument("--big-rows", type=int, default=0, help="also search an int8 file of this many rows")
    p.add_argument("--big-q", type=int, default=100)
    p.add_argument("--dir", default=None, help="where the gallery files go (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "bench_gallery"))
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        path, qn, k, threads, out = args.child
        return child_search(path, qn, int(k), int(threads), out)

    import faiss

    import fastforget as ff
    from fastforget.kernels import proximity

    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    info = cpu_info()
    gen = torch.Generator().manual_seed(args.seed)
    gallery = unit_rows(args.n, args.d, gen)
    queries = unit_rows(args.q, args.d, gen)
    lines = [f"CPU: {info['model']}, {info['cores']} cores; flags {' '.join(info['flags'])}; torch {info['torch']} "
             f"({info['torch_capability']}); candidate format chosen at run time for float32 rows: {info['candidate_format']}",
             f"gallery {args.n:,} x {args.d} random unit rows, {args.q:,} queries, k = {args.k}, {threads} thread(s) "
             f"for every method ({why}); load average at start {os.getloadavg()[0]:.2f}"]
    print("\n".join(lines), flush=True)

    rows = {}  # name -> dict(wall, cpu, idx, memory, exact)
    index = faiss.IndexFlatIP(args.d)
    index.add(gallery.numpy())
    index.search(queries[:32].numpy(), args.k)  # warm both sides (thread pools, BLAS / oneDNN kernels)
    ff.kernels.proximity_topk(queries[:32], gallery[:20000], args.k)
    wall, cpu, idx = timed(lambda: torch.from_numpy(index.search(queries.numpy(), args.k)[1]))
    rows["faiss-cpu IndexFlatIP (float32 in RAM)"] = dict(wall=wall, cpu=cpu, idx=idx,
                                                           memory=f"{args.n * args.d * 4 / 2**20:.0f} MB in RAM")
    del index
    wall, cpu, idx = timed(lambda: ff.kernels.proximity_topk(queries, gallery, args.k)[1])
    rows[f"proximity_topk (float32 in RAM, {info['candidate_format']})"] = dict(
        wall=wall, cpu=cpu, idx=idx, memory=f"{args.n * args.d * 4 / 2**20:.0f} MB in RAM")
    check = torch.arange(min(args.q, args.check))
    disagree = (rows[next(iter(rows))]["idx"] != idx).any(1).nonzero()[:, 0][:256]
    check_ram = torch.unique(torch.cat([check, disagree]))
    exact = exact_f64(queries[check_ram], gallery, args.k)
    for r in rows.values():
        r["exact"] = f"{int((r['idx'][check_ram] == exact).all(1).sum())}/{len(check_ram)}"

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dtype in ("int8", "float16"):
            path = Path(tmp) / f"gallery_{dtype}.ffg"
            t0 = time.perf_counter()
            ff.gallery.save(path, gallery, dtype=dtype)
            t_write = time.perf_counter() - t0
            res = run_child(path, queries, args.k, threads, tmp)
            g = ff.gallery.open(path)
            ex = exact_file(queries[check], g, args.k)
            size = path.stat().st_size / 2**20
            rows[f"proximity_topk ({dtype} file, {res['format']})"] = dict(
                wall=res["wall"], cpu=res["cpu"], idx=res["idx"], file_mb=size, write_s=t_write,
                rss_before_mb=res["rss_before_mb"], peak_rss_mb=res["peak_rss_mb"],
                memory=f"file {size:.0f} MB; RSS {res['rss_before_mb']:.0f} -> {res['peak_rss_mb']:.0f} MB",
                exact=f"{int((res['idx'][check] == ex).all(1).sum())}/{len(check)} own")
            g.close()
            path.unlink()
        if args.big_rows:
            path = Path(tmp) / "big_int8.ffg"
            t0 = time.perf_counter()
            write_random_file(path, args.big_rows, args.d, args.seed + 1, "int8")
            t_write = time.perf_counter() - t0
            bq = queries[:args.big_q]
            res = run_child(path, bq, args.k, threads, tmp)
            g = ff.gallery.open(path)
            nchk = min(8, args.big_q)
            ex = exact_file(bq[:nchk], g, args.k, chunk=1 << 15)
            size = path.stat().st_size / 2**20
            rows[f"proximity_topk (int8 file {args.big_rows / 1e6:g}M rows, {args.big_q} q, {res['format']})"] = dict(
                wall=res["wall"], cpu=res["cpu"], idx=None, file_mb=size, write_s=t_write,
                rss_before_mb=res["rss_before_mb"], peak_rss_mb=res["peak_rss_mb"],
                memory=f"file {size:.0f} MB; RSS {res['rss_before_mb']:.0f} -> {res['peak_rss_mb']:.0f} MB",
                exact=f"{int((res['idx'][:nchk] == ex).all(1).sum())}/{nchk} own")
            g.close()

    base = rows["faiss-cpu IndexFlatIP (float32 in RAM)"]
    head = (f"{'method':56} {'time s':>7} {'cpu s':>7} {'vs faiss':>8} {'cpu vs faiss':>12} {'== faiss':>10} "
            f"{'== exact f64':>13}  memory")
    table = [head, "-" * (len(head) + 40)]
    for name, r in rows.items():
        same = "n/a" if r["idx"] is None or "file" in name else \
            "yes" if torch.equal(r["idx"], base["idx"]) else f"{int((r['idx'] != base['idx']).any(1).sum())} q differ"
        if "M rows" in name:
            ratio, cpu_ratio = "n/a", "n/a"
        else:
            ratio, cpu_ratio = f"{base['wall'] / r['wall']:.2f}x", f"{base['cpu'] / r['cpu']:.2f}x"
        table.append(f"{name:56} {r['wall']:7.2f} {r['cpu']:7.2f} {ratio:>8} {cpu_ratio:>12} {same:>10} "
                     f"{r['exact']:>13}  {r['memory']}")
    notes = [f"load average at the end {os.getloadavg()[0]:.2f}. "
             f"vs faiss: faiss time / method time (wall; cpu = CPU seconds of the process, fairer on shared cores). "
             f"== exact f64: queries whose indices equal a float64 search of the rows that method searched, "
             f"{len(check_ram)} checked for in-RAM rows ({len(check)} sampled + every query where faiss differs); "
             f"file rows are quantised, so their reference is a float64 search of the file's own values. "
             f"Files are searched in a fresh process: RSS after warm-up -> peak."]
    print("\n".join(table + notes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(lines + table + notes) + "\n")
    json.dump({"cpu": info, "threads": threads, "threads_why": why, "n": args.n, "q": args.q, "d": args.d, "k": args.k,
               "rows": {n: {k: v for k, v in r.items() if k != "idx"} for n, r in rows.items()}},
              open(out.with_suffix(".json"), "w"), indent=2)


if __name__ == "__main__":
    main()
