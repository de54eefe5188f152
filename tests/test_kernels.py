"""fastforget.kernels against float64 torch references.

Triton kernels run on CPU under TRITON_INTERPRET=1 (exported by CI; set here if the variable is
absent and nothing imported triton yet). Tolerances follow flash-attention's rule, judged against
what torch achieves at the same dtype: |out - ref64| <= 2 |torch_same_dtype - ref64| + atol, with
atol a few ulps of the dtype at the largest |ref64| (ATOL_ULPS).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastforget.kernels as K  # noqa: E402
from fastforget.kernels import cross_attention as CA  # noqa: E402
from fastforget.kernels import dispatch  # noqa: E402
from fastforget.kernels import proximity as P  # noqa: E402

TRITON_RUNS = dispatch.HAS_TRITON and (torch.cuda.is_available() or dispatch.triton_interpreted())
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS,
    reason="triton is not importable, or there is no CUDA device and TRITON_INTERPRET=1 was not set "
    "before fastforget.kernels was first imported",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32: sums over D and Lk cost a few ulps whichever way they are ordered (measured <= 3.6);
# bf16: the interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest (measured <= 0.8)
ATOL_ULPS = {torch.float32: 8, torch.float16: 1, torch.bfloat16: 2}


def nan_empty(shape, dtype, device):
    """Stand-in for torch.empty that poisons memory, so any element a kernel fails to write shows."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 7_777_777, dtype=dtype, device=device)


def assert_as_good_as_torch(out, ref64, torch_out, name):
    """|out - ref64| <= 2 |torch_out - ref64| + ATOL_ULPS ulps at the largest |ref64|; names the worst element."""
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = (out.double() - ref64).abs()
    atol = ATOL_ULPS[out.dtype] * torch.finfo(out.dtype).eps * ref64.abs().max().item()
    allowed = 2 * (torch_out.double() - ref64).abs() + atol
    bad = err > allowed
    if bad.any():
        worst = (err - allowed).argmax()
        i = np.unravel_index(worst.item(), err.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements beyond tolerance; worst at {i}: "
            f"out {out[i].item():.6g} ref64 {ref64[i].item():.6g} torch {torch_out[i].item():.6g} "
            f"allowed {allowed[i].item():.3g}")


