"""Full-size check: load + closed_form erase on an SD-1.5-size Arc2Face release, time and peak RSS.

    python benchmarks/bench_scale.py [--workdir /tmp/ff_scale] [--targets 1 10 100]
                                     [--drawn N] [--draw-steps S] [--random R] [--stub-text-at 100]
                                     [--stub-check] [--probe-only] [--skip-probe] [--reuse]

The committed results (benchmarks/results/bench_scale.{txt,json}; 2-core shared CPU, ~35 min in all):

    python benchmarks/bench_scale.py --probe-only
    python benchmarks/bench_scale.py --skip-probe --targets 1 10 100 --drawn 0 --random 256 \
        --stub-text-at 10 --stub-check      # (--reuse re-renders the tables from the measured runs)

Builds once (cached in --workdir) an Arc2Face release layout at full size with random weights:
`models/arc2face/` (UNet2DConditionModel with SD-1.5's exact config, safetensors), `models/encoder/`
(CLIP ViT-L/14 text encoder config, saved as a transformers-4 `pytorch_model.bin` as Arc2Face ships it),
a base folder `sd15/` (SD-1.5 AutoencoderKL, DPMSolverMultistep scheduler with SD's betas, a minimal
CLIP tokenizer padding to 77), and a tiny random insightface-format ArcFace ONNX (112x112 -> 512) as
the caller's encoder. All weights fp32; the model's own size is the sum of its parameter bytes.

Then, each in a FRESH subprocess (so the peak RSS is that run's alone): `ff.load` + `ff.erase(model,
targets, method="closed_form", encoder=enc, report=False, progress=False)` with the default
preservation set (preserve="auto"), for each target count, "cold" (FASTFORGET_CACHE = an empty
folder) then "warm" (the same folder again). The child is instrumented without changing the library:
the loader's and erase's internal steps are wrapped so that time, RSS at the end of each step and
the peak RSS *within* each step are recorded (the kernel's VmHWM is reset between steps through
/proc/self/clear_refs; a 50 ms sampler of VmRSS is a second opinion). The run's peak RSS is the
maximum over its steps.

Before that, a probe (also a fresh subprocess) times ONE `generate_tensor` call with 1 image and 1
step at this size (what drawing one identity of the default preservation set costs at draw_steps=1),
a VAE decode of one image, the text encoder's throughput (one 77-token sequence), and the peak RSS
of each. From those it projects the library recipe's cost; --drawn / --draw-steps / --random replace
the recipe's numbers (fastforget.identity.preservation.DEFAULT_RECIPE is set in the child) and the
recipe used is printed. Without them the library recipe is used unless its projected time exceeds
--cold-budget, in which case drawn (then random) is reduced to fit, and that is printed.

--stub-text-at N: for runs with N or more targets, the CLIP text transformer's 12 layers are replaced
by the identity inside the child (token + position embeddings and the final layer norm still run;
every state tensor keeps its shape, dtype and lifetime), because at this size on a small CPU the
target / neighbour / anchor states of 100 targets alone take tens of minutes. Those rows' RSS is
measured; their erase time is not comparable and a projected real time is printed beside it. The
stub drops the layers' activations, so a stubbed row's RSS is a LOWER bound (met? says NO only when even
the bound exceeds the target). --stub-check measures how far off it is: the smallest real count rerun
stubbed, and the smallest stubbed count rerun with the real layers (warm, on a copy of a real cache:
the preservation set and its Gram do not depend on the targets); the latter is added to the table.

Target (issue "Full-size check"): the erased model must not hold a second full copy of unchanged
weights: peak RSS <= 1.3 x the model's own size. Results: benchmarks/results/bench_scale.{txt,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GIB = 1024 ** 3
TARGET_RATIO = 1.3

# ------------------------------------------------------------------ full-size configs
# SD-1.5's unet/config.json (runwayml/stable-diffusion-v1-5), which Arc2Face's UNet keeps
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
# SD-1.5's vae/config.json
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
# SD's betas (scheduler/scheduler_config.json); Arc2Face samples with DPMSolverMultistep
SD15_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon", steps_offset=1)
# CLIP ViT-L/14 text encoder (SD-1.5's text_encoder/config.json; Arc2Face's encoder/ has the same shape)
VITL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
BUILD_VERSION = 1


def _spec_hash() -> str:
    import hashlib

    return hashlib.sha256(json.dumps([BUILD_VERSION, SD15_UNET, SD15_VAE, SD15_SCHED, VITL_TEXT],
                                     sort_keys=True).encode()).hexdigest()[:16]


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def build(workdir: Path) -> dict:
    """Write the release layout once; returns {paths, sizes}. Cached by the configs' hash."""
    info_file = workdir / "build.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("spec") == _spec_hash() and Path(info["models"]).is_dir():
            info["cached"] = True
            return info
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastforget.testbed.nets import write_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / ".build_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    models, base = tmp / "release" / "models", tmp / "release" / "sd15"
    sizes, params, times = {}, {}, {}
    t = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)  # default (kaiming-uniform) init: random, finite, fast enough
    times["unet_init_s"] = time.perf_counter() - t
    sizes["unet"], params["unet"] = _param_bytes(unet), sum(p.numel() for p in unet.parameters())
    t = time.perf_counter()
    unet.save_pretrained(models / "arc2face", safe_serialization=True)  # diffusion_pytorch_model.safetensors
    times["unet_save_s"] = time.perf_counter() - t
    del unet
    t = time.perf_counter()
    text = CLIPTextModel(CLIPTextConfig(**VITL_TEXT))
    sizes["text_encoder"], params["text_encoder"] = _param_bytes(text), sum(p.numel() for p in text.parameters())
    (models / "encoder").mkdir(parents=True)
    text.config.save_pretrained(models / "encoder")
    state = dict(text.state_dict())
    # transformers-4 checkpoints (Arc2Face's encoder/pytorch_model.bin) also carry the position_ids buffer
    state["text_model.embeddings.position_ids"] = torch.arange(VITL_TEXT["max_position_embeddings"])[None]
    torch.save(state, models / "encoder" / "pytorch_model.bin")
    times["text_encoder_s"] = time.perf_counter() - t
    del text, state
    t = time.perf_counter()
    vae = AutoencoderKL(**SD15_VAE)
    sizes["vae"], params["vae"] = _param_bytes(vae), sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(base / "vae", safe_serialization=True)
    times["vae_s"] = time.perf_counter() - t
    del vae
    DPMSolverMultistepScheduler(**SD15_SCHED).save_pretrained(base / "scheduler")
    write_tokenizer(base / "tokenizer", max_length=77)
    _export_arcface(tmp / "arcface" / "arcface.onnx")
    final = workdir / "release"
    shutil.rmtree(final, ignore_errors=True)
    shutil.rmtree(workdir / "arcface", ignore_errors=True)
    (tmp / "release").rename(final)
    (tmp / "arcface").rename(workdir / "arcface")
    shutil.rmtree(tmp, ignore_errors=True)
    info = {"spec": _spec_hash(), "models": str(final / "models"), "base": str(final / "sd15"),
            "encoder": str(workdir / "arcface" / "arcface.onnx"), "param_bytes": sizes, "params": params,
            "model_bytes": sum(sizes.values()), "build_times": times,
            "files": {str(p.relative_to(final)): p.stat().st_size for p in sorted(final.rglob("*")) if p.is_file()}}
    info_file.write_text(json.dumps(info, indent=2))
    info["cached"] = False
    return info


