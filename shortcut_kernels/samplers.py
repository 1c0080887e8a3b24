"""The linear form of a diffusers scheduler's update.

With the model output held fixed, every sampler update this module knows is affine in the
samples and model outputs of the current and earlier calls:

    x_{i+1} = sum_j x[j] * x_j  +  sum_j out[j] * out_j  +  noise * z_i

where ``x_j`` is the sample passed to call ``j`` (``x_0`` = the initial latent, already
scaled by ``init_noise_sigma``), ``out_j`` the raw model output of call ``j`` (eps, v,
x0 or flow velocity, as the scheduler's ``prediction_type`` says) and ``z_i`` a standard
normal draw (DDPM, DDIM with eta > 0). One-step samplers (DDIM, DDPM, Euler, DPM-Solver++
first order, flow-matching Euler) only have terms for call ``i``: ``x_{i+1} = a*x_i +
b*out_i (+ noise*z_i)``, which is exactly what ``guided_step`` computes. Multistep samplers
(DPM-Solver++ 2M, PLMS) carry earlier calls' terms too; SDO's backward recurrence needs
all of them.

Each step also records its call's *held* quantity ``h_i = held[0]*x_i + held[1]*out_i``: the
model's noise prediction eps (flow matching: the velocity, as eps is not a function of the
output at sigma = 1), whatever the model predicts. SDO's shortcut holds the other calls' ``h``
constant (its derivation holds the noise prediction), so that a v or x0 model gets the same
gradient as the eps model it re-expresses; ``Plan`` writes the updates in (samples, held) for
its recurrences. For eps models ``held = (0, 1)``: ``h`` is the output.

    scheduler.set_timesteps(50)
    steps = linear_steps(scheduler)          # one LinearStep per denoiser call
    a, b = step_coefficients(scheduler, 10)  # one-step samplers: the (a, b) of guided_step

The coefficients are derived from the scheduler's own tables (alphas_cumprod, sigmas,
timesteps) and checked against its ``step()`` in tests/test_samplers.py. Nothing here
mutates the scheduler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import Tensor

from .ops.guided_step import guided_step

__all__ = ["LinearStep", "linear_steps", "step_coefficients", "initial_scale", "is_supported",
           "UnsupportedScheduler", "guided_update", "history_indices", "Plan"]


class UnsupportedScheduler(ValueError):
    """The scheduler (or one of its options) has no linear form here."""


@dataclass(frozen=True)
class LinearStep:
    """Call ``index`` of a sampling run: ``x_{index+1} = sum x[j]*x_j + sum out[j]*out_j +
    noise*z``. ``timestep`` is what the model is called with, on the input
    ``input_scale * x_index`` (``scheduler.scale_model_input``). ``held``: ``(hx, ho)`` with
    this call's eps (flow: velocity) ``= hx*x_index + ho*out_index``."""

    index: int
    timestep: float
    input_scale: float
    x: Mapping[int, float]
    out: Mapping[int, float]
    noise: float = 0.0
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    held: tuple[float, float] = (0.0, 1.0)

    @property
    def a(self) -> float:
        """Coefficient on this call's own sample."""
        return self.x.get(self.index, 0.0)

    @property
    def b(self) -> float:
        """Coefficient on this call's own model output."""
        return self.out.get(self.index, 0.0)

    @property
    def one_step(self) -> bool:
        """True when only this call's sample and output appear (guided_step's form)."""
        return set(self.x) <= {self.index} and set(self.out) <= {self.index}

    @property
    def history_x(self) -> dict[int, float]:
        return {j: c for j, c in self.x.items() if j != self.index}

    @property
    def history_out(self) -> dict[int, float]:
        return {j: c for j, c in self.out.items() if j != self.index}


# ---------------------------------------------------------------- helpers

def _name(scheduler) -> str:
    return type(scheduler).__name__


def _require_timesteps(scheduler) -> None:
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"{_name(scheduler)} has no timesteps set: call scheduler.set_timesteps(num_steps) first")


def _unsupported(scheduler, why: str):
    raise UnsupportedScheduler(f"{_name(scheduler)}: {why}")


