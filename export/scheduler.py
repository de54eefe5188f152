"""DPM-Solver++ multistep in numpy: diffusers' DPMSolverMultistepScheduler, step for step, without torch.

The serving runtime (`OnnxPipeline`) must not import torch, and diffusers' scheduler needs it, so
this re-implements the deterministic part of `DPMSolverMultistepScheduler` (diffusers 0.3x):
algorithm_type "dpmsolver++" (the default) or "dpmsolver"; solver_order 1, 2 (the default) or 3;
solver_type "midpoint" or "heun"; lower_order_final / euler_at_final / final_sigmas_type;
timestep_spacing "linspace" / "leading" / "trailing" with steps_offset; beta schedules "linear",
"scaled_linear", "squaredcos_cap_v2" or trained_betas; rescale_betas_zero_snr;
lambda_min_clipped; use_karras_sigmas; prediction_type "epsilon" / "sample" / "v_prediction";
thresholding; variance_type "learned[_range]". Arithmetic follows diffusers' float32 order so the
two agree to ~1e-6 (tested to 1e-5). The SDE variants and the exponential / beta / lu / flow
sigma schedules raise (they are not what Arc2Face or the testbed use).

Only numpy is imported here (the module is loadable on a serving box without torch).
"""
from __future__ import annotations

import math

import numpy as np

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
    rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
)

F32 = np.float32


def _error(msg: str) -> Exception:
    """fastforget's InputError when fastforget is importable; a plain ValueError on a torch-free box."""
    try:
        from fastforget.errors import InputError
    except ImportError:  # pragma: no cover - serving box without the full package
        return ValueError(msg)
    return InputError(msg)


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=F32)


BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
             "rescale_betas_zero_snr")


def _betas(cfg: dict) -> np.ndarray:
    """diffusers' beta schedules in float32 (shared by the numpy DPM-Solver and DDIM)."""
    n = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=F32)
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float64).astype(F32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = (np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float64)
                 .astype(F32) ** 2)
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise _error(f"scheduler: beta_schedule {cfg['beta_schedule']!r} is not supported")
    return _rescale_zero_terminal_snr(betas) if cfg["rescale_betas_zero_snr"] else betas


def _alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double
    return np.cumprod((F32(1.0) - betas).astype(np.float64)).astype(F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas_bar_sqrt = np.sqrt(_alphas_cumprod(betas))
    a0, at = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - at) * (a0 / (a0 - at))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (F32(1.0) - alphas).astype(F32)