def _export_arcface(path: Path) -> None:
    """A tiny random network with the insightface recognition contract (tests/test_arcface_onnx.py's)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_arcface_onnx import export_tiny_arcface

    export_tiny_arcface(path)


# ------------------------------------------------------------------ child side: RSS meter
def _status_kib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


class Meter:
    """Stage boundaries: time, RSS at the boundary, and the peak RSS within the stage (kernel VmHWM reset at
    each boundary via /proc/self/clear_refs, plus a 50 ms VmRSS sampler as a second opinion)."""

    def __init__(self):
        import threading

        self.t0 = self.last = time.perf_counter()
        self.stages = []
        self.sampled = 0
        self.can_reset = self._reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self):
        while not self._stop.wait(0.05):
            try:
                self.sampled = max(self.sampled, _status_kib()["VmRSS"])
            except Exception:
                pass

    def mark(self, label: str, **extra) -> dict:
        now = time.perf_counter()
        st = _status_kib()
        rec = {"stage": label, "seconds": now - self.last, "t": now - self.t0, "rss_end": st["VmRSS"],
               "rss_anon_end": st.get("RssAnon"), "rss_file_end": st.get("RssFile"),
               "peak": max(st["VmHWM"], self.sampled), "peak_hwm": st["VmHWM"], "peak_sampled": self.sampled, **extra}
        self.stages.append(rec)
        self.sampled = st["VmRSS"]
        if self.can_reset:
            self._reset()
        self.last = time.perf_counter()
        return rec

    def stop(self):
        self._stop.set()

    @property
    def peak(self) -> int:
        return max(s["peak"] for s in self.stages)


def _wrap(owner, attr: str, meter: Meter, label, before: str | None = None):
    """Replace owner.attr by a wrapper that closes a stage on entry (`before`, default 'other') and on exit
    (`label`; a callable gets the call's args). Works for module functions looked up at call time."""
    import functools

    raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
    is_cm = isinstance(raw, classmethod)
    orig = raw.__func__ if is_cm else getattr(owner, attr)

    @functools.wraps(orig)
    def wrapper(*a, **k):
        name = label(*a, **k) if callable(label) else label
        meter.mark(before or f"(before) {name}")  # what ran since the last boundary
        out = orig(*a, **k)
        meter.mark(name)
        return out

    setattr(owner, attr, classmethod(wrapper) if is_cm else wrapper)
    return orig


def _instrument(meter: Meter) -> None:
    import torch
    from transformers import CLIPTextModel

    import fastforget.identity.anchors as anchors
    import fastforget.identity.preservation as pres
    import fastforget.methods.closed_form as cf
    import fastforget.models.arc2face as a2f
    from fastforget.patch import Patch

    _wrap(a2f, "_load_unet", meter, "load: unet (diffusers from_pretrained, safetensors)",
          before="load: imports + layout detection (before the unet)")
    _wrap(a2f, "_load_text_encoder", meter, "load: text encoder (rest: model.float())")
    _wrap(a2f, "_load_vae", meter, "load: vae (diffusers from_pretrained, safetensors)")
    _wrap(a2f, "_check_finite", meter, lambda m, where, *a: f"load: _check_finite({Path(where).name})")
    _wrap(torch, "load", meter, "load: text encoder: torch.load(pytorch_model.bin)")
    orig_init = CLIPTextModel.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        meter.mark("load: text encoder: CLIPTextModel(config) random init")

    CLIPTextModel.__init__ = init
    orig_lsd = CLIPTextModel.load_state_dict

    def lsd(self, *a, **k):
        out = orig_lsd(self, *a, **k)
        meter.mark("load: text encoder: load_state_dict (copy into the random weights)")
        return out

    CLIPTextModel.load_state_dict = lsd
    _wrap(pres, "model_key", meter, "erase: preservation model_key (sha256 of every weight)")
    _wrap(pres, "drawn_identities", meter, lambda m, e, n, **k: f"erase: drawing {n} identities "
          f"({k.get('steps')} steps)")
    _wrap(pres, "default_set", meter, "erase: default_set (rest: random vectors, cache read/write)")
    _wrap(anchors, "select_anchors", meter, "erase: select_anchors")
    depth = {"gram": 0, "states": 0}
    orig_states, orig_gram = cf._states, cf._gram

    def states(model, emb, *a, **k):
        if depth["gram"]:
            return orig_states(model, emb, *a, **k)
        depth["states"] += 1
        what = {1: "targets+neighbours", 2: "anchors (targets' anchors, repeated per neighbour)"}.get(depth["states"],
                                                                                                    "other")
        meter.mark(f"fit: (before) _states({what})")
        out = orig_states(model, emb, *a, **k)
        meter.mark(f"fit: _states({what}): {tuple(out.shape)} float64 = {out.numel() * 8 / GIB:.3f} GiB",
                   states_bytes=out.numel() * 8)
        return out

    def gram(model, emb, *a, **k):
        disk = k.get("disk", False)
        meter.mark("fit: (before) _gram")
        depth["gram"] += 1
        try:
            out = orig_gram(model, emb, *a, **k)
        finally:
            depth["gram"] -= 1
        meter.mark(f"fit: _gram({len(emb)} {'preservation' if disk else 'retain'} embeddings"
                   f"{', disk cache' if disk else ''})")
        return out

    cf._states, cf._gram = states, gram
    _wrap(cf, "solve_kv_map", meter, "fit: solve_kv_map (rest: Cholesky solve)")
    _wrap(Patch, "from_edit", meter, "fit: Patch.from_edit (clones the old values)",
          before="fit: W0 @ T for every attn2 to_k / to_v (float64)")
    _wrap(a2f.Arc2FaceModel, "clone", meter, "erase: model.clone(only=patch.names)")
    _wrap(Patch, "apply", meter, "erase: patch.apply(erased)")


def _stub_text_layers(model) -> None:
    """The CLIP encoder layers become the identity: shapes, dtypes and every state tensor's lifetime unchanged."""
    from transformers.modeling_outputs import BaseModelOutput

    enc = model.text_encoder.text_model.encoder
    enc.forward = lambda inputs_embeds=None, **kw: BaseModelOutput(last_hidden_state=inputs_embeds)


def child_erase(args: dict) -> dict:
    meter = Meter()
    import numpy as np  # noqa: F401
    import torch
    import torch.nn.functional as F

    import fastforget as ff
    import fastforget.identity.preservation as pres
    import fastforget.methods.closed_form  # noqa: F401  (registers the method)

    meter.mark("imports (python, torch, diffusers, transformers, fastforget)")
    pres.DEFAULT_RECIPE = dict(args["recipe"])
    _instrument(meter)
    t = time.perf_counter()
    model = ff.load(args["models"], base=args["base"])
    load_s = time.perf_counter() - t
    meter.mark("load: rest (tokenizer, scheduler, Arc2FaceModel)")
    rss_after_load = _status_kib()["VmRSS"]
    t = time.perf_counter()
    enc = ff.load_encoder(args["encoder"])
    enc_s = time.perf_counter() - t
    meter.mark("load: ArcFace ONNX encoder")
    if args.get("stub"):
        _stub_text_layers(model)
    targets = F.normalize(torch.randn(args["targets"], 512, generator=torch.Generator().manual_seed(args["seed"]),
                                      dtype=torch.float64), dim=1).float()
    t = time.perf_counter()
    res = ff.erase(model, targets, method="closed_form", encoder=enc, report=False, progress=False)
    erase_s = time.perf_counter() - t
    meter.mark("erase: rest (return)")
    rss_after_erase = _status_kib()["VmRSS"]
    patch_bytes = sum(v.numel() * v.element_size() for v in res.patch.new.values())
    shared = _shared_fraction(model, res.model)
    meter.stop()
    return {"load_s": load_s, "encoder_load_s": enc_s, "erase_s": erase_s, "total_s": load_s + enc_s + erase_s,
            "peak_rss": meter.peak, "rss_after_imports": meter.stages[0]["rss_end"], "rss_after_load": rss_after_load,
            "rss_after_erase": rss_after_erase, "patch_tensors": len(res.patch.new), "patch_new_bytes": patch_bytes,
            "erased_shares": shared, "hwm_reset": meter.can_reset, "stages": meter.stages,
            "recipe": pres.DEFAULT_RECIPE}


def _shared_fraction(a, b) -> dict:
    """How many bytes of the erased model's parameters are the original's own storage."""
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        pa, pb = getattr(a, part), getattr(b, part)
        ptrs = {p.data_ptr() for p in pa.parameters()}
        tot = sum(p.numel() * p.element_size() for p in pb.parameters())
        same = sum(p.numel() * p.element_size() for p in pb.parameters() if p.data_ptr() in ptrs)
        out[part] = {"bytes": tot, "shared_bytes": same}
    return out


def child_probe(args: dict) -> dict:
    meter = Meter()
    import torch
    import torch.nn.functional as F

    import fastforget as ff

    meter.mark("imports")
    _instrument(meter)
    t = time.perf_counter()
    model = ff.load(args["models"], base=args["base"])
    load_s = time.perf_counter() - t
    meter.mark("load: rest (tokenizer, scheduler, Arc2FaceModel)")
    enc = ff.load_encoder(args["encoder"])
    z = F.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    out = {"load_s": load_s}
    # text encoder throughput: one batch of 77-token sequences (what every state / Gram row costs)
    n = args.get("text_batch", 16)
    zz = F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(2)), dim=1)
    with torch.no_grad():
        model.condition(zz[:1])  # warm-up
        meter.mark("probe: warm-up")
        t = time.perf_counter()
        model.condition(zz)
        out["text_s_per_sequence"] = (time.perf_counter() - t) / n
    meter.mark(f"probe: model.condition({n} embeddings)")
    t = time.perf_counter()
    img = model.generate_tensor(z, seed=0, steps=1, guidance=3.0)
    out["generate_1img_1step_s"] = time.perf_counter() - t
    meter.mark("probe: generate_tensor(1 image, 1 step, CFG 3): UNet batch 2 + VAE decode 512x512")
    t = time.perf_counter()
    enc.encode_tensor(img)
    out["encode_s"] = time.perf_counter() - t
    meter.mark("probe: encoder.encode_tensor(1 image)")
    lat = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t = time.perf_counter()
        model.codec.decode(lat)
        out["vae_decode_1img_s"] = time.perf_counter() - t
    meter.mark("probe: VAE decode of 1 latent (64x64 -> 512x512)")
    meter.stop()
    # one generate_tensor = conditioning (2 sequences: id + null) + UNet step(s) + decode
    out["unet_step_cfg_s"] = max(out["generate_1img_1step_s"] - out["vae_decode_1img_s"]
                                 - 2 * out["text_s_per_sequence"], 0.0)
    out.update(peak_rss=meter.peak, stages=meter.stages, hwm_reset=meter.can_reset)
    return out