def _no_clipping(scheduler) -> None:
    cfg = scheduler.config
    if cfg.get("thresholding", False):
        _unsupported(scheduler, "thresholding=True makes the update non-linear; build it with thresholding=False")
    if cfg.get("clip_sample", False):
        _unsupported(scheduler, "clip_sample=True makes the update non-linear; build it with clip_sample=False")


def _prediction(scheduler, allowed) -> str:
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in allowed:
        _unsupported(scheduler, f"prediction_type={kind!r} is not supported (supported: {', '.join(allowed)})")
    return kind


def _abar(scheduler, t: int, final: float) -> float:
    """alphas_cumprod[t] as a Python float; ``final`` for t < 0."""
    return float(scheduler.alphas_cumprod[int(t)]) if t >= 0 else float(final)


def _x0_eps(kind: str, abar: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(x0, eps) as (coef on x, coef on model output) in the variance-preserving form."""
    al, si = math.sqrt(abar), math.sqrt(1.0 - abar)
    if kind == "epsilon":
        return (1.0 / al, -si / al), (0.0, 1.0)
    if kind == "v_prediction":
        return (al, -si), (si, al)
    # "sample"
    return (0.0, 1.0), (1.0 / si, -al / si)


def _held_from_x0(kind: str, held_kind: str, cx: float, cm: float, alpha: float,
                  sigma: float) -> tuple[float, float]:
    """``(hx, ho)`` of ``(x - alpha*x0) / sigma`` with ``x0 = cx*x + cm*out``: eps
    (``held_kind="epsilon"``) for a process ``x = alpha*x0 + sigma*eps``, the velocity
    (``"flow_prediction"``) for flow matching with alpha = 1."""
    if kind == held_kind:  # the output itself, exactly
        return 0.0, 1.0
    return (1.0 - alpha * cx) / sigma, -alpha * cm / sigma


def _step(i, t, x, out, noise=0.0, input_scale=1.0, held=(0.0, 1.0), **extra) -> LinearStep:
    x = {j: float(c) for j, c in x.items() if c != 0.0 or j == i}
    out = {j: float(c) for j, c in out.items() if c != 0.0 or j == i}
    return LinearStep(i, t, float(input_scale), x, out, float(noise), extra, (float(held[0]), float(held[1])))


def _timestep_value(t) -> float:
    t = float(t)
    return int(t) if t.is_integer() else t


# ---------------------------------------------------------------- schedulers

def _ddim(s, eta: float) -> list[LinearStep]:
    _no_clipping(s)
    kind = _prediction(s, ("epsilon", "v_prediction", "sample"))
    ratio = s.config.num_train_timesteps // s.num_inference_steps
    steps = []
    for i, t in enumerate(s.timesteps.tolist()):
        t = int(t)
        ab = _abar(s, t, 0)
        ab_prev = _abar(s, t - ratio, s.final_alpha_cumprod)
        (cx, cm), (ex, em) = _x0_eps(kind, ab)
        var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        std = eta * math.sqrt(var)
        direction = math.sqrt(max(1 - ab_prev - std * std, 0.0))
        root = math.sqrt(ab_prev)
        steps.append(_step(i, t, {i: root * cx + direction * ex}, {i: root * cm + direction * em},
                           noise=std if eta > 0 else 0.0, held=(ex, em)))
    return steps


def _ddpm(s) -> list[LinearStep]:
    _no_clipping(s)
    kind = _prediction(s, ("epsilon", "v_prediction", "sample"))
    vt = s.config.get("variance_type", "fixed_small")
    if vt not in ("fixed_small", "fixed_small_log", "fixed_large"):
        _unsupported(s, f"variance_type={vt!r} is not supported (fixed_small, fixed_small_log, fixed_large)")
    ts = [int(t) for t in s.timesteps.tolist()]
    steps = []
    for i, t in enumerate(ts):
        prev = int(s.previous_timestep(t))
        ab = _abar(s, t, 1.0)
        ab_prev = _abar(s, prev, 1.0)
        beta = 1 - ab / ab_prev
        c0 = math.sqrt(ab_prev) * beta / (1 - ab)
        ct = math.sqrt(ab / ab_prev) * (1 - ab_prev) / (1 - ab)
        (cx, cm), held = _x0_eps(kind, ab)
        if t > 0:
            var = max((1 - ab_prev) / (1 - ab) * beta, 1e-20)
            std = math.sqrt(beta) if vt == "fixed_large" else math.sqrt(var)
        else:
            std = 0.0
        steps.append(_step(i, t, {i: c0 * cx + ct}, {i: c0 * cm}, noise=std, held=held))
    return steps


def _euler(s) -> list[LinearStep]:
    kind = _prediction(s, ("epsilon", "v_prediction", "sample", "original_sample"))
    sig = [float(v) for v in s.sigmas.tolist()]
    steps = []
    for i, t in enumerate(s.timesteps.tolist()):
        si, sn = sig[i], sig[i + 1]
        if kind == "epsilon":
            cx, cm = 1.0, -si
        elif kind == "v_prediction":
            cx, cm = 1.0 / (si * si + 1), -si / math.sqrt(si * si + 1)
        else:
            cx, cm = 0.0, 1.0
        dt = sn - si
        # x' = x + dt * (x - x0) / sigma, x0 = cx*x + cm*out
        steps.append(_step(i, _timestep_value(t), {i: 1 + dt * (1 - cx) / si}, {i: -dt * cm / si},
                           input_scale=1.0 / math.sqrt(si * si + 1), held=_held_from_x0(kind, "epsilon", cx, cm, 1.0, si)))
    return steps


def _flow_match_euler(s) -> list[LinearStep]:
    if s.config.get("stochastic_sampling", False):
        _unsupported(s, "stochastic_sampling=True is not supported")
    sig = [float(v) for v in s.sigmas.tolist()]
    return [_step(i, _timestep_value(t), {i: 1.0}, {i: sig[i + 1] - sig[i]})
            for i, t in enumerate(s.timesteps.tolist())]


def _dpm_alpha_sigma(s, sigma: float) -> tuple[float, float]:
    if s.config.get("use_flow_sigmas", False):
        return 1.0 - sigma, sigma
    alpha = 1.0 / math.sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha


def _dpm_solver(s) -> list[LinearStep]:
    cfg = s.config
    if cfg.algorithm_type != "dpmsolver++":
        _unsupported(s, f"algorithm_type={cfg.algorithm_type!r} is not supported (dpmsolver++)")
    if cfg.solver_order not in (1, 2):
        _unsupported(s, f"solver_order={cfg.solver_order} is not supported (1 or 2)")
    if cfg.get("thresholding", False):
        _unsupported(s, "thresholding=True makes the update non-linear")
    if cfg.get("variance_type") in ("learned", "learned_range"):
        _unsupported(s, "learned variance is not supported")
    kind = _prediction(s, ("epsilon", "v_prediction", "sample", "flow_prediction"))
    sig = [float(v) for v in s.sigmas.tolist()]
    n = len(s.timesteps)
    flow = bool(cfg.get("use_flow_sigmas", False))

    def x0(j):  # x0 prediction of call j as {sample coef}, {output coef}
        sg = sig[j]
        alpha, sigma = _dpm_alpha_sigma(s, sg)
        if kind == "epsilon":
            return 1.0 / alpha, -sigma / alpha
        if kind == "v_prediction":
            return alpha, -sigma
        if kind == "flow_prediction":
            return 1.0, -sg
        return 0.0, 1.0

    def lam(alpha, sigma):
        return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)

    steps = []
    for i, t in enumerate(s.timesteps.tolist()):
        lower_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                      or cfg.final_sigmas_type == "zero")
        alpha_t, sigma_t = _dpm_alpha_sigma(s, sig[i + 1])
        alpha_0, sigma_0 = _dpm_alpha_sigma(s, sig[i])
        h = lam(alpha_t, sigma_t) - lam(alpha_0, sigma_0)
        phi = math.exp(-h) - 1.0  # 0 - 1 when sigma_t = 0
        ratio = sigma_t / sigma_0
        cx0, cm0 = x0(i)
        xs, outs = {i: ratio}, {}
        d0 = -alpha_t * phi  # coefficient on D0 = x0_i
        if cfg.solver_order == 1 or i < 1 or lower_final:
            xs[i] += d0 * cx0
            outs[i] = d0 * cm0
        else:
            alpha_1, sigma_1 = _dpm_alpha_sigma(s, sig[i - 1])
            r0 = (lam(alpha_0, sigma_0) - lam(alpha_1, sigma_1)) / h
            if cfg.solver_type == "midpoint":
                d1 = -0.5 * alpha_t * phi
            else:  # heun
                d1 = alpha_t * (phi / h + 1.0)
            # D1 = (x0_i - x0_{i-1}) / r0
            cx1, cm1 = x0(i - 1)
            xs[i] += (d0 + d1 / r0) * cx0
            outs[i] = (d0 + d1 / r0) * cm0
            xs[i - 1] = -d1 / r0 * cx1
            outs[i - 1] = -d1 / r0 * cm1
        held = (_held_from_x0(kind, "flow_prediction", cx0, cm0, 1.0, sig[i]) if flow
                else _held_from_x0(kind, "epsilon", cx0, cm0, alpha_0, sigma_0))
        steps.append(_step(i, _timestep_value(t), xs, outs, held=held))
    return steps


_PLMS_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _pndm(s) -> list[LinearStep]:
    if not s.config.skip_prk_steps:
        _unsupported(s, "only PLMS (skip_prk_steps=True) is supported, not the Runge-Kutta warm-up steps")
    kind = _prediction(s, ("epsilon", "v_prediction"))
    ratio = s.config.num_train_timesteps // s.num_inference_steps
    ets: list[int] = []  # call indices whose outputs the scheduler keeps, oldest first
    cur = 0
    steps = []
    for i, t_model in enumerate(s.timesteps.tolist()):
        t = int(t_model)
        prev = t - ratio
        if i != 1:
            ets = ets[-3:] + [i]
        else:  # the second call repeats the first update with the averaged output (Heun-like)
            prev, t = t, t + ratio
        sample = i
        if len(ets) == 1 and i == 0:
            comb = {i: 1.0}
            cur = i
        elif len(ets) == 1 and i == 1:
            comb = {i: 0.5, ets[-1]: 0.5}
            sample = cur
        else:
            w = _PLMS_WEIGHTS[len(ets)]
            comb = {ets[-1 - k]: w[k] for k in range(len(ets))}
        ab = _abar(s, t, 0)
        ab_prev = _abar(s, prev, s.final_alpha_cumprod)
        sample_coeff = math.sqrt(ab_prev / ab)
        denom = ab * math.sqrt(1 - ab_prev) + math.sqrt(ab * (1 - ab) * ab_prev)
        k = (ab_prev - ab) / denom
        xs = {i: 0.0, sample: sample_coeff}
        _, held = _x0_eps(kind, _abar(s, int(t_model), 0))  # this call's eps, at the model's own timestep
        if kind == "v_prediction":  # eps = sqrt(ab)*v + sqrt(1-ab)*sample
            xs[sample] -= k * math.sqrt(1 - ab)
            outs = {j: -k * c * math.sqrt(ab) for j, c in comb.items()}
        else:
            outs = {j: -k * c for j, c in comb.items()}
        outs.setdefault(i, 0.0)
        steps.append(_step(i, int(t_model), xs, outs, held=held))
    return steps


_BUILDERS = {
    "DDIMScheduler": lambda s, eta: _ddim(s, eta),
    "DDPMScheduler": lambda s, eta: _ddpm(s),
    "EulerDiscreteScheduler": lambda s, eta: _euler(s),
    "FlowMatchEulerDiscreteScheduler": lambda s, eta: _flow_match_euler(s),
    "DPMSolverMultistepScheduler": lambda s, eta: _dpm_solver(s),
    "PNDMScheduler": lambda s, eta: _pndm(s),
}


def is_supported(scheduler) -> bool:
    """Whether ``linear_steps`` knows this scheduler class and its options (timesteps aside)."""
    if _name(scheduler) not in _BUILDERS:
        return False
    try:
        if getattr(scheduler, "timesteps", None) is not None and scheduler.num_inference_steps is not None:
            linear_steps(scheduler)
        return True
    except UnsupportedScheduler:
        return False


def linear_steps(scheduler, eta: float = 0.0) -> list[LinearStep]:
    """One ``LinearStep`` per denoiser call of a run with ``scheduler`` (after
    ``set_timesteps``). ``eta`` is DDIM's noise weight (0 = deterministic).

    Raises ValueError when no timesteps are set, and ``UnsupportedScheduler`` (a
    ValueError) for other scheduler classes or options without a linear form
    (thresholding, clipping, SDE variants, order 3, PRK steps, ...).
    """
    name = _name(scheduler)
    if name not in _BUILDERS:
        raise UnsupportedScheduler(f"{name} has no linear form here; supported: {', '.join(sorted(_BUILDERS))}")
    eta = float(eta)
    if eta < 0 or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if eta > 0 and name != "DDIMScheduler":
        raise ValueError(f"eta only applies to DDIMScheduler, not {name}")
    _require_timesteps(scheduler)
    return _BUILDERS[name](scheduler, eta)


def step_coefficients(scheduler, index: int, eta: float = 0.0) -> tuple[float, float]:
    """``(a, b)`` of call ``index`` of a one-step sampler: ``x_prev = a*x + b*out`` (plus
    ``noise * z`` for DDPM / DDIM eta > 0: see ``linear_steps``). Raises ValueError for a
    call that also uses earlier calls (multistep samplers: use ``linear_steps``)."""
    steps = linear_steps(scheduler, eta)
    if not -len(steps) <= index < len(steps):
        raise IndexError(f"index {index} out of range for {len(steps)} calls")
    st = steps[index]
    if not st.one_step:
        raise ValueError(f"{_name(scheduler)} call {index} also uses earlier calls "
                         f"(x: {sorted(st.history_x)}, outputs: {sorted(st.history_out)}); use linear_steps()")
    return st.a, st.b


def initial_scale(scheduler) -> float:
    """``init_noise_sigma``: the initial latent is ``initial_scale * N(0, I)`` (1 for flow
    matching, whose schedulers have no such attribute)."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def guided_update(step: LinearStep, x, eps_uncond, eps_cond, w: float, xs: dict, outs: dict,
                  uses_x=(), uses_out=(), noise=None):
    """``x_{i+1}`` of call ``step.index`` with classifier-free guidance: the fused
    ``guided_step(x, eps_u, eps_c, a, b, w)`` plus the earlier calls' terms (multistep
    samplers) and ``step.noise * noise``. ``xs`` / ``outs`` hold the earlier samples and
    guided outputs; this call's are added when its index is in ``uses_x`` / ``uses_out``
    (the indices later calls reference)."""
    if step.index in uses_out:
        outs[step.index] = guided_step(x, eps_uncond, eps_cond, 0.0, 1.0, w)
    if step.index in uses_x:
        xs[step.index] = x
    nxt = guided_step(x, eps_uncond, eps_cond, step.a, step.b, w)
    for j, c in step.history_x.items():
        nxt = nxt + c * xs[j]
    for j, c in step.history_out.items():
        nxt = nxt + c * outs[j]
    if step.noise:
        if noise is None:
            raise ValueError(f"call {step.index} injects noise: pass noise=")
        nxt = nxt + step.noise * noise
    return nxt


