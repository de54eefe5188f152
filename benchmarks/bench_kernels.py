"""Benchmark fastforget.kernels.

CPU: proximity_topk against faiss-cpu IndexFlatIP and plain torch matmul + topk on random unit
vectors (default 1,000,000 x 512 gallery, 1,000 queries, k = 10), all in one run, one table.
GPU (only where CUDA is present): masked cross-attention forward + backward against torch SDPA at
SD-1.5 shapes, and proximity_topk against faiss-gpu when installed.

    python benchmarks/bench_kernels.py [--n 1000000] [--q 1000] [--d 512] [--k 10] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch

import fastforget.kernels as K
from fastforget.kernels import proximity


def timed(fn):
    """(wall seconds, CPU seconds of all threads, result). On shared cores CPU seconds show the work done."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def unit_rows(n, d, gen, chunk=1 << 17):
    out = torch.empty(n, d)
    for s in range(0, n, chunk):  # chunked so generating 1M x 512 stays within memory
        x = torch.randn(min(chunk, n - s), d, generator=gen)
        out[s:s + len(x)] = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return out


def exact_f64(queries, gallery, k, chunk=1 << 16):
    """Float64 GEMM search, ties to the lower index (random data has no ties at float64 precision)."""
    q = queries.double()
    best_s = torch.empty(len(q), 0, dtype=torch.float64)
    best_j = torch.empty(len(q), 0, dtype=torch.int64)
    for s in range(0, len(gallery), chunk):
        j = torch.arange(s, min(s + chunk, len(gallery)))
        sc, order = torch.cat([best_s, q @ gallery[s:s + chunk].double().T], 1).sort(dim=1, descending=True,
                                                                                      stable=True)
        best_s, best_j = sc[:, :k], torch.cat([best_j, j.expand(len(q), -1)], 1).gather(1, order[:, :k])
    return best_j


def cpu_section(args):
    try:
        import faiss
    except ImportError:
        faiss = None
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    gallery = unit_rows(args.n, args.d, gen)
    queries = unit_rows(args.q, args.d, gen)
    fmt = proximity.cpu_candidate_format()
    print(f"CPU: gallery {args.n} x {args.d}, {args.q} queries, k = {args.k}, {args.threads} threads, "
          f"auto candidate format here: {fmt}")

    results = {}  # method -> (wall seconds, cpu seconds, indices)
    if faiss is not None:
        index = faiss.IndexFlatIP(args.d)
        index.add(gallery.numpy())
        results["faiss-cpu IndexFlatIP"] = timed(lambda: torch.from_numpy(index.search(queries.numpy(), args.k)[1]))
        del index
    results["torch matmul + topk"] = timed(lambda: (queries @ gallery.T).topk(args.k, dim=1).indices)
    results[f"proximity_topk (auto: {fmt})"] = timed(lambda: K.proximity_topk(queries, gallery, args.k)[1])
    for other in ("fp32", "int8", "bf16"):
        if other != fmt and other in args.formats:
            results[f"proximity_topk ({other} candidates)"] = timed(
                lambda: proximity.proximity_topk_torch(queries, gallery, args.k, True, None, candidates=other)[1])

    # exact float64 answers for a sample of queries plus every query where some method disagrees
    first = next(iter(results.values()))[2]
    disagree = torch.zeros(args.q, dtype=torch.bool)
    for _, _, idx in results.values():
        disagree |= (idx != first).any(1)
    check = torch.unique(torch.cat([torch.arange(min(args.q, args.check)), disagree.nonzero()[:, 0][:256]]))
    exact = exact_f64(queries[check], gallery, args.k)

    base = results.get("faiss-cpu IndexFlatIP")
    head = (f"{'method':34} {'time s':>8} {'cpu s':>8} {'queries/s':>10} {'vs faiss':>9} {'cpu vs faiss':>13} "
            f"{'== faiss':>11} {'== exact f64':>13}")
    print(head)
    print("-" * len(head))
    for name, (sec, cpu, idx) in results.items():
        same_faiss = "n/a" if base is None else \
            "yes" if torch.equal(idx, base[2]) else f"{int((idx != base[2]).any(1).sum())} q differ"
        same_exact = f"{int((idx[check] == exact).all(1).sum())}/{len(check)}"
        ratio = f"{base[0] / sec:.2f}x" if base else "n/a"
        cpu_ratio = f"{base[1] / cpu:.2f}x" if base else "n/a"
        print(f"{name:34} {sec:8.2f} {cpu:8.2f} {args.q / sec:10.0f} {ratio:>9} {cpu_ratio:>13} {same_faiss:>11} "
              f"{same_exact:>13}")
    print(f"(vs faiss: faiss time / method time. == exact f64: queries whose indices equal a float64 search, "
          f"out of {len(check)}: {min(args.q, args.check)} sampled plus every query where the methods disagree)")


