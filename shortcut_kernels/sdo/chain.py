"""The shortcut sampler: a sampling chain in which one denoiser call keeps its graph.

With every other call's noise prediction held constant (eps, whatever the model predicts:
a v or x0 output is held as the eps it stands for, so that it still depends on its input
through the parametrisation; flow matching holds the velocity: ``LinearStep.held``), each
sampler update is linear in the samples (``shortcut_kernels.samplers``), so the final
sample's Jacobian w.r.t. any latent of the chain is a scalar times the identity, plus the kept
call's own Jacobian. Two implementations of that one gradient:

- reference (``memory_light=False``): the chain under autograd, the other calls' held
  quantities constant. Also serves the baselines that keep several calls (``full``, ``draft:K``,
  ``alignprop``), each kept call under activation checkpointing.
- memory-light (default for one-call policies): the chain runs under
  ``torch.inference_mode()`` and stores only the kept call's input; ``_Shortcut`` recomputes
  that call at backward time and applies the exact linear map of the rest of the chain, as
  scalar recurrences over the scheduler's coefficients (a product for one-step samplers;
  the history terms of DPM-Solver++ 2M and PLMS enter the same recurrence). LoRA adapters
  are merged into their base weights for that chain (``sdo.lora_merge``).

Both run the one sampling loop, :class:`shortcut_kernels.chain.Chain`; the scalars come
from the scheduler's :class:`shortcut_kernels.samplers.Plan`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..chain import Chain
from ..runtime import Schedule, accelerate
from ..ops.guided_step import guided_step
from ..samplers import Plan
from .lora_merge import merged_adapters
from .config import ChainConfig
from .policy import Policy

__all__ = ["shortcut_sample", "warmup", "WarmStart"]


@dataclass
class WarmStart:
    """The state after the warm-up calls ``0..index-1``, run once and reused: ``x`` enters
    call ``index``; ``xs``/``outs`` hold the earlier samples and (guided) outputs that later
    multistep updates still use."""

    index: int
    x: Tensor
    xs: dict = field(default_factory=dict)
    outs: dict = field(default_factory=dict)
    num_calls: int = 0


# ---------------------------------------------------------------- one step

class _Runner:
    """One SDO run: the chain (:class:`~shortcut_kernels.chain.Chain`), the model, the kept
    calls and their gradient weights, and the two ways of running it."""

    def __init__(self, chain: Chain, model_fn, start: WarmStart | None, kept: Tensor, progress: bool,
                 checkpoint_kept: bool):
        self.chain, self.plan, self.model_fn = chain, chain.plan, model_fn
        self.warm = start
        self.start = 0 if start is None else start.index
        self.kept = kept
        self.weights: Tensor | None = None  # [B] float64: each sample's multiplier on its kept call's gradient
        self.progress = progress
        self.checkpoint_kept = checkpoint_kept
        self.chain_schedule = None  # (model, Schedule) set by shortcut_sample
        self.adapters: torch.nn.Module | None = None  # whose LoRA adapters the no-graph chain merges
        self.params: list[Tensor] = []

    def chain_context(self):
        """The no-grad chain through a DiP-GO schedule (the kept calls' rows computing
        everything), or nothing. The backward recompute runs outside it: the full model."""
        if self.chain_schedule is None:
            return contextlib.nullcontext()
        model, schedule = self.chain_schedule
        stack = contextlib.ExitStack()
        handle = stack.enter_context(accelerate(model, schedule))
        stack.enter_context(handle.run())
        return stack

    def call(self, i: int, x_in: Tensor, t) -> Tensor | tuple[Tensor, Tensor]:
        return self.model_fn(x_in, t)

    def checkpointed_call(self, i: int, x_in: Tensor, t) -> Tensor | tuple[Tensor, Tensor]:
        return checkpoint(self.model_fn, x_in, t, use_reentrant=False)

    def first_latent(self, x: Tensor) -> tuple[Tensor, dict, dict]:
        if self.warm is None:
            return self.chain.first_latent(x), {}, {}
        return x, dict(self.warm.xs), dict(self.warm.outs)

    def run(self, x_start: Tensor, call=None, **hooks) -> Tensor:
        x, xs, outs = self.first_latent(x_start)
        return self.chain.run(x, call or self.call, start=self.start, xs=xs, outs=outs, progress=self.progress,
                              desc="sdo chain", **hooks)

    # (a) autograd chain --------------------------------------------------
    def autograd_chain(self, x_start: Tensor, one_call: bool) -> Tensor:
        """The chain under autograd: the kept calls' outputs live (one-call policies: for the
        samples that keep the call, with their importance weights), every other call's held
        quantity (``LinearStep.held``: eps, flow velocity) constant."""
        kept = self.kept
        kept_steps = set(kept.tolist())
        entering: dict[int, Tensor] = {}  # the sample entering the current call

        def held_outputs(i: int, eu: Tensor, ec: Tensor) -> tuple[Tensor, Tensor]:
            x = entering.pop(i)
            if i not in kept_steps:
                mask = torch.zeros(x.shape[0], dtype=torch.bool)
            else:
                mask = (kept == i) if one_call else torch.ones(x.shape[0], dtype=torch.bool)
            w = self.weights if one_call and i in kept_steps else None
            if w is not None:
                w = w.to(device=eu.device, dtype=eu.dtype).view((-1,) + (1,) * (eu.dim() - 1))
            c = _held_correction(self.plan.steps[i])
            return _hold(eu, x, mask, w, c), _hold(ec, x, mask, w, c)

        on_output = held_outputs if torch.is_grad_enabled() else None
        on_call = (lambda i, x: entering.__setitem__(i, x)) if on_output is not None else None
        with self.chain_context():
            return self.run(x_start, self.checkpointed_call if self.checkpoint_kept else self.call,
                            keeps_graph=kept_steps.__contains__, on_call=on_call, on_output=on_output)

    # (b) memory-light ----------------------------------------------------
    def light_forward(self, x_start: Tensor) -> tuple[Tensor, Tensor]:
        with merged_adapters(self.adapters), torch.inference_mode(), self.chain_context():
            kept_x = torch.empty_like(x_start)
            kept = self.kept.to(x_start.device)
            kept_steps = set(self.kept.tolist())  # decided on the host: no device sync per call

            def store_kept_input(i: int, x: Tensor) -> None:
                if i in kept_steps:
                    mask = kept == i
                    kept_x[mask] = x[mask]

            x = self.run(x_start.detach(), on_call=store_kept_input)
        return x.clone(), kept_x.clone()  # out of inference mode: ordinary tensors

    def light_backward(self, kept_x: Tensor, grad: Tensor, need_x: bool, params: Sequence[Tensor]):
        plan, start = self.plan, self.start
        ks = self.kept.tolist()
        uniq = sorted(set(ks))
        gamma = {k: plan.held_sensitivity(k, start) for k in uniq}  # on the held eps: any parametrisation
        reach = {k: plan.reach(k, start) for k in uniq}
        shape = (-1,) + (1,) * (grad.dim() - 1)
        dev, dt = grad.device, grad.dtype
        gamma_b = torch.tensor([gamma[k] for k in ks], dtype=dt, device=dev).view(shape)
        if self.weights is not None:
            gamma_b = gamma_b * self.weights.to(device=dev, dtype=dt).view(shape)
        if len(uniq) == 1:
            t = plan.timesteps[uniq[0]]
            scale = plan.steps[uniq[0]].input_scale
        else:
            t = plan.timesteps[self.kept].to(dev)
            scale = torch.tensor([plan.steps[k].input_scale for k in ks], dtype=dt, device=dev).view(shape)
        with torch.enable_grad():
            xk = kept_x.detach().requires_grad_(need_x)
            eu, ec = self.chain.denoise(self.call, -1, scale * xk, t, xk)
            out = guided_step(xk, eu, ec, 0.0, 1.0, self.chain.w)  # the kept call's (guided) output
            out = _held_quantity(out, xk, [plan.steps[k].held for k in ks])
            inputs = ([xk] if need_x else []) + list(params)
            grads = torch.autograd.grad(out, inputs, gamma_b * grad, allow_unused=True) if inputs else []
        grads = list(grads)
        gx = None
        if need_x:
            vjp = grads.pop(0)
            gx = plan.chain_sensitivity(start)[start] * grad
            if vjp is not None:
                reach_b = torch.tensor([reach[k] for k in ks], dtype=dt, device=dev).view(shape)
                gx = gx + reach_b * vjp
            if self.warm is None:
                gx = gx * plan.init_scale
        return gx, grads


def _held_quantity(out: Tensor, x: Tensor, held: list[tuple[float, float]]) -> Tensor:
    """``hx*x + ho*out`` per sample (``held[b]`` of sample b's kept call): the kept call's eps
    (flow: velocity), whose gradient the memory-light backward scales; ``out`` for eps models."""
    if all(h == (0.0, 1.0) for h in held):
        return out
    shape = (-1,) + (1,) * (out.dim() - 1)
    hx, ho = (torch.tensor(c, dtype=out.dtype, device=out.device).view(shape) for c in zip(*held))
    return hx * x + ho * out


def _held_correction(step) -> float:
    """``hx / ho`` of a call's held quantity ``h = hx*x + ho*out``: 0 for eps models."""
    hx, ho = step.held
    return hx / ho if hx != 0.0 else 0.0


def _hold(out: Tensor, x: Tensor, kept: Tensor, weight: Tensor | None, c: float) -> Tensor:
    """One call's output in the autograd chain, with the value of ``out`` and the gradients of
    the shortcut: where ``kept`` is False the held quantity ``h = hx*x + ho*out`` is constant
    (``out`` as ``(h - hx*x)/ho``: it still depends on ``x`` through the parametrisation);
    where True ``h`` is live, its gradient times ``weight`` (an importance draw), the part
    through ``x`` included. ``x - x.detach()`` is exactly 0, so the values are untouched.
    ``kept``: ``[B]`` bool on the host (decided there: no device sync per call)."""
    if weight is not None:
        live = _ScaleGrad.apply(out, weight)
        if c:
            live = live + c * (_ScaleGrad.apply(x, weight) - x)
    else:
        live = out
    if bool(kept.all()):
        return live
    held = out.detach() - c * (x - x.detach()) if c else out.detach()
    if not bool(kept.any()):
        return held
    return torch.where(kept.to(out.device).view((-1,) + (1,) * (out.dim() - 1)), live, held)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``w`` (an importance draw's reweighting of the kept
    call, in the autograd chain: the same values, so the chain matches the no-grad one exactly)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        return grad * w, None


class _Shortcut(torch.autograd.Function):
    """x_start and the model's parameters (``runner.params``, passed as inputs so that autograd
    hands their gradients back) -> x_n, through the memory-light shortcut."""

    @staticmethod
    def forward(ctx, runner: _Runner, x_start: Tensor, *params: Tensor) -> Tensor:
        x_n, kept_x = runner.light_forward(x_start)
        ctx.runner = runner
        ctx.save_for_backward(kept_x)
        return x_n

    @staticmethod
    def backward(ctx, grad: Tensor):
        (kept_x,) = ctx.saved_tensors
        need_params = ctx.needs_input_grad[2:]
        wanted = [p for p, n in zip(ctx.runner.params, need_params) if n]
        gx, gp = ctx.runner.light_backward(kept_x, grad, ctx.needs_input_grad[1], wanted)
        it = iter(gp)
        return (None, gx, *[next(it) if n else None for n in need_params])


# ---------------------------------------------------------------- public API

def _model_params(model_fn, params) -> list[Tensor]:
    if params is not None:
        return [p for p in params if isinstance(p, Tensor) and p.requires_grad]
    if isinstance(model_fn, torch.nn.Module):
        return [p for p in model_fn.parameters() if p.requires_grad]
    return []


def _check_latent(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension first, got shape {tuple(x.shape)}")


def shortcut_sample(
    model_fn: Callable,
    scheduler,
    x_T: Tensor,
    config: ChainConfig | str | Policy = "first",
    *,
    generator: torch.Generator | None = None,
    warm_start: WarmStart | None = None,
    params: Iterable[Tensor] | None = None,
    plan: Plan | None = None,
    chain_model: torch.nn.Module | None = None,
    progress: bool = False,
    return_kept: bool = False,
    noise_rows: tuple[int, slice] | None = None,
):
    """Sample with ``scheduler`` from ``x_T`` keeping the graph of one denoiser call per sample.

    model_fn: ``model_fn(x, t) -> output`` (``t``: a 0-d timestep, or one per sample under
        ``per-sample``); with guidance, it returns ``(output_uncond, output_cond)``
        (``models.conditioning``: ``ClassConditional`` wraps a zoo model, ``TextConditional`` a
        diffusers text UNet, ``DiTConditional`` a class-conditional DiT). Outputs are what the
        scheduler's ``prediction_type`` says (eps, v, ...); the gradient is the same for
        every parametrisation of one model. Must be deterministic (recomputed at backward).
    scheduler: a diffusers scheduler with ``set_timesteps`` called (see
        ``shortcut_kernels.samplers`` for the supported ones). It is not mutated.
    x_T: unit Gaussian noise ``[B, ...]`` (scaled by ``init_noise_sigma`` here, as diffusers
        pipelines do with ``latents=``), or with ``warm_start`` the latent entering call
        ``warm_start.index``. The gradient reaches it when it requires grad.
    config: a :class:`~shortcut_kernels.sdo.config.ChainConfig` (policy, guidance, eta,
        autocast, memory-light path, chain schedule, adapter merging), or just a policy.
        Noise (DDIM eta > 0, DDPM) is drawn from ``generator`` once per call of this function
        and held fixed, as are the random policies' choices. ``first`` / ``fixed:k`` naming a call
        the final sample does not depend on raise ValueError (its gradient would be zero).
    params: tensors the gradient should reach through the kept call (default: the
        parameters of ``model_fn`` that require grad, if it is a Module).
    chain_model: the model that ``config.chain_schedule`` applies to and whose LoRA adapters
        are merged (default: ``model_fn.model`` or ``model_fn``).
    return_kept: also return the kept call(s) (``[B]`` for one-call policies).
    noise_rows: ``(global_batch, rows)`` when ``x_T`` is the ``rows`` of a larger batch (a
        rank's share): the noise of stochastic samplers is drawn for the whole batch and
        sliced (``Chain``'s ``noise_rows``), as one process running the whole batch draws it.
    Returns the final sample ``x_0`` (same dtype as ``x_T``).
    """
    _check_latent(x_T, "x_T")
    cfg = ChainConfig.of(config)
    pol = cfg.policy
    if plan is None:
        plan = Plan(scheduler, cfg.eta)
    start = 0
    if warm_start is not None:
        if warm_start.num_calls and warm_start.num_calls != plan.n:
            raise ValueError(f"warm_start was made for {warm_start.num_calls} calls, the scheduler has {plan.n}")
        start = warm_start.index
        if tuple(warm_start.x.shape) != tuple(x_T.shape):
            raise ValueError(f"x_T shape {tuple(x_T.shape)} does not match warm_start.x {tuple(warm_start.x.shape)}")
    if generator is None and (plan.needs_noise or pol.kind in ("random", "per-sample", "alignprop")):
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    probs = plan.importance(start) if pol.importance else None
    kept = pol.kept_calls(start, plan.n, x_T.shape[0], generator, probs)
    ps = _model_params(model_fn, params)
    memory_light = pol.one_call if cfg.memory_light is None else cfg.memory_light
    chain = Chain(scheduler, cfg.guidance, generator=generator, plan=plan, autocast=cfg.autocast,
                  noise_rows=noise_rows)
    runner = _Runner(chain, model_fn, warm_start, kept, progress, checkpoint_kept=not pol.one_call and cfg.checkpoint)
    runner.weights = pol.grad_weights(kept, start, probs)
    if cfg.chain_schedule is not None:
        runner.chain_schedule = _kept_calls_full(cfg.chain_schedule,
                                                 chain_model or getattr(model_fn, "model", model_fn),
                                                 plan, pol, kept, warm_start)
    if cfg.merge_adapters:
        owner = chain_model if chain_model is not None else model_fn
        runner.adapters = owner if isinstance(owner, torch.nn.Module) else None
    grad_wanted = torch.is_grad_enabled() and (x_T.requires_grad or bool(ps))
    if grad_wanted and pol.kind in ("first", "fixed"):
        _check_kept_call_reaches(plan, pol, int(kept[0]), start)
    if not grad_wanted:
        with torch.no_grad(), merged_adapters(runner.adapters):
            x0 = runner.autograd_chain(x_T, pol.one_call)
    elif memory_light:
        runner.params = ps
        x0 = _Shortcut.apply(runner, x_T, *ps)
    else:
        x0 = runner.autograd_chain(x_T, pol.one_call)
    return (x0, kept) if return_kept else x0


def _check_kept_call_reaches(plan: Plan, pol: Policy, k: int, start: int) -> None:
    """Refuse a named kept call whose held output does not reach the final sample: its
    gradient would be exactly zero. (A random draw may land on such a call: a zero term of an
    unbiased estimate, which the importance draws avoid.)"""
    if plan.held_sensitivity(k, start) == 0.0:
        raise ValueError(f"config.policy {str(pol)!r}: the final sample does not depend on call {k}'s output "
                         f"(d x_n / d eps_{k} = 0 with the other calls' eps held), so its gradient would be "
                         f"exactly zero; keep another call (e.g. 'fixed:{max(k - 1, start)}' or 'first')")


def _kept_calls_full(schedule, model, plan: Plan, pol: Policy, kept: Tensor, warm_start):
    """Check ``schedule`` against the model and the run; return it with the kept calls' rows full."""
    check_chain_schedule(schedule, model, plan, pol, warm_start)
    keep = schedule.keep.clone()
    keep[sorted(set(kept.tolist()))] = True
    full = Schedule(keep, schedule.graph, name=schedule.name, params=schedule.params,
                    sampler=schedule.sampler, steps=schedule.steps)
    return model, full


def check_chain_schedule(schedule, model, plan: Plan, pol: Policy, warm_start=None) -> None:
    """Raise unless ``schedule`` can run the chain of ``model`` under ``plan`` and policy ``pol``
    (callers that change the model first, like ``finetune``, check before they do)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"chain_schedule must be a dipgo Schedule, got {type(schedule).__name__}")
    if not pol.one_call:
        raise ValueError(f"chain_schedule applies to one-call policies, not {str(pol)!r}")
    if warm_start is not None:
        raise ValueError("chain_schedule with warm_start is not supported: the schedule covers whole runs")
    if not isinstance(model, torch.nn.Module):
        raise TypeError("give chain_model: the model the schedule applies to")
    if schedule.calls != plan.n:
        raise ValueError(f"chain_schedule has {schedule.calls} denoiser calls, the scheduler's run makes {plan.n}; "
                         f"use schedule.resize({plan.n})")
    schedule.validate(model, plan.n)  # another model's schedule raises here


@torch.no_grad()
def warmup(model_fn: Callable, scheduler, x_T: Tensor, calls: int, config: ChainConfig | None = None, *,
           generator: torch.Generator | None = None, plan: Plan | None = None, progress: bool = False) -> WarmStart:
    """Run the first ``calls`` denoiser calls once (no graph; ``config``'s guidance, eta and
    autocast) and return the state to re-run the rest from (``shortcut_sample(...,
    warm_start=state)``, optimising ``state.x``)."""
    _check_latent(x_T, "x_T")
    cfg = ChainConfig.of(config)
    plan = plan or Plan(scheduler, cfg.eta)
    if not 0 <= calls < plan.n:
        raise ValueError(f"calls must lie in 0..{plan.n - 1} (the scheduler has {plan.n} calls), got {calls}")
    if generator is None and plan.needs_noise:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    chain = Chain(scheduler, cfg.guidance, generator=generator, plan=plan, autocast=cfg.autocast)
    xs, outs = {}, {}
    x = chain.run(chain.first_latent(x_T.detach()), lambda i, x_in, t: model_fn(x_in, t), stop=calls, xs=xs,
                  outs=outs, progress=progress, desc="sdo warm-up")
    # keep only what the re-run calls still reference
    need_x = {j for st in plan.steps[calls:] for j in st.history_x if j < calls}
    need_out = {j for st in plan.steps[calls:] for j in st.history_out if j < calls}
    return WarmStart(calls, x, {j: xs[j] for j in need_x}, {j: outs[j] for j in need_out}, plan.n)
