"""ONNX export of an (erased) Arc2Face-family model, with an optional identity firewall in the graph.

Three graphs, erased weights baked in (classic TorchScript exporter, `dynamo=False`):

- conditioner.onnx  `embedding` (N, 512) float32 -> `states` (N, L, D): Arc2Face's projection
  exactly as `Arc2FaceModel.condition` computes it (normalise; the `id` token's input embedding
  replaced by the zero-padded embedding; causal CLIP text transformer; final layer norm). The
  prompt's token embeddings and the causal mask are constants of the graph. With the firewall,
  the normalised embedding is first compared with the erased identities' bank (MatMul,
  ReduceMax/ArgMax, Gather, Where) and replaced by that identity's anchor when cos >= tau.
- unet.onnx  `sample` (B, C, S, S), `timestep` (B,) float32, `encoder_hidden_states` (B, L, D) ->
  `noise_pred`; dynamic batch.
- vae_decoder.onnx  `latent` -> `image` (N, 3, H, W), unclamped (latent models only; pixel-shuffle
  models record `unshuffle` and the runtime shuffles in numpy).

`manifest.json` records what was exported (parts, shapes, dtype, scheduler config, resolution),
the patch fingerprint, sha256 of the source model's weight files, the firewall's settings and
fingerprints, the torch-parameter -> ONNX-initializer map used to refit TensorRT engines, and
the ORT-vs-torch parity measured at export. `null_condition.npy` holds the empty-prompt states
(the negative branch of classifier-free guidance).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastforget.errors import InputError
from fastforget.export._compat import FORMAT, MANIFEST

log = logging.getLogger("fastforget.export")

PARTS = ("conditioner", "unet", "vae_decoder")
TWO_GB = 2 ** 31
_EXTERNAL_MARGIN = 64 * 2 ** 20  # protobuf caps a message at 2 GiB; leave room for the graph itself


# ---------------------------------------------------------------- graphs
class ConditionerGraph(nn.Module):
    """`Arc2FaceModel.condition` as a traceable module (+ the optional identity firewall)."""

    def __init__(self, model, dtype=torch.float32, bank=None, anchors=None, threshold: float = 0.5):
        super().__init__()
        te = model.text_encoder
        if dtype != next(te.parameters()).dtype:
            te = copy.deepcopy(te).to(dtype)
        self.text_encoder = te.eval()
        tm = te.text_model
        dev = next(te.parameters()).device
        ids = model._prompt_ids.to(dev)
        length = ids.shape[1]
        with torch.no_grad():
            self.register_buffer("prompt_tokens", tm.embeddings.token_embedding(ids).detach().to(dtype))
        self.register_buffer("id_mask", model._id_mask.to(dev)[None, :, None].clone())
        causal = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=dev).triu(1)
        self.register_buffer("causal_mask", causal[None, None])
        self.length, self.width = length, model.text_width
        self.firewall = bank is not None
        if self.firewall:
            bank = F.normalize(torch.as_tensor(bank, dtype=torch.float32), dim=1).to(dev)
            anchors = F.normalize(torch.as_tensor(anchors, dtype=torch.float32), dim=1).to(dev)
            self.register_buffer("firewall_bank_t", bank.T.contiguous())
            self.register_buffer("firewall_anchors", anchors.contiguous())
            self.threshold = float(threshold)

    def forward(self, embedding):
        e = embedding.float()
        e = e / torch.sqrt((e * e).sum(dim=1, keepdim=True)).clamp_min(1e-12)
        if self.firewall:
            sims = e @ self.firewall_bank_t                      # (N, K) cosine to each erased identity
            best, idx = sims.max(dim=1)                          # ReduceMax + ArgMax
            hit = (best >= self.threshold)[:, None]              # GreaterOrEqual
            e = torch.where(hit, self.firewall_anchors[idx], e)  # Gather + Where
        n = e.shape[0]
        padded = F.pad(e, (0, self.width - e.shape[1])).to(self.prompt_tokens.dtype)
        tok = torch.where(self.id_mask, padded[:, None, :], self.prompt_tokens)
        tm = self.text_encoder.text_model
        h = tm.embeddings(inputs_embeds=tok)
        mask = self.causal_mask.expand(n, 1, self.length, self.length)
        out = tm.encoder(inputs_embeds=h, causal_attention_mask=mask)
        return tm.final_layer_norm(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])


class UNetGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VAEDecoderGraph(nn.Module):
    """`Codec.decode` for latent models: vae.decode(z / scaling_factor)."""

    exported_prefixes = ("vae.decoder.", "vae.post_quant_conv.")  # the encoder is not in this graph

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent):
        return self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]


# ---------------------------------------------------------------- helpers
def _digest(arr: np.ndarray) -> str:
    a = np.ascontiguousarray(arr)
    return hashlib.sha256(a.dtype.str.encode() + b"\0" + a.tobytes()).hexdigest()


def file_sha256(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def source_hashes(model) -> dict:
    """sha256 of the weight files of the folder the model was loaded from (empty if built in memory)."""
    src = getattr(model, "source", None)
    out = {"path": src, "files": {}}
    if src and Path(src).is_dir():
        root = Path(src)
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in (".safetensors", ".bin") and not any(s.startswith(".") for s in p.parts):
                out["files"][str(p.relative_to(root))] = file_sha256(p)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def scheduler_config(model) -> dict:
    cfg = {k: v for k, v in dict(model.scheduler.config).items()}
    cfg["_class_name"] = type(model.scheduler).__name__
    return _jsonable(cfg)


def _patch_state(model, patch) -> str:
    from fastforget.patch import get_parameter

    def equal(which):
        src = patch.new if which == "new" else patch.old
        return all(torch.equal(get_parameter(model, k).detach().cpu().to(v.dtype), v) for k, v in src.items())

    if equal("new"):
        return "applied"
    if equal("old"):
        return "original"
    return "mismatch"


def resolve_model_and_patch(model_or_dir, patch=None, base=None):
    """(model with the patch applied, Patch or None). A patch that is already applied is only
    recorded; one that fits the unedited model is applied to a copy; anything else raises."""
    from fastforget.models import Arc2FaceModel, load
    from fastforget.patch import Patch

    if isinstance(patch, (str, Path)):
        patch = Patch.load(patch)  # before the model: a missing file fails at once
    if patch is not None and not isinstance(patch, Patch):
        raise InputError(f"patch: expected a Patch or a path to patch.safetensors, got {type(patch).__name__}")
    model = model_or_dir if isinstance(model_or_dir, Arc2FaceModel) else load(model_or_dir, base=base)
    if patch is None:
        return model, None
    state = _patch_state(model, patch)
    if state == "applied":
        return model, patch
    if state == "original":
        from fastforget.models.arc2face import Codec

        model = model.clone()
        if any(k.startswith("vae.") for k in patch.new):
            model.vae = copy.deepcopy(model.vae)
            model.codec = Codec(model.vae, model.unshuffle)
        patch.apply(model)
        log.info("patch %s applied to a copy of the model before export", patch.fingerprint())
        return model, patch
    raise InputError(f"patch {patch.fingerprint()}: its tensors match neither this model's weights nor the "
                     "weights it was made from (a patch for another model?)")


def _check_bank(bank, anchors, threshold):
    from fastforget.models.arc2face import check_embeddings

    if bank is None or anchors is None:
        raise InputError("firewall=True needs firewall_bank (the erased identities' embeddings, K x 512) and "
                         "firewall_anchors (the identity each one becomes, K x 512)")
    bank = check_embeddings(bank, name="firewall_bank")
    anchors = check_embeddings(anchors, name="firewall_anchors")
    if len(bank) != len(anchors):
        raise InputError(f"firewall_anchors: {len(anchors)} rows for {len(bank)} firewall_bank rows "
                         "(one anchor per erased identity)")
    if not (-1.0 <= float(threshold) <= 1.0):
        raise InputError(f"firewall_threshold: a cosine in [-1, 1], got {threshold}")
    return bank, anchors


def _initializer_map(module: nn.Module, proto) -> tuple[dict, list, dict]:
    """torch parameter name -> ONNX initializer (name, transform, shape, dtype, sha256).

    The classic exporter keeps a parameter's name when it is an initializer as is; constant
    folding renames the ones it transforms (a Linear weight feeding MatMul becomes its transpose
    `onnx::MatMul_123`, a GroupNorm weight a reshaped `onnx::Mul_45`), and identical values are
    merged into one initializer. Names are matched first, then values (as is, reshaped, or
    transposed); `shared` lists initializers that hold several parameters."""
    from onnx import numpy_helper

    by_name, by_digest = {}, defaultdict(list)
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        d = _digest(arr)
        by_name[init.name] = (d, list(arr.shape), arr.dtype.name)
        by_digest[d].append(init.name)
    mapping, unmapped = {}, []
    users = defaultdict(list)
    prefixes = getattr(module, "exported_prefixes", None)
    for name, p in module.named_parameters():
        if prefixes and not name.startswith(prefixes):
            continue
        a = p.detach().cpu().numpy()
        d = _digest(a)
        entry = None
        if name in by_name and by_name[name][0] == d:
            entry = (name, "none")
        elif by_digest.get(d):
            cand = by_digest[d][0]
            entry = (cand, "none" if by_name[cand][1] == list(a.shape) else "reshape")
        elif a.ndim == 2 and by_digest.get(_digest(a.T)):
            entry = (by_digest[_digest(a.T)][0], "transpose")
        if entry is None:
            unmapped.append(name)
            continue
        oname, transform = entry
        mapping[name] = {"onnx": oname, "transform": transform, "shape": by_name[oname][1],
                         "dtype": by_name[oname][2], "sha256": d[:32]}
        users[oname].append(name)
    shared = {k: v for k, v in users.items() if len(v) > 1}
    return mapping, unmapped, shared


def _export_part(module, args, path: Path, *, input_names, output_names, dynamic_axes, opset,
                 external_data, doc: str, metadata: dict) -> dict:
    """Trace `module` to `path`; re-save with all weights in one external file when large. Returns info."""
    import onnx

    scratch = path.parent / f".{path.stem}.scratch"
    scratch.mkdir()
    raw = scratch / path.name
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on python-side shape asserts, the exporter's deprecation
        torch.onnx.export(module, args, str(raw), dynamo=False, export_params=True, opset_version=opset,
                          do_constant_folding=True, keep_initializers_as_inputs=False,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    proto = onnx.load(str(raw), load_external_data=True)
    proto.doc_string = doc
    proto.producer_name = "fastforget"
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    weight_bytes = sum(int(np.prod(i.dims, dtype=np.int64)) * _elem_size(i.data_type)
                       for i in proto.graph.initializer)
    mapping, unmapped, shared = _initializer_map(module, proto)  # before saving: that moves data out
    ops = sorted({n.op_type for n in proto.graph.node})
    use_external = external_data if external_data is not None else weight_bytes > TWO_GB - _EXTERNAL_MARGIN
    location = None
    if use_external:
        location = path.name + ".data"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    shutil.rmtree(scratch)
    onnx.checker.check_model(str(path))  # by path: works for models over 2 GB with external data
    return {"file": path.name, "external_data": location, "weight_bytes": weight_bytes, "ops": ops,
            "inputs": {i.name: _io_spec(i) for i in proto.graph.input},
            "outputs": {o.name: _io_spec(o) for o in proto.graph.output},
            "initializers": mapping, "unmapped": unmapped, "shared": shared}


def _elem_size(data_type: int) -> int:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def _io_spec(value_info) -> dict:
    import onnx

    tt = value_info.type.tensor_type
    dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
    return {"dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name, "shape": dims}


# ORT-vs-torch parity at export: max |ORT - torch float32| <= rtol * max(1, max |torch|) on inputs the
# graph was not traced with. fp32 graphs differ from torch by reassociation only (measured 2e-6 on the
# demo model, outputs up to ~7). fp16 graphs carry fp16 weights and activations (unit roundoff 4.9e-4,
# accumulated over the depth of the text encoder and UNet): measured 3.0e-3 (conditioner) and 2.1-2.5e-3
# (UNet) on the demo model, i.e. 6e-4 and 4e-4 of the output scale; 2e-2 leaves a margin of 30x for
# deeper models while an fp16 overflow (inf / NaN) or a wrong graph is far outside it.
PARITY_RTOL = {"float32": 1e-3, "float16": 2e-2}


def _reference(module):
    """`module` itself if it is float32 on the CPU, else a float32 CPU copy (the model is not touched)."""
    p = next(module.parameters(), None)
    if p is None or (p.dtype == torch.float32 and p.device.type == "cpu"):
        return module
    return copy.deepcopy(module).float().cpu()


def _ort_parity(path: Path, module, feeds: dict) -> tuple[float, float]:
    """(max |ORT(CPU) - torch float32|, max |torch|) on `feeds` (a batch size the graph was not traced
    with). Each input goes to ORT in the graph's dtype; torch gets the same values in float32."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    ort_in, ref_in = {}, []
    for k, v in feeds.items():
        a = v.detach().cpu().float().numpy()
        if types.get(k) == "tensor(float16)":
            a = a.astype(np.float16)
        ort_in[k] = a
        ref_in.append(torch.from_numpy(a.astype(np.float32)))
    got = sess.run(None, ort_in)[0].astype(np.float32)
    with torch.no_grad():
        ref = module(*ref_in).float().cpu().numpy()
    diff = np.abs(got - ref).max() if got.shape == ref.shape else np.inf
    return float(diff), float(np.abs(ref).max())