# ---------------------------------------------------------------------------------------------
# masked_cross_attention
# ---------------------------------------------------------------------------------------------
def attention_inputs(B, H, Lq, Lk, D, dtype, mask, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # the diffusers layout: (B, L, H*D) viewed and transposed, not contiguous
        q = torch.randn(B, Lq, H, D, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(B, H, Lq, D, generator=gen)
    k = torch.randn(B, H, Lk, D, generator=gen)
    v = torch.randn(B, H, Lk, D, generator=gen)
    do = torch.randn(B, H, Lq, D, generator=gen)
    key_mask = None
    if mask:
        key_mask = torch.rand(B, Lk, generator=gen) > 0.4
        key_mask[1] = False  # a batch element with no key to attend
    to = dict(dtype=dtype, device=DEVICE)
    return q.to(**to), k.to(**to), v.to(**to), do.to(**to), None if key_mask is None else key_mask.to(DEVICE)


def reference_and_grads(fn, q, k, v, do, key_mask, dtype):
    """fn(q, k, v, key_mask) at `dtype` with autograd: (out, dq, dk, dv)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, key_mask)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return out.detach(), dq, dk, dv


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [40, 80, 160])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_triton_cross_attention_matches_float64(dtype, D, mask):
    # odd shapes: Lq = 37 is not a multiple of the query tile, B*H = 6, Lk = 77, D padded to 64/128/256
    B, H, Lq, Lk = 2, 3, 37, 77
    q, k, v, do, key_mask = attention_inputs(B, H, Lq, Lk, D, dtype, mask, transposed=D == 80)
    scale = D ** -0.5
    o, lse = CA.cross_attention_fwd_triton(q, k, v, key_mask, scale, empty=nan_empty)
    dq, dk, dv = CA.cross_attention_bwd_triton(do, q, k, v, key_mask, o, lse, scale, n_split=2, empty=nan_empty)

    ref = reference_and_grads(lambda *a: CA.cross_attention_reference(*a, scale=scale), q, k, v, do, key_mask,
                              torch.float64)
    same_dtype = reference_and_grads(lambda *a: CA.cross_attention_torch(*a, scale), q, k, v, do, key_mask, dtype)
    for name, ours, r, t in zip(("out", "dq", "dk", "dv"), (o, dq, dk, dv), ref, same_dtype):
        assert ours.dtype == dtype and ours.shape == r.shape
        assert_as_good_as_torch(ours, r, t, f"{name} {dtype} D={D}")


@needs_triton
def test_triton_autograd_function_is_wired_to_the_kernels():
    q, k, v, do, key_mask = attention_inputs(3, 1, 50, 20, 64, torch.float32, True, seed=1)
    ours = reference_and_grads(lambda *a: K.masked_cross_attention(*a, backend="triton"), q, k, v, do, key_mask,
                               torch.float32)
    ref = reference_and_grads(CA.cross_attention_reference, q, k, v, do, key_mask, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_fully_masked_batch_element_gives_zeros_and_zero_grads(backend):
    q, k, v, do, key_mask = attention_inputs(2, 2, 19, 77, 40, torch.float32, True, seed=2)
    out, dq, dk, dv = reference_and_grads(lambda *a: K.masked_cross_attention(*a, backend=backend), q, k, v, do,
                                          key_mask, torch.float32)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    for t in (out, dq, dk, dv):
        assert t[1].abs().max() == 0  # key_mask[1] hides every key
    assert out[0].abs().max() > 0 and dq[0].abs().max() > 0


def test_torch_backend_matches_float64():
    q, k, v, do, key_mask = attention_inputs(2, 3, 37, 77, 80, torch.float32, True, seed=3)
    ours = reference_and_grads(lambda *a: K.masked_cross_attention(*a, backend="torch"), q, k, v, do, key_mask,
                               torch.float32)
    ref = reference_and_grads(CA.cross_attention_reference, q, k, v, do, key_mask, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


def test_masked_keys_do_not_change_the_output():
    q, k, v, _, key_mask = attention_inputs(2, 2, 9, 77, 40, torch.float32, True, seed=4)
    k2, v2 = k.clone(), v.clone()
    hidden = ~key_mask[:, None, :, None].expand_as(k)
    k2[hidden], v2[hidden] = 1e3, -1e3
    torch.testing.assert_close(K.masked_cross_attention(q, k2, v2, key_mask),
                               K.masked_cross_attention(q, k, v, key_mask))


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(2, 3, 4)), "q must be a 4-D"),
    (dict(k=torch.zeros(2, 2, 5, 9)), "k must have shape"),
    (dict(v=torch.zeros(2, 2, 6, 8)), "v must have the shape of k"),
    (dict(key_mask=torch.ones(2, 5)), "key_mask must be a bool"),
    (dict(key_mask=torch.ones(3, 5, dtype=torch.bool)), "key_mask must be a bool"),
])
def test_cross_attention_rejects_bad_inputs(bad, match):
    args = dict(q=torch.zeros(2, 2, 4, 8), k=torch.zeros(2, 2, 5, 8), v=torch.zeros(2, 2, 5, 8), key_mask=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        K.masked_cross_attention(**args)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def _select(backend=None, lk=77, d=40, device="cpu"):
    return dispatch.select("masked_cross_attention", torch.device(device), torch.float32, backend, lk=lk, d=d).name


def test_auto_picks_torch_without_cuda_and_triton_with_it(monkeypatch):
    monkeypatch.delenv("FASTFORGET_KERNELS", raising=False)
    assert _select() == "torch"  # CPU tensors: the interpreter is for tests, never chosen by auto
    if dispatch.HAS_TRITON:
        assert _select(device="cuda") == "triton"
        assert _select(device="cuda", lk=300) == "torch"  # does not fit one key tile: quiet fallback


def test_environment_variable_and_use_backend(monkeypatch):
    monkeypatch.setenv("FASTFORGET_KERNELS", "torch")
    assert dispatch.current_choice() == "torch"
    with K.use_backend("auto"):
        assert dispatch.current_choice() == "auto"
        with K.use_backend("triton"):
            assert dispatch.current_choice() == "triton"
        assert dispatch.current_choice() == "auto"
    assert dispatch.current_choice() == "torch"
    monkeypatch.setenv("FASTFORGET_KERNELS", "cuda-please")
    with pytest.raises(K.KernelBackendError, match="FASTFORGET_KERNELS"):
        dispatch.current_choice()
    with pytest.raises(K.KernelBackendError, match="use_backend"):
        with K.use_backend("fast"):
            pass


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    if dispatch.HAS_TRITON:
        with pytest.raises(K.KernelBackendError, match="key length 300"):
            _select("triton", lk=300, device="cuda")
        with pytest.raises(K.KernelBackendError, match="head dim 512"):
            _select("triton", d=512, device="cuda")
        monkeypatch.setattr(dispatch, "_INTERPRET_AT_IMPORT", False)  # no interpreter: CPU is out
        with pytest.raises(K.KernelBackendError, match="cpu"):
            _select("triton")
    else:
        with pytest.raises(K.KernelBackendError, match="triton is not installed"):
            _select("triton")
    q = torch.zeros(1, 1, 3, 8)
    with K.use_backend("torch"), pytest.raises(K.KernelBackendError, match="dtypes"):
        K.masked_cross_attention(q.double(), q.double(), q.double())


def test_available_backends_lists_both_ops():
    avail = K.available_backends()
    assert set(avail) == {"masked_cross_attention", "proximity_topk"}
    for names in avail.values():
        assert "torch" in names
        assert ("triton" in names) == TRITON_RUNS


# ---------------------------------------------------------------------------------------------
# diffusers processor
# ---------------------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402


def tiny_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), cross_attention_dim=32, layers_per_block=1, attention_head_dim=8,
        sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
    ).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def unet_outputs(unet):
    gen = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=gen)
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0
    with torch.no_grad():
        return unet(x, t, text).sample, unet(x, t, text, encoder_attention_mask=mask).sample


def test_processor_on_torch_backend_equals_attnprocessor2_0():
    unet = tiny_unet()
    expected = unet_outputs(unet)
    n_attn2 = sum(name.endswith("attn2") for name, _ in unet.named_modules())
    assert K.set_fused_cross_attention(unet) == n_attn2 == 4
    assert all(isinstance(p, K.FusedCrossAttnProcessor) for n, p in unet.attn_processors.items() if "attn2" in n)
    assert not any(isinstance(p, K.FusedCrossAttnProcessor) for n, p in unet.attn_processors.items() if "attn1" in n)
    with K.use_backend("torch"):
        got = unet_outputs(unet)
    assert not torch.equal(expected[0], expected[1])  # the mask matters, so comparing masked runs means something
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


@needs_triton
def test_processor_on_triton_backend_matches_attnprocessor2_0():
    unet = tiny_unet()
    expected = unet_outputs(unet)
    K.set_fused_cross_attention(unet)
    with K.use_backend("triton"):
        got = unet_outputs(unet)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_kind", [None, "bool", "bias", "soft"])
def test_processor_handles_4d_states_residual_rescale_norm_cross(mask_kind):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, residual_connection=True,
                     rescale_output_factor=2.0, cross_attention_norm="layer_norm").eval()
    hidden, text = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    visible = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    mask = {None: None, "bool": visible[:, None, :], "bias": (~visible[:, None, :]).float() * -10000.0,
            "soft": torch.randn(2, 1, 5)}[mask_kind]
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(hidden, encoder_hidden_states=text, attention_mask=mask)
        attn.set_processor(K.FusedCrossAttnProcessor())
        got = attn(hidden, encoder_hidden_states=text, attention_mask=mask)
    assert got.shape == hidden.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_key_mask_from_attention_mask():
    from fastforget.kernels.processor import key_mask_from_attention_mask as convert

    visible = torch.tensor([[True, False, True], [False, False, True]])
    bias = (~visible).float() * -10000.0
    assert torch.equal(convert(visible[:, None, None, :].expand(2, 4, 1, 3)), visible)
    assert torch.equal(convert(bias[:, None, None, :].expand(2, 4, 6, 3)), visible)
    assert torch.equal(convert(torch.full((2, 1, 1, 3), -10000.0)), torch.ones(2, 3, dtype=torch.bool))
    assert convert(torch.tensor([0.0, -1.0, 0.0]).expand(2, 1, 1, 3)) is None  # soft bias
    per_head = torch.stack([bias, torch.zeros_like(bias)], 1)[:, :, None, :]
    assert convert(per_head) is None


# ---------------------------------------------------------------------------------------------
# proximity_topk
# ---------------------------------------------------------------------------------------------
def exact_search(queries, gallery, k, normalize=True, exclude=None):
    """Independent float64 reference: every score per pair, stable sort (ties to the lower index)."""
    q, g = torch.as_tensor(queries).double(), torch.as_tensor(gallery).double()
    if normalize:
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    s = (q[:, None, :] * g[None, :, :]).sum(-1)  # per pair, so equal rows give bit-equal scores
    if exclude is not None:
        rows = (exclude >= 0).nonzero()[:, 0]
        s[rows, exclude[rows]] = float("-inf")
    v, i = s.sort(dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


def gallery_with_ties(n, d, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, d, generator=gen)
    g[10:40] = g[3]  # 31 equal rows: ties straddle any small k for queries near g[3]
    g[50:60] = 3.0 * g[7]  # equal after normalisation only
    g[77] = 0.0  # a zero row scores 0
    q = torch.randn(23, d, generator=gen)
    q[0] = g[3]
    q[1] = g[3] + 1e-3 * torch.randn(d, generator=gen)
    q[2] = g[7]
    q[3] = -g[3]
    return q.to(dtype), g.to(dtype)


def exclude_own_best(queries, gallery):
    """Exclude each even query's exact best row, so skipping it changes the answer; -1 for odd ones."""
    best = exact_search(queries, gallery, 1)[1][:, 0]
    return torch.where(torch.arange(len(queries)) % 2 == 0, best, -1)


def assert_same_as_exact(result, queries, gallery, k, **kw):
    scores, idx = result
    ref_s, ref_i = exact_search(queries, gallery, k, **kw)
    assert idx.dtype == torch.int64 and idx.shape == (len(queries), k)
    assert torch.equal(idx.cpu(), ref_i), f"{int((idx.cpu() != ref_i).any(1).sum())} queries differ"
    torch.testing.assert_close(scores.cpu().double(), ref_s, rtol=1e-6, atol=1e-7)


def assert_public_result_same_as_exact(result, queries, gallery, k, **kw):
    assert result[0].dtype == torch.float32  # the public contract; internals keep float64
    assert_same_as_exact(result, queries, gallery, k, **kw)


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("k", [1, 10, 45])
def test_cpu_candidate_formats_return_exact_indices(fmt, k):
    q, g = gallery_with_ties(2500, 64, seed=k)  # 3 tiles of 1024, the last one ragged
    exclude = exclude_own_best(q, g)
    exclude[1], exclude[3] = 3, 2499  # a tied row, and a row in the ragged last tile
    for excl in (None, exclude):
        assert_same_as_exact(P.proximity_topk_torch(q, g, k, True, excl, candidates=fmt), q, g, k, exclude=excl)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_near_ties_beyond_the_coarse_format_are_ordered_exactly(fmt):
    # 300 rows closer to each other than bf16 / int8 can resolve: the float64 re-rank orders them
    gen = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(1, 96, generator=gen), dim=1)
    g = torch.cat([torch.randn(700, 96, generator=gen), base + 1e-5 * torch.randn(300, 96, generator=gen)])
    g = g[torch.randperm(len(g), generator=gen)]
    q = base + 1e-4 * torch.randn(6, 96, generator=gen)
    assert_same_as_exact(P.proximity_topk_torch(q, g, 20, True, None, candidates=fmt), q, g, 20)


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("kind", ["gaussian", "sparse", "large"])
def test_error_bounds_hold(fmt, kind):
    """The approximate score of every pair is within the stated eps of the exact float64 score."""
    gen = torch.Generator().manual_seed(6)
    d = 200
    g, q = torch.randn(1024, d, generator=gen), torch.randn(40, d, generator=gen)
    if kind == "sparse":  # one dominant coordinate: int8's per-tile scale is coarse for the rest
        g[:, 0] *= 50
        q[:, 0] *= 50
    if kind == "large":
        g, q = g * 1e4, q * 1e-3
    for normalize in (True, False):
        q64 = P._queries64(q, normalize)
        block = P._QueryBlock(q64, torch.arange(len(q)), fmt, 5)
        if fmt == "bf16":  # scores s_j X, bound U_OUT |s_j X| + E (relative output rounding)
            tile = P._Bf16Tile(g, None, normalize, d)
            X, E = tile.approx(block, d)
            approx = X.to(torch.float64) * tile.sx.double()
            eps = P.U_OUT * approx.abs() + E[:, None]
        else:
            tile = P._Tile(g, fmt, normalize, d)
            X, a, eps = tile.approx(block, fmt, d)
            approx = a[:, None] * X.to(torch.float64)
            eps = eps[:, None].expand_as(approx)
        g64 = F.normalize(g.double(), dim=1) if normalize else g.double()
        err = (approx - q64 @ g64.T).abs()
        assert (err <= eps).all(), f"bound violated by {float((err - eps).max()):.3g}"
        assert err.max() > eps.min() / 1000  # the bound is not vacuous-by-accident: errors exist


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_bf16_bound_holds_for_int8_and_float16_rows_with_scales(kind):
    """The bf16 pass over rows as a gallery file stores them (int8 + per-row scale, float16)."""
    gen = torch.Generator().manual_seed(7)
    d = 256
    g, q = torch.randn(2048, d, generator=gen), torch.randn(40, d, generator=gen)
    if kind == "sparse":
        g[:, 0] *= 50
        q[:, 0] *= 50
    scale = (g.abs().amax(1) / 127).float()
    stored = {"int8": (torch.round(g / scale[:, None]).to(torch.int8), scale), "float16": (g.half(), None)}
    for rows, sc in stored.values():
        vals = rows.double() * (sc.double()[:, None] if sc is not None else 1.0)
        for normalize in (True, False):
            q64 = P._queries64(q, normalize)
            block = P._QueryBlock(q64, torch.arange(len(q)), "bf16", 5)
            tile = P._Bf16Tile(rows, sc, normalize, d)
            X, E = tile.approx(block, d)
            approx = X.to(torch.float64) * tile.sx.double()
            ref = q64 @ (F.normalize(vals, dim=1) if normalize else vals).T
            assert ((approx - ref).abs() <= P.U_OUT * approx.abs() + E[:, None]).all()
            # the group-maxima hit finder returns exactly the pairs at or above a threshold
            thr = X.float().quantile(0.99, dim=1).to(torch.bfloat16)
            thr[::3] = -thr[::3]  # thresholds <= 0 too
            rows_, cols_ = P._bf16_hits(X, thr)
            want = (X >= thr[:, None]).nonzero(as_tuple=True)
            assert sorted(zip(rows_.tolist(), cols_.tolist())) == list(zip(*(t.tolist() for t in want)))


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(n=st.integers(1, 90), d=st.integers(1, 12), n_q=st.integers(1, 6), k_frac=st.floats(0, 1),
                  dup=st.booleans(), fmt=st.sampled_from(["int8", "bf16", "fp32"]), use_exclude=st.booleans(),
                  seed=st.integers(0, 2 ** 16))
def test_small_shapes_match_exact_search(n, d, n_q, k_frac, dup, fmt, use_exclude, seed):
    # k up to N (or N - 1 with exclude) and tiles smaller than k: the threshold starts at -inf
    gen = torch.Generator().manual_seed(seed)
    g, q = torch.randn(n, d, generator=gen), torch.randn(n_q, d, generator=gen)
    if dup:
        g[::3] = g[0].clone()
        q[0] = g[0]
    exclude = torch.randint(-1, n, (n_q,), generator=gen) if use_exclude else None
    k = 1 + int(k_frac * (n - 1 - (exclude is not None and bool((exclude >= 0).any()))))
    if k < 1 or k > n:
        return
    if fmt == "int8" and not P._int_mm_exact(d):
        fmt = "fp32"  # what proximity_topk_torch does where torch._int_mm is wrong (d = 1)
    q64 = P._queries64(q, True)
    cq, cj, overflow = P.scan_blocked(q64, g, k, True, exclude, fmt, tile=8, workers=2)
    result = P.rerank_exact(q64, g, k, True, exclude, cq, cj, overflow)
    assert_same_as_exact(result, q, g, k, exclude=exclude)


def test_candidate_format_is_measured_among_the_native_ones(monkeypatch):
    fmts = P.cpu_candidate_formats()
    assert fmts[0] == "fp32" and set(fmts) <= {"fp32", "bf16", "int8"}
    P.cpu_candidate_format.cache_clear()
    try:
        assert P.cpu_candidate_format() in fmts
        speed = {"fp32": 3.0, "bf16": 2.0, "int8": 1.0}  # a CPU where int8 multiplies fastest: it is chosen
        monkeypatch.setattr(P, "_candidate_seconds", lambda fmt: speed[fmt])
        P.cpu_candidate_format.cache_clear()
        assert P.cpu_candidate_format() == min(fmts, key=speed.get)
    finally:
        P.cpu_candidate_format.cache_clear()


def test_int8_matmul_self_check():
    assert not P._int_mm_exact(1) or torch.__version__ < "2"  # torch._int_mm on CPU returns garbage for K = 1
    assert P._int_mm_exact(64)
    g = torch.randn(50, 1)
    assert_same_as_exact(P.proximity_topk_torch(g[:3], g, 4, True, None, candidates="int8"), g[:3], g, 4)


def test_many_workers_and_tiles_merge_exactly():
    q, g = gallery_with_ties(3001, 48, seed=7)
    q64 = P._queries64(q, True)
    for fmt in ("int8", "fp32"):
        cq, cj, overflow = P.scan_blocked(q64, g, 12, True, None, fmt, tile=256, workers=3)
        assert not overflow.any()
        result = P.rerank_exact(q64, g, 12, True, None, cq, cj, overflow)
        assert_same_as_exact(result, q, g, 12)


def test_candidate_overflow_falls_back_to_exact(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(1, 32, generator=gen).repeat(1500, 1)  # every row ties: every row is a candidate
    g[700] += 0.5
    q = torch.randn(4, 32, generator=gen)
    calls = []
    exact = P.exact_topk
    monkeypatch.setattr(P, "exact_topk", lambda *a, **kw: calls.append(1) or exact(*a, **kw))
    monkeypatch.setattr(P, "CANDIDATE_CAP", 64)
    exclude = torch.tensor([700, 0, -1, 3])
    assert_public_result_same_as_exact(K.proximity_topk(q, g, 5, backend="torch", exclude=exclude), q, g, 5,
                                       exclude=exclude)
    assert calls, "the overflowed queries were not searched exactly"


def test_raw_inner_product_float64_and_numpy_inputs():
    q, g = gallery_with_ties(900, 33, seed=9, dtype=torch.float64)
    result = K.proximity_topk(q.numpy(), g.numpy(), 7, normalize=False)
    assert_public_result_same_as_exact(result, q, g, 7, normalize=False)
    assert_public_result_same_as_exact(K.proximity_topk(q.half(), g.half(), 7), q.half(), g.half(), 7)


def test_public_api_auto_backend():
    q, g = gallery_with_ties(1500, 40, seed=10)
    assert_public_result_same_as_exact(K.proximity_topk(q, g, 10), q, g, 10)
    s, i = K.proximity_topk(q[:0], g, 3)
    assert s.shape == i.shape == (0, 3)


@pytest.mark.parametrize("call, match", [
    (lambda q, g: K.proximity_topk(q, g[:10], 11), r"k = 11 .* N = 10"),
    (lambda q, g: K.proximity_topk(q, g, 0), "k must be a positive integer"),
    (lambda q, g: K.proximity_topk(q, g[:10], 10, exclude=torch.zeros(len(q), dtype=torch.long)), r"k = 10 .*N - 1"),
    (lambda q, g: K.proximity_topk(q[0], g, 3), "queries must be 2-D"),
    (lambda q, g: K.proximity_topk(q, g[None], 3), "gallery must be 2-D"),
    (lambda q, g: K.proximity_topk(q[:, :5], g, 3), "embedding size"),
    (lambda q, g: K.proximity_topk(q.index_fill(1, torch.tensor([2]), float("nan")), g, 3), "queries contain NaN"),
    (lambda q, g: K.proximity_topk(q, g.index_fill(0, torch.tensor([1500]), float("nan")), 3), "gallery contains NaN"),
    (lambda q, g: K.proximity_topk(q, g, 3, exclude=torch.zeros(2, dtype=torch.long)), "exclude must be"),
    (lambda q, g: K.proximity_topk(q, g, 3, exclude=torch.full((len(q),), 5000)), "exclude values"),
])
def test_proximity_rejects_bad_inputs(call, match):
    q, g = gallery_with_ties(2000, 16)
    with pytest.raises(ValueError, match=match):
        call(q, g)


@needs_triton
@pytest.mark.parametrize("k", [1, 6])
def test_triton_proximity_returns_exact_indices(k):
    q, g = gallery_with_ties(600, 40, seed=11)  # D = 40: masked loads past the embedding size
    q, g = q[:19].to(DEVICE), g.to(DEVICE)
    exclude = exclude_own_best(q.cpu(), g.cpu()).to(DEVICE)
    exclude[1], exclude[5] = 3, 599  # a tied row; the last row
    # n_split=3: several gallery splits merged; poisoned key buffer: every slot must be written
    result = P.proximity_topk_triton(q, g, k, True, exclude, n_split=3, empty=nan_empty)
    assert_same_as_exact(result, q.cpu(), g.cpu(), k, exclude=exclude.cpu())
    assert_public_result_same_as_exact(K.proximity_topk(q, g, k, backend="triton"), q.cpu(), g.cpu(), k)


@needs_triton
def test_triton_proximity_keys_hold_the_best_scores():
    gen = torch.Generator().manual_seed(12)
    q, g = torch.randn(20, 24, generator=gen), torch.randn(300, 24, generator=gen)  # no ties: fp32 orders them
    exclude = exclude_own_best(q, g)
    scores, idx = P.scan_triton(P._queries64(q, True).float(), g, 4, True, exclude, n_split=2, empty=nan_empty)
    ref_s, ref_i = exact_search(q, g, scores.shape[1], exclude=exclude)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, rtol=0, atol=1e-5)