# ------------------------------------------------------------------ parent side
def run_child(kind: str, args: dict, out_dir: Path, env_extra: dict, log, reuse: bool = False) -> dict:
    """Run one measurement in a fresh interpreter. With `reuse`, a finished run with identical arguments
    (same name, recipe, targets, stub, paths) is read back from --workdir/runs instead of rerun."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args_file, res_file = out_dir / f"{args['name']}.args.json", out_dir / f"{args['name']}.result.json"
    if reuse and reusable(out_dir, args):
        res = json.loads(res_file.read_text())
        when = res.get("when") or time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(res_file.stat().st_mtime))
        log(f"  {args['name']}: REUSED from {res_file} (identical arguments; measured {when})")
        return res
    args_file.write_text(json.dumps(args))
    res_file.unlink(missing_ok=True)
    env = {**os.environ, **env_extra}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(args_file),
                          str(res_file)], env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not res_file.is_file():
        raise SystemExit(f"child {args['name']} failed (exit {code})")
    res = json.loads(res_file.read_text())
    res["wall_s"] = wall
    res["ru_maxrss_after_resets"] = ru.ru_maxrss * 1024  # kernel's peak of the last reset interval, for reference
    res["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res_file.write_text(json.dumps(res, indent=1))
    log(f"  {args['name']}: wall {wall:.1f}s, peak RSS {res['peak_rss'] / GIB:.2f} GiB")
    return res


def reusable(out_dir: Path, args: dict) -> bool:
    args_file, res_file = out_dir / f"{args['name']}.args.json", out_dir / f"{args['name']}.result.json"
    return args_file.is_file() and res_file.is_file() and json.loads(args_file.read_text()) == \
        json.loads(json.dumps(args))


def projected_prep_s(recipe: dict, probe: dict) -> dict:
    """Seconds the default preservation set costs when cold: drawing + the Gram's text-encoder passes."""
    per_draw = probe["generate_1img_1step_s"] + (recipe["draw_steps"] - 1) * probe["unet_step_cfg_s"] \
        + probe["encode_s"]
    draw = recipe["drawn"] * per_draw
    gram = (recipe["drawn"] + recipe["random"]) * probe["text_s_per_sequence"]
    return {"per_draw_s": per_draw, "draw_s": draw, "gram_s": gram, "total_s": draw + gram}