# ---------------------------------------------------------------- public
def to_onnx(model_or_dir, out_dir, *, opset: int = 17, fp16: bool = False, firewall: bool = False,
            firewall_bank=None, firewall_anchors=None, firewall_threshold: float = 0.5, patch=None,
            base=None, external_data: bool | None = None, verify: bool = True, overwrite: bool = False) -> Path:
    """Export `model_or_dir` (an Arc2FaceModel, a model folder, or "demo") to ONNX in `out_dir`.

    patch: the Patch (or patch.safetensors) the model was erased with; recorded (fingerprint,
      and the file itself for TensorRT refit); applied to a copy first if the model is unedited.
    firewall: put the identity firewall in the conditioner graph; needs firewall_bank (the erased
      identities' embeddings, K x 512) and firewall_anchors (K x 512). It stores those embeddings
      in the graph (see the README: a privacy trade-off). Off by default.
    fp16: half-precision weights and activations (inputs/outputs of the UNet and decoder are
      float16; the conditioner takes float32 embeddings).
    external_data: weights in `<part>.onnx.data` beside the graph; default: only for parts over 2 GB.
    verify: run each part once with ONNX Runtime (CPU) on inputs it was not traced with and compare
      with the torch model in float32 (fp16 graphs too); the max |diff| and the tolerance are
      recorded in the manifest (`parity`, `parity_check`) and ExportParityError is raised (nothing
      written) when a part is off by more than PARITY_RTOL * max(1, max |torch output|).
    Written to a temporary folder and renamed into place; an existing out_dir needs overwrite=True.
    """
    import onnx  # noqa: F401  (fail early with ImportError if missing)

    from fastforget import __version__
    from fastforget.io import atomic_directory
    from fastforget.models.arc2face import PROMPT
    from fastforget.patch import fingerprint_embeddings

    from fastforget.io import check_output_path

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 14:
        raise InputError(f"opset: the UNet's attention needs an integer opset >= 14, got {opset!r}")
    if not firewall and (firewall_bank is not None or firewall_anchors is not None):
        raise InputError("firewall_bank / firewall_anchors given but firewall=False; pass firewall=True")
    check_output_path(out_dir, overwrite, "out_dir")  # before the model is loaded or traced
    model, patch = resolve_model_and_patch(model_or_dir, patch, base=base)
    if hasattr(model, "synthesis") and hasattr(model, "invert"):  # a StyleGAN2: mapping + synthesis (export/gan.py)
        from fastforget.export.gan import to_onnx_gan

        if firewall:
            raise InputError("firewall: the identity firewall guards an embedding-conditioned graph; a StyleGAN2 "
                             "has no identity input to guard (its erasure is in the synthesis weights); "
                             "export it with firewall=False")
        return to_onnx_gan(model, out_dir, patch=patch, opset=opset, fp16=fp16, verify=verify, overwrite=overwrite)
    if hasattr(model, "id_tokens"):  # a portrait generator: its image projection only (export/portrait.py)
        from fastforget.export.portrait import to_onnx_portrait

        return to_onnx_portrait(model, out_dir, patch=patch, opset=opset, fp16=fp16, firewall=firewall,
                                firewall_bank=firewall_bank, firewall_anchors=firewall_anchors,
                                firewall_threshold=firewall_threshold, verify=verify, overwrite=overwrite)
    bank = anchors = None
    if firewall:
        bank, anchors = _check_bank(firewall_bank, firewall_anchors, firewall_threshold)
        if patch is not None and patch.metadata.get("targets"):
            known = set(patch.metadata["targets"])
            if not known & set(fingerprint_embeddings(bank)):
                warnings.warn("firewall_bank: none of its embeddings has the fingerprint of a target recorded "
                              "in the patch (different salt, or a bank for another erasure?)", stacklevel=2)
    dtype = torch.float16 if fp16 else torch.float32
    dev = model.device
    if fp16 and dev.type == "cpu":
        log.info("fp16 export traced on CPU")
    src = source_hashes(model)

    c = model.unet.config
    n_trace, n_check = 2, 3
    length, width = int(model._prompt_ids.shape[1]), int(model.text_width)
    sample_shape = [int(c.in_channels), int(c.sample_size), int(c.sample_size)]
    meta_common = {"fastforget_version": __version__, "patch_fingerprint": patch.fingerprint() if patch else "",
                   "firewall": str(bool(firewall))}
    manifest = {
        "format": FORMAT, "fastforget_version": __version__, "family": model.family,
        "dtype": "float16" if fp16 else "float32", "opset": opset, "prompt": PROMPT,
        "resolution": int(model.resolution), "unshuffle": int(model.unshuffle), "sample_shape": sample_shape,
        "out_channels": int(c.out_channels), "text_length": length, "text_width": width, "embedding_dim": 512,
        "vae_scaling_factor": float(model.vae.config.scaling_factor) if model.vae is not None else None,
        "scheduler": scheduler_config(model), "null_condition": "null_condition.npy",
        "parts": {}, "parity": {},
        "patch": None if patch is None else {
            "fingerprint": patch.fingerprint(), "method": patch.metadata.get("method"),
            "tensors": len(patch.names), "parameters": patch.num_parameters(), "file": "patch.safetensors",
            "targets": patch.metadata.get("targets"), "anchors": patch.metadata.get("anchors")},
        "source": src,
        "firewall": {"enabled": bool(firewall)},
    }
    if firewall:
        manifest["firewall"].update({
            "identities": int(len(bank)), "threshold": float(firewall_threshold),
            "targets": fingerprint_embeddings(bank), "anchors": fingerprint_embeddings(anchors),
            "stores": "the K erased identities' unit embeddings and their anchors, as constants of conditioner.onnx",
            "rule": "e = normalize(x); k = argmax(bank @ e); if bank[k] . e >= threshold: e = anchors[k]"})

    gen = torch.Generator().manual_seed(0)
    parity = _ParityCheck(manifest, fp16, n_check, sample_shape, length, width) if verify else None
    with atomic_directory(out_dir, overwrite=overwrite) as tmp, torch.no_grad():
        # conditioner
        cond = ConditionerGraph(model, dtype, bank, anchors, firewall_threshold).eval()
        emb = F.normalize(torch.randn(n_trace, 512, generator=gen), dim=1).to(dev)
        manifest["parts"]["conditioner"] = _export_part(
            cond, (emb,), tmp / "conditioner.onnx", input_names=["embedding"], output_names=["states"],
            dynamic_axes={"embedding": {0: "batch"}, "states": {0: "batch"}}, opset=opset,
            external_data=external_data, doc="ArcFace embedding (N, 512) -> text-encoder states (N, L, D)"
            + (" behind the identity firewall" if firewall else ""), metadata={**meta_common, "part": "conditioner"})
        if parity is not None:  # each part is checked as soon as it exists: a bad one stops the export there
            parity(tmp, "conditioner", ConditionerGraph(model, torch.float32, bank, anchors, firewall_threshold).eval()
                   if fp16 else cond)
        # unet
        unet = model.unet if dtype == model.dtype else copy.deepcopy(model.unet).to(dtype)
        ug = UNetGraph(unet).eval()
        x = torch.randn(n_trace, *sample_shape, generator=gen).to(dev, dtype)
        t = torch.full((n_trace,), 500.0, device=dev)
        states = torch.randn(n_trace, length, width, generator=gen).to(dev, dtype)
        names = ["sample", "timestep", "encoder_hidden_states", "noise_pred"]
        manifest["parts"]["unet"] = _export_part(
            ug, (x, t, states), tmp / "unet.onnx", input_names=names[:3], output_names=names[3:],
            dynamic_axes={k: {0: "batch"} for k in names}, opset=opset, external_data=external_data,
            doc="noise prediction: sample (B, C, S, S), timestep (B,) float32, encoder_hidden_states (B, L, D)",
            metadata={**meta_common, "part": "unet"})
        if parity is not None:
            parity(tmp, "unet", UNetGraph(model.unet).eval())
        # vae decoder
        vg = None
        if model.vae is not None:
            vae = model.vae if dtype == next(model.vae.parameters()).dtype else copy.deepcopy(model.vae).to(dtype)
            vg = VAEDecoderGraph(vae).eval()
            z = torch.randn(n_trace, *sample_shape, generator=gen).to(dev, dtype)
            manifest["parts"]["vae_decoder"] = _export_part(
                vg, (z,), tmp / "vae_decoder.onnx", input_names=["latent"], output_names=["image"],
                dynamic_axes={"latent": {0: "batch"}, "image": {0: "batch"}}, opset=opset,
                external_data=external_data, doc="latent (N, C, S, S) -> image (N, 3, H, W), unclamped",
                metadata={**meta_common, "part": "vae_decoder"})
            if parity is not None:
                parity(tmp, "vae_decoder", VAEDecoderGraph(model.vae).eval())
        else:
            manifest["parts"]["vae_decoder"] = None
        # null condition: the empty prompt through the plain text encoder (not the id projection)
        np.save(tmp / "null_condition.npy", model.null_condition(1).float().cpu().numpy())
        if patch is not None:
            patch.save(tmp / "patch.safetensors")
        if parity is not None:
            manifest["parity_check"] = parity.record
        for part in manifest["parts"].values():
            if part is not None:
                part["sha256"] = file_sha256(tmp / part["file"])
                if part["external_data"]:
                    part["external_data_sha256"] = file_sha256(tmp / part["external_data"])
        (tmp / MANIFEST).write_text(json.dumps(_jsonable(manifest), indent=1, sort_keys=True))
    return Path(out_dir)