def gpu_section(args):
    if not torch.cuda.is_available():
        print("GPU: skipped: no CUDA device")
        return
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(dev)}")

    def cuda_time(fn, repeat=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat / 1e3

    # SD-1.5 attn2 at 512 px with classifier-free guidance: batch 2, 8 heads, 77 text tokens
    head = (f"{'attn2 shape (B,H,Lq,Lk,D) fp16':34} {'triton ms':>10} {'sdpa ms':>9} {'speedup':>8} {'GB/s':>7} "
            f"{'TFLOP/s':>8}")
    print(head)
    print("-" * len(head))
    for lq, d in ((4096, 40), (1024, 80), (256, 160), (64, 160)):
        B, H, lk = 2, 8, 77
        q = torch.randn(B, H, lq, d, device=dev, dtype=torch.float16, requires_grad=True)
        k = torch.randn(B, H, lk, d, device=dev, dtype=torch.float16, requires_grad=True)
        v = torch.randn(B, H, lk, d, device=dev, dtype=torch.float16, requires_grad=True)
        mask = torch.ones(B, lk, dtype=torch.bool, device=dev)
        do = torch.randn(B, H, lq, d, device=dev, dtype=torch.float16)

        def run(backend):
            def step():
                out = K.masked_cross_attention(q, k, v, mask, backend=backend)
                torch.autograd.grad(out, (q, k, v), do)
            return step

        t_triton, t_sdpa = cuda_time(run("triton")), cuda_time(run("torch"))
        # 2-byte accesses: q, o (fwd) and q, o, dO, dQ (bwd) per query row; k, v (fwd) and k, v, dK, dV per key
        bytes_moved = 2 * 6 * B * H * d * (lq + lk)
        flops = 14 * B * H * lq * lk * d  # fwd: 2 matmuls, bwd: 5 (S recomputed, dV, dP, dQ, dK), 2 flops a MAC
        print(f"{str((B, H, lq, lk, d)):34} {t_triton * 1e3:10.3f} {t_sdpa * 1e3:9.3f} "
              f"{t_sdpa / t_triton:7.2f}x {bytes_moved / t_triton / 1e9:7.0f} {flops / t_triton / 1e12:8.1f}")

    gen = torch.Generator().manual_seed(args.seed)
    gallery = unit_rows(args.n, args.d, gen).to(dev)
    queries = unit_rows(args.q, args.d, gen).to(dev)
    t_ours = cuda_time(lambda: K.proximity_topk(queries, gallery, args.k), repeat=3)
    line = f"proximity_topk {args.n} x {args.d}, {args.q} q: {t_ours * 1e3:.1f} ms, " \
           f"{args.n * args.d * 4 / t_ours / 1e9:.0f} GB/s gallery read"
    try:
        import faiss

        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, args.d)
        index.add(gallery.cpu().numpy())
        t_faiss = cuda_time(lambda: index.search(queries.cpu().numpy(), args.k), repeat=3)
        line += f"; faiss-gpu {t_faiss * 1e3:.1f} ms ({t_faiss / t_ours:.2f}x)"
    except (ImportError, AttributeError):
        line += "; faiss-gpu not installed"
    print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="gallery rows")
    p.add_argument("--q", type=int, default=1000, help="queries")
    p.add_argument("--d", type=int, default=512, help="embedding size")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--check", type=int, default=64, help="queries checked against exact float64 search")
    p.add_argument("--formats", default="fp32", help="extra candidate formats to time, e.g. fp32,int8,bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-cpu", action="store_true")
    args = p.parse_args()
    if not args.skip_cpu:
        cpu_section(args)
    gpu_section(args)


if __name__ == "__main__":
    main()