def state_sequences(targets: int, neighbours: int = 16) -> int:
    """77-token sequences closed_form's solve_kv_map runs through the text encoder besides the Gram."""
    return 2 * targets * (1 + neighbours) + 1


def fmt_table(rows: list, model_bytes: int) -> str:
    head = ["targets", "cache", "text layers", "load s", "erase s", "total s", "peak RSS GiB", "RSS/model", "target",
            "met?"]
    lines = []
    body = []
    for r in rows:
        ratio = r["peak_rss"] / model_bytes
        erase = f"{r['erase_s']:.1f}" + (f" (stub; ~{r['erase_real_projected_s']:.0f} real)" if r.get("stub") else "")
        body.append([str(r["targets"]), r["cache"], "stub (RSS low bound)" if r.get("stub") else "real",
                     f"{r['load_s']:.1f}", erase, f"{r['total_s']:.1f}",
                     f"{r['peak_rss'] / GIB:.2f}", f"{ratio:.2f}x", f"{TARGET_RATIO}x",
                     "NO" if ratio > TARGET_RATIO else "? (low bound)" if r.get("stub") else "yes"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines.append(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def fmt_stages(stages: list, model_bytes: int, min_s: float = 0.05) -> str:
    out = []
    for s in stages:
        if s["seconds"] < min_s and not s["stage"].startswith(("load:", "fit:", "erase:")):
            continue
        if s["stage"].startswith("(before)") or "(before)" in s["stage"]:
            if s["seconds"] < min_s and s["peak"] - s["rss_end"] < 64 * 1024 ** 2:
                continue
        out.append(f"    {s['seconds']:8.1f}s  end {s['rss_end'] / GIB:5.2f} GiB (anon {s['rss_anon_end'] / GIB:5.2f} "
                   f"file {s['rss_file_end'] / GIB:5.2f})  peak {s['peak'] / GIB:5.2f} GiB "
                   f"({s['peak'] / model_bytes:4.2f}x)  {s['stage']}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ff_scale")
    ap.add_argument("--targets", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drawn", type=int, default=None, help="preservation recipe: identities drawn by the model")
    ap.add_argument("--draw-steps", type=int, default=None, help="preservation recipe: sampling steps per draw")
    ap.add_argument("--random", type=int, default=None, help="preservation recipe: random unit vectors")
    ap.add_argument("--cold-budget", type=float, default=900.0,
                    help="seconds a cold preservation set may take before an unset recipe is reduced")
    ap.add_argument("--stub-text-at", type=int, default=None,
                    help="stub the CLIP text layers in runs with at least this many targets (RSS only)")
    ap.add_argument("--skip-probe", action="store_true", help="reuse the last probe from --workdir")
    ap.add_argument("--reuse", action="store_true",
                    help="read back runs already measured in --workdir/runs with identical arguments")
    ap.add_argument("--stub-check", action="store_true",
                    help="how far stubbed RSS is from real: rerun the smallest real count (warm) stubbed, and the "
                         "smallest stubbed count (warm) with the real text layers")
    ap.add_argument("--probe-only", action="store_true", help="build + probe + projections, no erase runs")
    ap.add_argument("--out", default=str(RESULTS / "bench_scale"))
    ap.add_argument("--child", nargs=3, metavar=("KIND", "ARGS", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        kind, args_file, res_file = a.child
        args = json.loads(Path(args_file).read_text())
        res = child_erase(args) if kind == "erase" else child_probe(args)
        Path(res_file).write_text(json.dumps(res, indent=1))
        return

    report = []

    def log(msg=""):
        print(msg, flush=True)
        report.append(msg)

    workdir = Path(a.workdir)
    t = time.perf_counter()
    info = build(workdir)
    mb = info["model_bytes"]
    log(f"model: {workdir / 'release'} ({'cached' if info['cached'] else f'built in {time.perf_counter() - t:.0f}s'})")
    log("  own size (sum of fp32 parameter bytes): " + ", ".join(
        f"{k} {v / GIB:.3f} GiB ({info['params'][k] / 1e6:.1f}M)" for k, v in info["param_bytes"].items())
        + f"; total {mb / GIB:.3f} GiB ({mb / 1e9:.2f} GB)")
    log(f"  RSS target: {TARGET_RATIO} x {mb / GIB:.3f} = {TARGET_RATIO * mb / GIB:.3f} GiB")
    common = {"models": info["models"], "base": info["base"], "encoder": info["encoder"]}
    runs_dir = workdir / "runs"

    from fastforget.identity.preservation import DEFAULT_RECIPE

    probe_file = runs_dir / "probe.result.json"
    if a.skip_probe and probe_file.is_file():
        probe = json.loads(probe_file.read_text())
        log("probe: reused from " + str(probe_file))
    else:
        log("probe (fresh subprocess): load, text-encoder throughput, ONE generate_tensor(1 image, 1 step)")
        probe = run_child("probe", {**common, "name": "probe"}, runs_dir, {}, log)
    log(f"  ONE generate_tensor call, 1 image, 1 step, CFG 3 (UNet batch 2 at 64x64 + VAE decode to 512x512): "
        f"{probe['generate_1img_1step_s']:.1f} s")
    log(f"    of which VAE decode {probe['vae_decode_1img_s']:.1f} s, one UNet step (batch 2) ~"
        f"{probe['unet_step_cfg_s']:.1f} s; ArcFace encode {probe['encode_s']:.2f} s")
    log(f"  text encoder: {probe['text_s_per_sequence']:.3f} s per 77-token sequence "
        f"(every Gram row, target, neighbour and anchor costs one)")
    log("  probe stages:\n" + fmt_stages(probe["stages"], mb))

    lib = dict(DEFAULT_RECIPE)
    proj_lib = projected_prep_s(lib, probe)
    log(f"library recipe {lib}: projected cold preservation set {proj_lib['total_s']:.0f} s "
        f"({proj_lib['total_s'] / 3600:.1f} h) = drawing {lib['drawn']} x {proj_lib['per_draw_s']:.0f} s "
        f"= {proj_lib['draw_s']:.0f} s + Gram of {lib['drawn'] + lib['random']} rows {proj_lib['gram_s']:.0f} s")
    recipe = dict(lib)
    for key, val in (("drawn", a.drawn), ("draw_steps", a.draw_steps), ("random", a.random)):
        if val is not None:
            recipe[key] = val
    explicit = any(v is not None for v in (a.drawn, a.draw_steps, a.random))
    if not explicit and proj_lib["total_s"] > a.cold_budget:
        per = proj_lib["per_draw_s"]
        recipe["drawn"] = max(0, min(lib["drawn"], int(0.5 * a.cold_budget / max(per, 1e-9))))
        left = a.cold_budget - recipe["drawn"] * per
        recipe["random"] = max(1, min(lib["random"], int(left / probe["text_s_per_sequence"]) - recipe["drawn"]))
        log(f"  REDUCED to fit --cold-budget {a.cold_budget:.0f} s: drawn {recipe['drawn']}, random {recipe['random']}")
    proj = projected_prep_s(recipe, probe)
    log(f"recipe used: {recipe}" + ("" if recipe == lib else "  (NOT the library's; set in the child as "
                                   "fastforget.identity.preservation.DEFAULT_RECIPE)"))
    log(f"  projected cold preservation cost with it: {proj['total_s']:.0f} s")
    for n in a.targets:
        log(f"  projected text-encoder time of closed_form's target / neighbour / anchor states, {n} targets: "
            f"{state_sequences(n) * probe['text_s_per_sequence']:.0f} s ({state_sequences(n)} sequences)")
    if a.probe_only:
        return

    rows = []
    for n in a.targets:
        cache = workdir / "cache" / f"targets{n}"
        stub = a.stub_text_at is not None and n >= a.stub_text_at
        run_args = {mode: {**common, "name": f"t{n}_{mode}", "targets": n, "seed": a.seed, "recipe": recipe,
                           "stub": stub} for mode in ("cold", "warm")}
        if not (a.reuse and reusable(runs_dir, run_args["cold"]) and cache.is_dir()):
            shutil.rmtree(cache, ignore_errors=True)  # cold = an empty cache folder
            cache.mkdir(parents=True)
        for mode in ("cold", "warm"):
            name = f"t{n}_{mode}"
            log(f"run {name}: {n} targets, cache {mode} ({cache})" + (" [text layers stubbed]" if stub else ""))
            res = run_child("erase", run_args[mode], runs_dir, {"FASTFORGET_CACHE": str(cache)}, log, a.reuse)
            res.update(targets=n, cache=mode, stub=stub)
            if stub:
                seqs = state_sequences(n) + (recipe["drawn"] + recipe["random"] if mode == "cold" else 0)
                # the stub skips only the text layers: add back what those sequences cost at the probe's rate
                res["erase_real_projected_s"] = res["erase_s"] + seqs * probe["text_s_per_sequence"]
            rows.append(res)
            log(f"    load {res['load_s']:.1f}s  erase {res['erase_s']:.1f}s  peak {res['peak_rss'] / GIB:.2f} GiB "
                f"({res['peak_rss'] / mb:.2f}x); after imports {res['rss_after_imports'] / GIB:.2f}, after load "
                f"{res['rss_after_load'] / GIB:.2f}, after erase {res['rss_after_erase'] / GIB:.2f} GiB; "
                f"erased model's own new bytes {res['patch_new_bytes'] / GIB:.3f} GiB")
            log(fmt_stages(res["stages"], mb))

    checks = []
    real = [r for r in rows if not r["stub"]]
    stubbed = [r for r in rows if r["stub"]]
    if a.stub_check and stubbed and real:
        # (a) the smallest real count, warm, rerun WITH the stub; (b) the smallest stubbed count, warm, rerun
        # REAL, on a copy of a real run's cache (the preservation set and its Gram do not depend on the targets)
        ref = min((r for r in real if r["cache"] == "warm"), key=lambda r: r["targets"])
        n_s = min(r["targets"] for r in stubbed)
        src_cache = workdir / "cache" / f"targets{max(r['targets'] for r in real)}"
        real_cache = workdir / "cache" / f"targets{n_s}_real"
        if not (a.reuse and real_cache.is_dir()):
            shutil.rmtree(real_cache, ignore_errors=True)
            shutil.copytree(src_cache, real_cache)
        for n, stub, cache, other in ((ref["targets"], True, workdir / "cache" / f"targets{ref['targets']}", ref),
                                      (n_s, False, real_cache, next(r for r in stubbed if r["targets"] == n_s
                                                                   and r["cache"] == "warm"))):
            name = f"t{n}_warm_{'stubcheck' if stub else 'real'}"
            log(f"stub check: {n} targets, warm, text layers {'stubbed' if stub else 'REAL'} ({cache})")
            res = run_child("erase", {**common, "name": name, "targets": n, "seed": a.seed, "recipe": recipe,
                                      "stub": stub}, runs_dir, {"FASTFORGET_CACHE": str(cache)}, log, a.reuse)
            res.update(targets=n, cache="warm", stub=stub, check=True)
            real_r, stub_r = (other, res) if stub else (res, other)
            checks.append({"targets": n, "real_peak": real_r["peak_rss"], "stub_peak": stub_r["peak_rss"],
                           "real_erase_s": real_r["erase_s"], "stub_erase_s": stub_r["erase_s"], "name": name})
            log(f"    peak RSS real {real_r['peak_rss'] / GIB:.3f} GiB vs stubbed {stub_r['peak_rss'] / GIB:.3f} GiB "
                f"(real - stubbed {(real_r['peak_rss'] - stub_r['peak_rss']) / GIB:+.3f} GiB); erase "
                f"{real_r['erase_s']:.1f}s real vs {stub_r['erase_s']:.1f}s stubbed")
            log(fmt_stages(res["stages"], mb))
            if not stub:
                rows.append(res)
    check = checks or None
    table = fmt_table(rows, mb)
    log("")
    log(f"Full-size check: SD-1.5-size Arc2Face release, random fp32 weights, model {mb / GIB:.3f} GiB; "
        f"closed_form, preserve='auto', recipe {recipe}")
    log(table)
    log("")
    log("where each run peaks (stage with the highest RSS; 'above load' = peak - RSS right after ff.load):")
    for r in rows:
        top = max(r["stages"], key=lambda st: st["peak"])
        log(f"  {r['targets']:>3} {r['cache']} {'stub' if r['stub'] else 'real'}: after imports "
            f"{r['rss_after_imports'] / GIB:.2f} GiB, after load {r['rss_after_load'] / GIB:.2f} GiB "
            f"({r['rss_after_load'] / mb:.2f}x), peak {r['peak_rss'] / GIB:.2f} GiB ({r['peak_rss'] / mb:.2f}x), "
            f"above load {(r['peak_rss'] - r['rss_after_load']) / GIB:+.2f} GiB in '{top['stage']}'")
    dec = next((st for st in probe["stages"] if st["stage"].startswith("probe: VAE decode")), None)
    if dec is not None:
        per = dec["peak"] - dec["rss_end"]
        log(f"drawing (not in the rows: drawn={recipe['drawn']}): in the probe one VAE decode of 1 image peaks at "
            f"{dec['peak'] / GIB:.2f} GiB ({dec['peak'] / mb:.2f}x), {per / GIB:.2f} GiB above the loaded model; "
            f"drawn_identities decodes 16 at once: linear projection {(dec['rss_end'] + 16 * per) / GIB:.1f} GiB "
            f"({(dec['rss_end'] + 16 * per) / mb:.1f}x)")
    worst = max(rows, key=lambda r: r["peak_rss"])
    top = max((s for s in worst["stages"]), key=lambda s: s["peak"])
    log(f"worst: {worst['targets']} targets {worst['cache']}: {worst['peak_rss'] / GIB:.2f} GiB "
        f"({worst['peak_rss'] / mb:.2f}x), in stage '{top['stage']}'")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(report) + "\n")
    out.with_suffix(".json").write_text(json.dumps({
        "model": {k: info[k] for k in ("param_bytes", "params", "model_bytes", "files", "build_times")},
        "target_ratio": TARGET_RATIO, "library_recipe": lib, "recipe": recipe, "probe": probe,
        "projection_library_recipe": proj_lib, "projection_recipe": proj, "rows": rows, "stub_check": check,
        "argv": sys.argv[1:]}, indent=1))


if __name__ == "__main__":
    main()