class _ParityCheck:
    """ORT (CPU) vs the torch model in float32, part by part; ExportParityError when a part is off.
    Inputs come from their own seeded generator, with a batch size the graphs were not traced with."""

    def __init__(self, manifest, fp16: bool, n_check: int, sample_shape, length: int, width: int):
        g = torch.Generator().manual_seed(1)
        self.manifest, self.dtype = manifest, "float16" if fp16 else "float32"
        self.rtol = PARITY_RTOL[self.dtype]
        self.feeds = {
            "conditioner": {"embedding": F.normalize(torch.randn(n_check, 512, generator=g), dim=1)},
            "unet": {"sample": torch.randn(n_check, *sample_shape, generator=g),
                     "timestep": torch.linspace(999.0, 1.0, n_check),
                     "encoder_hidden_states": torch.randn(n_check, length, width, generator=g)},
            "vae_decoder": {"latent": torch.randn(n_check, *sample_shape, generator=g)},
        }
        self.record = {
            "reference": f"the torch model in float32 on the CPU, same inputs (rounded to the graph's input dtype), "
                         f"batch of {n_check}", "runtime": "onnxruntime CPUExecutionProvider", "dtype": self.dtype,
            "rtol": self.rtol, "rule": "max |ORT - torch| <= rtol * max(1, max |torch|)",
            "tolerance": {}, "reference_max_abs": {}, "passed": True}

    def __call__(self, tmp: Path, part: str, graph) -> None:
        from fastforget.export.errors import ExportParityError

        diff, scale = _ort_parity(tmp / self.manifest["parts"][part]["file"], _reference(graph), self.feeds[part])
        tol = self.rtol * max(1.0, scale)
        self.manifest["parity"][part] = diff
        self.record["tolerance"][part] = tol
        self.record["reference_max_abs"][part] = scale
        if not np.isfinite(diff) or diff > tol:
            raise ExportParityError(
                f"{part}: the exported {self.dtype} graph differs from the torch model by max |diff| {diff:.3g} "
                f"(tolerance {tol:.3g} = {self.rtol:g} x max(1, {scale:.3g})); nothing was written"
                + ("; export in float32 (fp16=False), or check the model for activations beyond float16's range"
                   if self.dtype == "float16" else ""))