class DPMSolverMultistepNumpy:
    """`set_timesteps(n)` then, for each `t` in `timesteps`, `sample = step(model_output, t, sample)`.

    `config` is a diffusers scheduler config dict (e.g. `scheduler.config`, or the `scheduler` entry of
    an export manifest); keys starting with "_" and unknown keys are ignored."""

    init_noise_sigma = 1.0
    order = 1

    def __init__(self, config: dict | None = None, **overrides):
        cfg = dict(DEFAULTS)
        cfg.update({k: v for k, v in dict(config or {}).items() if k in DEFAULTS})
        cfg.update(overrides)
        self.config = cfg
        for flag in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                     "use_dynamic_shifting"):
            if cfg[flag]:
                raise _error(f"scheduler: {flag}=True is not supported by the numpy DPM-Solver "
                             "(supported: the default sigmas or use_karras_sigmas)")
        if cfg["algorithm_type"] == "deis":
            cfg["algorithm_type"] = "dpmsolver++"
        if cfg["algorithm_type"] not in ("dpmsolver++", "dpmsolver"):
            raise _error(f"scheduler: algorithm_type {cfg['algorithm_type']!r} is not supported by the numpy "
                         "DPM-Solver (the SDE variants draw torch noise); use 'dpmsolver++'")
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
            cfg["solver_type"] = "midpoint"
        if cfg["solver_type"] not in ("midpoint", "heun"):
            raise _error(f"scheduler: solver_type {cfg['solver_type']!r} is not supported")
        if cfg["solver_order"] not in (1, 2, 3):
            raise _error(f"scheduler: solver_order must be 1, 2 or 3, got {cfg['solver_order']}")
        if cfg["prediction_type"] not in ("epsilon", "sample", "v_prediction"):
            raise _error(f"scheduler: prediction_type {cfg['prediction_type']!r} is not supported")
        if cfg["algorithm_type"] == "dpmsolver" and cfg["final_sigmas_type"] == "zero":
            raise _error("scheduler: final_sigmas_type 'zero' needs algorithm_type 'dpmsolver++'")
        self.betas = _betas(cfg)
        self.alphas_cumprod = _alphas_cumprod(self.betas)
        if cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = F32(2.0 ** -24)
        alpha_t = np.sqrt(self.alphas_cumprod)
        sigma_t = np.sqrt(F32(1.0) - self.alphas_cumprod)
        self.lambda_t = (np.log(alpha_t) - np.log(sigma_t)).astype(F32)
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None

    # ------------------------------------------------------------ schedule
    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        cfg = self.config
        steps = int(num_inference_steps)
        if steps < 1:
            raise _error(f"scheduler: steps must be >= 1, got {num_inference_steps}")
        n_train = int(cfg["num_train_timesteps"])
        clipped_idx = int(np.searchsorted(np.flip(self.lambda_t), cfg["lambda_min_clipped"], side="left"))
        last = n_train - clipped_idx
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += int(cfg["steps_offset"])
        elif spacing == "trailing":
            ratio = n_train / steps
            timesteps = np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
        else:
            raise _error(f"scheduler: timestep_spacing {spacing!r} is not supported")
        sigmas = np.sqrt((F32(1.0) - self.alphas_cumprod) / self.alphas_cumprod).astype(F32)
        log_sigmas = np.log(sigmas)
        if cfg["use_karras_sigmas"]:
            sigmas = self._karras(np.flip(sigmas).copy(), steps)
            timesteps = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if cfg["final_sigmas_type"] == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            sigma_last = float(np.sqrt((F32(1.0) - ac0) / ac0))
        elif cfg["final_sigmas_type"] == "zero":
            sigma_last = 0.0
        else:
            raise _error(f"scheduler: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported")
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * int(cfg["solver_order"])
        self.lower_order_nums = 0
        self._step_index = None
        return self.timesteps

    @staticmethod
    def _karras(in_sigmas: np.ndarray, steps: int) -> np.ndarray:
        sigma_min, sigma_max = float(in_sigmas[-1]), float(in_sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, steps)
        return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho

    @staticmethod
    def _sigma_to_t(sigma, log_sigmas):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))

    @staticmethod
    def _alpha_sigma(sigma):
        sigma = F32(sigma)
        alpha_t = F32(1.0) / np.sqrt(sigma ** 2 + F32(1.0))
        return alpha_t, sigma * alpha_t

    def _init_step_index(self, timestep) -> None:
        idx = np.nonzero(self.timesteps == timestep)[0]
        if len(idx) == 0:
            self._step_index = len(self.timesteps) - 1
        elif len(idx) > 1:  # diffusers takes the second occurrence of a duplicated first timestep
            self._step_index = int(idx[1])
        else:
            self._step_index = int(idx[0])

    @property
    def step_index(self):
        return self._step_index

    def scale_model_input(self, sample, timestep=None):
        return sample

    # ------------------------------------------------------------ one step
    def _threshold(self, x0: np.ndarray) -> np.ndarray:
        b = x0.shape[0]
        flat = x0.reshape(b, -1).astype(F32)
        s = np.quantile(np.abs(flat), self.config["dynamic_thresholding_ratio"], axis=1).astype(F32)
        s = np.clip(s, 1, self.config["sample_max_value"])[:, None]
        return (np.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg["variance_type"] in ("learned", "learned_range"):
            model_output = model_output[:, :3]
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index])
        pt = cfg["prediction_type"]
        if cfg["algorithm_type"] == "dpmsolver++":
            if pt == "epsilon":
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif pt == "sample":
                x0 = model_output
            else:
                x0 = alpha_t * sample - sigma_t * model_output
            return self._threshold(x0) if cfg["thresholding"] else x0
        if pt == "epsilon":
            eps = model_output
        elif pt == "sample":
            eps = (sample - alpha_t * model_output) / sigma_t
        else:
            eps = alpha_t * model_output + sigma_t * sample
        if cfg["thresholding"]:
            x0 = self._threshold((sample - sigma_t * eps) / alpha_t)
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def _lambda(self, i):
        a, s = self._alpha_sigma(self.sigmas[i])
        with np.errstate(divide="ignore"):  # the final sigma is 0: lambda = inf, as in diffusers
            return a, s, np.log(a) - np.log(s)

    def _first_order(self, m0, sample):
        i = self._step_index
        alpha_t, sigma_t, lam_t = self._lambda(i + 1)
        alpha_s, sigma_s, lam_s = self._lambda(i)
        h = lam_t - lam_s
        if self.config["algorithm_type"] == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - F32(1.0))) * m0
        return (alpha_t / alpha_s) * sample - (sigma_t * (np.exp(h) - F32(1.0))) * m0

    def _second_order(self, outs, sample):
        i = self._step_index
        alpha_t, sigma_t, lam_t = self._lambda(i + 1)
        alpha_s0, sigma_s0, lam_s0 = self._lambda(i)
        _, _, lam_s1 = self._lambda(i - 1)
        m0, m1 = outs[-1], outs[-2]
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        d0, d1 = m0, (F32(1.0) / r0) * (m0 - m1)
        one, half = F32(1.0), F32(0.5)
        if self.config["algorithm_type"] == "dpmsolver++":
            if self.config["solver_type"] == "midpoint":
                return ((sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - one)) * d0
                        - half * (alpha_t * (np.exp(-h) - one)) * d1)
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - one)) * d0
                    + (alpha_t * ((np.exp(-h) - one) / h + one)) * d1)
        if self.config["solver_type"] == "midpoint":
            return ((alpha_t / alpha_s0) * sample - (sigma_t * (np.exp(h) - one)) * d0
                    - half * (sigma_t * (np.exp(h) - one)) * d1)
        return ((alpha_t / alpha_s0) * sample - (sigma_t * (np.exp(h) - one)) * d0
                - (sigma_t * ((np.exp(h) - one) / h - one)) * d1)

    def _third_order(self, outs, sample):
        i = self._step_index
        alpha_t, sigma_t, lam_t = self._lambda(i + 1)
        alpha_s0, sigma_s0, lam_s0 = self._lambda(i)
        _, _, lam_s1 = self._lambda(i - 1)
        _, _, lam_s2 = self._lambda(i - 2)
        m0, m1, m2 = outs[-1], outs[-2], outs[-3]
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        one, half = F32(1.0), F32(0.5)
        d0 = m0
        d1_0, d1_1 = (one / r0) * (m0 - m1), (one / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (one / (r0 + r1)) * (d1_0 - d1_1)
        if self.config["algorithm_type"] == "dpmsolver++":
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - one)) * d0
                    + (alpha_t * ((np.exp(-h) - one) / h + one)) * d1
                    - (alpha_t * ((np.exp(-h) - one + h) / h ** 2 - half)) * d2)
        return ((alpha_t / alpha_s0) * sample - (sigma_t * (np.exp(h) - one)) * d0
                - (sigma_t * ((np.exp(h) - one) / h - one)) * d1
                - (sigma_t * ((np.exp(h) - one - h) / h ** 2 - half)) * d2)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        """One solver step; returns the previous sample (float32, or model_output's dtype)."""
        if self.num_inference_steps is None:
            raise _error("scheduler: call set_timesteps(steps) before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        n = len(self.timesteps)
        lower_final = (self._step_index == n - 1) and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero")
        lower_second = (self._step_index == n - 2) and cfg["lower_order_final"] and n < 15
        out_dtype = model_output.dtype
        sample = np.asarray(sample, dtype=F32)
        m = self.convert_model_output(np.asarray(model_output, dtype=F32), sample)
        order = int(cfg["solver_order"])
        for i in range(order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = m
        if order == 1 or self.lower_order_nums < 1 or lower_final:
            prev = self._first_order(m, sample)
        elif order == 2 or self.lower_order_nums < 2 or lower_second:
            prev = self._second_order(self.model_outputs, sample)
        else:
            prev = self._third_order(self.model_outputs, sample)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev.astype(out_dtype, copy=False)


class DDIMNumpy:
    """diffusers' DDIMScheduler with eta = 0 in numpy (the testbed's pixel-space sampler: x0 clipped to
    [-clip_sample_range, clip_sample_range] when clip_sample). Same interface as DPMSolverMultistepNumpy."""

    init_noise_sigma = 1.0
    order = 1

    def __init__(self, config: dict | None = None):
        cfg = {k: DEFAULTS[k] for k in BETA_KEYS}
        cfg.update({"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0,
               "timestep_spacing": "leading", "prediction_type": "epsilon", "num_train_timesteps": 1000,
               "thresholding": False})
        cfg.update({k: v for k, v in dict(config or {}).items() if not k.startswith("_")})
        if cfg["prediction_type"] != "epsilon" or cfg["thresholding"]:
            raise _error("scheduler: the numpy DDIM supports epsilon prediction without thresholding")
        self.config = cfg
        self.alphas_cumprod = _alphas_cumprod(_betas(cfg))
        self.final_alpha_cumprod = F32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.timesteps = None

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n_train, steps = int(self.config["num_train_timesteps"]), int(num_inference_steps)
        if steps < 1:
            raise _error(f"scheduler: steps must be >= 1, got {num_inference_steps}")
        spacing = self.config["timestep_spacing"]
        if spacing == "leading":
            ts = (np.arange(0, steps) * (n_train // steps)).round()[::-1].astype(np.int64) + int(self.config["steps_offset"])
        elif spacing == "trailing":
            ts = np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
        else:
            raise _error(f"scheduler: timestep_spacing {spacing!r} is not supported")
        self.num_inference_steps, self.timesteps = steps, ts
        return ts

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        t = int(timestep)
        prev_t = t - int(self.config["num_train_timesteps"]) // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0 = (sample - np.sqrt(F32(1) - a_t) * model_output) / np.sqrt(a_t)
        if self.config["clip_sample"]:
            r = F32(self.config["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        return (np.sqrt(a_prev) * x0 + np.sqrt(F32(1) - a_prev) * model_output).astype(np.float32)


def make_scheduler(config: dict):
    """The numpy sampler matching the exported model's diffusers scheduler class."""
    name = dict(config or {}).get("_class_name", "DPMSolverMultistepScheduler")
    if name == "DDIMScheduler":
        return DDIMNumpy(config)
    if name == "DPMSolverMultistepScheduler":
        return DPMSolverMultistepNumpy(config)
    raise _error(f"scheduler: {name} has no numpy implementation (supported: DPMSolverMultistep, DDIM)")
