"""Serve an exported model with ONNX Runtime only: numpy + onnxruntime, no torch.

    pipe = OnnxPipeline("out_dir")                  # TensorRT / CUDA / CPU providers, whichever exist
    images = pipe.generate(emb, seed=0, steps=25, guidance=3.0)   # PIL list (output_type="np" / "pt" as diffusers)
    x = pipe.sample(emb, seed=0)                                  # raw float32 (N, 3, H, W) in [-1, 1]

`generate` is `Arc2FaceModel.generate_tensor` re-implemented: conditioner graph, classifier-free
guidance against the stored empty-prompt states (null_condition.npy), the UNet graph stepped by a
numpy DPM-Solver++ that matches diffusers' DPMSolverMultistepScheduler, then the VAE decoder graph
or a numpy pixel_shuffle, clamped to [-1, 1]. Pass `noise=` (the torch model's
`initial_noise(n, seed).numpy()`) to reproduce the torch model's images; without it, noise is
drawn with numpy (image i from `np.random.default_rng(seed + i)`), so images differ from torch's
at the same seed by the random numbers only, not by the model.

This module imports neither torch nor fastforget's core on its normal path (errors import
fastforget.errors lazily and fall back to builtin exceptions).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._compat import FORMAT, TRT_FORMAT, check_embeddings_np, error, pixel_shuffle, read_manifest
from .scheduler import make_scheduler

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers() -> list[str]:
    """Whatever of TensorRT, CUDA, CPU execution providers this onnxruntime build offers, in that order."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in have] or ["CPUExecutionProvider"]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded as Arc2FaceModel.generate does."""
    return ((images.transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)


class OnnxPipeline:
    """ONNX Runtime sessions over a `to_onnx` folder; numpy in, numpy out."""

    def __init__(self, out_dir, providers=None, *, threads: int | None = None, session_options=None):
        import onnxruntime as ort

        self.dir = Path(out_dir)
        self.manifest = read_manifest(self.dir, expect=(FORMAT,))
        if self.manifest.get("format") == TRT_FORMAT:  # pragma: no cover - guarded by expect
            raise error("ModelLoadError", f"{self.dir}: TensorRT engines; OnnxPipeline needs the ONNX folder")
        self.providers = list(providers) if providers is not None else default_providers()
        so = session_options
        if so is None:
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads = int(threads)
                so.inter_op_num_threads = 1
        self.sessions = {}
        for name, part in self.manifest["parts"].items():
            if part is None:
                continue
            path = self.dir / part["file"]
            if not path.is_file():
                raise error("ModelLoadError", f"{self.dir}: {part['file']} is missing")
            self.sessions[name] = ort.InferenceSession(str(path), sess_options=so, providers=self.providers)
        for need in ("conditioner", "unet"):
            if need not in self.sessions:
                raise error("ModelLoadError", f"{self.dir}: the manifest has no {need} part")
        null = self.dir / self.manifest.get("null_condition", "null_condition.npy")
        if not null.is_file():
            raise error("ModelLoadError", f"{self.dir}: {null.name} is missing (the empty-prompt states)")
        self.null = np.load(null, allow_pickle=False).astype(np.float32)
        self.unshuffle = int(self.manifest.get("unshuffle", 1))
        self.sample_shape = tuple(self.manifest["sample_shape"])
        self.resolution = int(self.manifest["resolution"])
        self.firewall = bool(self.manifest.get("firewall", {}).get("enabled"))

    # ------------------------------------------------------------ parts
    def _run(self, part: str, feeds: dict) -> np.ndarray:
        sess = self.sessions[part]
        cast = {}
        for i in sess.get_inputs():
            want = np.float16 if i.type == "tensor(float16)" else np.float32
            cast[i.name] = np.ascontiguousarray(feeds[i.name], dtype=want)
        return sess.run(None, cast)[0].astype(np.float32, copy=False)

    def condition(self, embeddings) -> np.ndarray:
        """Text-encoder states (N, L, D) of ArcFace embeddings (N, 512), through the firewall if exported with one."""
        emb = check_embeddings_np(embeddings)
        return self._run("conditioner", {"embedding": emb})

    def null_condition(self, n: int = 1) -> np.ndarray:
        return np.broadcast_to(self.null, (n,) + self.null.shape[1:])

    def unet(self, sample: np.ndarray, timestep, states: np.ndarray) -> np.ndarray:
        t = np.full((sample.shape[0],), float(timestep), dtype=np.float32)
        return self._run("unet", {"sample": sample, "timestep": t, "encoder_hidden_states": states})

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Sample space -> images (N, 3, H, W), clamped to [-1, 1]."""
        if "vae_decoder" in self.sessions:
            x = self._run("vae_decoder", {"latent": z})
        else:
            x = pixel_shuffle(np.asarray(z, dtype=np.float32), self.unshuffle)
        return np.clip(x, -1.0, 1.0)

    def initial_noise(self, n: int, seed=0) -> np.ndarray:
        """numpy noise, image i from default_rng(seed + i) (or seed[i]): not torch's random numbers."""
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(n)]
        return np.stack([np.random.default_rng(s).standard_normal(self.sample_shape, dtype=np.float32)
                         for s in seeds])

    # ------------------------------------------------------------ sampling
    def generate(self, embeddings, seed=0, steps: int = 25, guidance: float = 3.0, noise=None,
                 batch_size: int | None = None, output_type: str = "pil"):
        """Images in diffusers' `output_type` convention, as `model.generate` returns them: "pil" (list of
        PIL images), "np" (float32 (N, H, W, 3) in [0, 1]), "pt" (torch float32 (N, 3, H, W) in [0, 1]).
        noise: optional (N, C, S, S) initial noise; give the torch model's to reproduce its images."""
        if output_type not in ("pil", "np", "pt"):
            raise error("InputError", f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
        x = self.sample(embeddings, seed=seed, steps=steps, guidance=guidance, noise=noise, batch_size=batch_size)
        x01 = np.clip(x / 2 + 0.5, 0, 1).astype(np.float32)
        if output_type == "pt":
            import torch

            return torch.from_numpy(x01)
        nhwc = np.ascontiguousarray(x01.transpose(0, 2, 3, 1))
        if output_type == "np":
            return nhwc
        from PIL import Image

        return [Image.fromarray(a) for a in (nhwc * 255).round().astype(np.uint8)]

    def sample(self, embeddings, seed=0, steps: int = 25, guidance: float = 3.0, noise=None,
               batch_size: int | None = None) -> np.ndarray:
        """Raw samples (N, 3, H, W) float32 in [-1, 1] (Arc2Face defaults: 25 DPM-Solver++ steps, CFG 3),
        numpy only. noise: optional (N, C, S, S) initial noise (the torch model's reproduces its images)."""
        cond = self.condition(embeddings)
        n = cond.shape[0]
        if noise is None:
            noise = self.initial_noise(n, seed)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != (n,) + self.sample_shape:
            raise error("InputError", f"noise: expected shape {(n,) + self.sample_shape}, got {noise.shape}")
        bs = int(batch_size or n)
        use_cfg = guidance is not None and guidance != 1.0
        out = []
        for i in range(0, n, bs):
            c = cond[i:i + bs]
            b = c.shape[0]
            sched = make_scheduler(self.manifest["scheduler"])
            sched.set_timesteps(steps)
            z = noise[i:i + bs] * np.float32(sched.init_noise_sigma)
            states = np.concatenate([self.null_condition(b), c]) if use_cfg else c
            for t in sched.timesteps:
                inp = np.concatenate([z, z]) if use_cfg else z
                eps = self.unet(inp, t, states)
                if use_cfg:
                    eu, ec = eps[:b], eps[b:]
                    eps = eu + np.float32(guidance) * (ec - eu)
                z = sched.step(eps, t, z)
            out.append(self.decode(z))
        return np.concatenate(out)

    def generate_uint8(self, embeddings, **kw) -> np.ndarray:
        """Like generate, as uint8 (N, H, W, 3)."""
        return to_uint8(self.sample(embeddings, **kw))

    def __repr__(self):
        return (f"OnnxPipeline({str(self.dir)!r}, parts={sorted(self.sessions)}, firewall={self.firewall}, "
                f"providers={self.providers})")