def load_bank(path) -> tuple[np.ndarray, np.ndarray]:
    """A firewall bank file: .npz with arrays `targets` (K, 512) and `anchors` (K, 512)."""
    path = Path(path)
    if not path.is_file():
        from fastforget.errors import ModelLoadError

        raise ModelLoadError(f"firewall bank not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz bank ({str(exc)[:200]})") from None
    if not hasattr(z, "files"):
        raise InputError(f"{path}: a single array; a bank is an .npz with arrays `targets` and `anchors`")
    with z:
        missing = {"targets", "anchors"} - set(z.files)
        if missing:
            raise InputError(f"{path}: missing array(s) {sorted(missing)}; a bank .npz holds `targets` "
                             "(K, 512: the erased identities) and `anchors` (K, 512: who each becomes)")
        return z["targets"].astype(np.float32), z["anchors"].astype(np.float32)


def save_bank(path, targets, anchors, overwrite: bool = False) -> Path:
    """Write a bank .npz (targets, anchors) for `fastforget export --firewall --bank`, atomically
    (`.npz` is appended to a path without it, as numpy.savez does)."""
    import io

    from fastforget.io import atomic_write_bytes, check_output_path
    from fastforget.models.arc2face import check_embeddings

    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    check_output_path(path, overwrite, "path", kind="file")
    t = check_embeddings(targets, name="targets").numpy()
    a = check_embeddings(anchors, name="anchors").numpy()
    if len(t) != len(a):
        raise InputError(f"anchors: {len(a)} rows for {len(t)} targets")
    buf = io.BytesIO()
    np.savez(buf, targets=t, anchors=a)
    return atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite, name="path")