def history_indices(steps: list[LinearStep]) -> tuple[set[int], set[int]]:
    """(samples, outputs) that some call uses as an earlier term."""
    return ({j for st in steps for j in st.history_x}, {j for st in steps for j in st.history_out})


class Plan:
    """The linear forms of one sampling run and the scalar recurrences over them.

    With every call's held quantity (``LinearStep.held``: the noise prediction eps, for flow
    matching the velocity) constant, the final sample ``x_n`` is linear in each earlier
    sample, held quantity and output, with scalar coefficients: ``chain_sensitivity`` gives
    ``dx_n/dx_j``, ``held_sensitivity`` ``dx_n/d eps_k``, ``output_sensitivity``
    ``dx_n/d out_k`` (call k's model output at its fixed input). SDO's shortcut gradient and
    DiP-GO's shortcut training multiply a kept call's vector-Jacobian product by them. For eps
    models the held quantity is the output and the two sensitivities are one."""

    def __init__(self, scheduler, eta: float = 0.0):
        self.steps: list[LinearStep] = linear_steps(scheduler, eta)
        self.n = len(self.steps)
        self.timesteps = scheduler.timesteps.detach().cpu()
        self.init_scale = initial_scale(scheduler)
        self.needs_noise = any(st.noise for st in self.steps)
        self.kept_x, self.kept_out = history_indices(self.steps)  # what later calls still use
        self._edges: tuple[list, list] | None = None
        self._p: dict[int, list[float]] = {}

    def held_steps(self) -> list[LinearStep]:
        """The updates in (samples, held quantities): ``x_{i+1} = sum x[j]*x_j + sum out[j]*h_j``
        (``out`` now weighs ``h_j``), from ``out_j = (h_j - hx_j*x_j) / ho_j``."""
        forms = []
        for st in self.steps:
            xs, hs = dict(st.x), {}
            for j, c in st.out.items():
                hx, ho = self.steps[j].held
                if ho == 0.0:
                    if c == 0.0:
                        continue
                    raise ValueError(f"call {j}'s output does not determine its noise prediction (d eps/d out = 0): "
                                     "the shortcut cannot hold it; use a model with another prediction_type")
                hs[j] = c / ho
                if hx != 0.0:
                    xs[j] = xs.get(j, 0.0) - c * hx / ho
            forms.append(replace(st, x=xs, out=hs))
        return forms

    def edges(self) -> tuple[list[list[tuple[int, float]]], list[list[tuple[int, float]]]]:
        """Who uses sample j / held quantity j in the held form, as (call i, coefficient): the
        adjoint's edges."""
        if self._edges is None:
            x_users: list[list[tuple[int, float]]] = [[] for _ in range(self.n)]
            held_users: list[list[tuple[int, float]]] = [[] for _ in range(self.n)]
            for st in self.held_steps():
                for j, c in st.x.items():
                    x_users[j].append((st.index, c))
                for j, c in st.out.items():
                    held_users[j].append((st.index, c))
            self._edges = (x_users, held_users)
        return self._edges

    def chain_sensitivity(self, start: int) -> list[float]:
        """p[j] = dx_n/dx_j with every held quantity constant, for j = start..n (x_j enters call j)."""
        if start not in self._p:
            x_users = self.edges()[0]
            p = [0.0] * (self.n + 1)
            p[self.n] = 1.0
            for j in range(self.n - 1, start - 1, -1):
                p[j] = sum(c * p[i + 1] for i, c in x_users[j])
            self._p[start] = p
        return self._p[start]

    def held_sensitivity(self, k: int, start: int) -> float:
        """dx_n/d h_k: the scalar on call k's held quantity (eps; flow: velocity)."""
        p = self.chain_sensitivity(start)
        return sum(c * p[i + 1] for i, c in self.edges()[1][k])

    def output_sensitivity(self, k: int, start: int) -> float:
        """dx_n/d out_k: the scalar on call k's (guided) model output, its input and the other
        calls' held quantities fixed: ``held_sensitivity * ho_k``."""
        return self.held_sensitivity(k, start) * self.steps[k].held[1]

    def importance(self, start: int) -> Tensor:
        """p[k] over the calls ``start..n-1`` (zero before), proportional to |dx_n/d h_k| (the
        same for every parametrisation of one model): the importance policies' draw. A call
        the final sample does not depend on is never drawn."""
        sens = torch.tensor([0.0] * start + [abs(self.held_sensitivity(k, start)) for k in range(start, self.n)],
                            dtype=torch.float64)
        if not bool(sens.sum() > 0):  # nothing reaches x_n: uniform (every gradient is zero anyway)
            sens[start:] = 1.0
        return sens / sens.sum()

    def reach(self, k: int, start: int) -> float:
        """dx_k/dx_start with every held quantity constant: how the start latent reaches call k."""
        x_users = self.edges()[0]
        q = {k: 1.0}
        for j in range(k - 1, start - 1, -1):
            q[j] = sum(c * q.get(i + 1, 0.0) for i, c in x_users[j] if i + 1 <= k)
        return q[start]
