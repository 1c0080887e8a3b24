"""The shortcut sampler: a sampling chain in which one denoiser call keeps its graph.

With every other call's output held constant, each sampler update is linear in the samples
(``shortcut_kernels.samplers``), so the final sample's Jacobian w.r.t. any latent of the
chain is a scalar times the identity, plus the kept call's own Jacobian. Two
implementations of that one gradient:

- reference (``memory_light=False``): the chain under autograd, outputs of the other calls
  detached. Also serves the baselines that keep several calls (``full``, ``draft:K``,
  ``alignprop``), each kept call under activation checkpointing.
- memory-light (default for one-call policies): the chain runs under
  ``torch.inference_mode()`` and stores only the kept call's input; ``_Shortcut`` recomputes
  that call at backward time and applies the exact linear map of the rest of the chain, as
  scalar recurrences over the scheduler's coefficients (a product for one-step samplers;
  the history terms of DPM-Solver++ 2M and PLMS enter the same recurrence). LoRA adapters
  are merged into their base weights for that chain (``sdo.adapters``).

Every update is ``guided_step(x, eps_uncond, eps_cond, a, b, w)`` (CFG fused with the
update) plus, for multistep samplers, the earlier calls' terms.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..ops.guided_step import guided_step
from ..samplers import LinearStep, guided_update, history_indices, initial_scale, linear_steps
from .adapters import merged_adapters
from .policy import Policy, parse_policy

__all__ = ["shortcut_sample", "warmup", "WarmStart", "ClassConditional", "TextConditional", "DiTConditional",
           "Plan"]


# ---------------------------------------------------------------- the chain's plan

class Plan:
    """The linear forms of one sampling run and the scalar recurrences over them."""

    def __init__(self, scheduler, eta: float = 0.0):
        self.steps: list[LinearStep] = linear_steps(scheduler, eta)
        self.n = len(self.steps)
        self.timesteps = scheduler.timesteps.detach().cpu()
        self.init_scale = initial_scale(scheduler)
        self.needs_noise = any(st.noise for st in self.steps)
        # who uses sample j / output j, as (call i, coefficient): the adjoint's edges
        self.x_users: list[list[tuple[int, float]]] = [[] for _ in range(self.n)]
        self.out_users: list[list[tuple[int, float]]] = [[] for _ in range(self.n)]
        for st in self.steps:
            for j, c in st.x.items():
                self.x_users[j].append((st.index, c))
            for j, c in st.out.items():
                self.out_users[j].append((st.index, c))
        self.kept_x, self.kept_out = history_indices(self.steps)  # what later calls still use
        self._p: dict[int, list[float]] = {}

    def chain_sensitivity(self, start: int) -> list[float]:
        """p[j] = dx_n/dx_j with all outputs held, for j = start..n (x_j enters call j)."""
        if start not in self._p:
            p = [0.0] * (self.n + 1)
            p[self.n] = 1.0
            for j in range(self.n - 1, start - 1, -1):
                p[j] = sum(c * p[i + 1] for i, c in self.x_users[j])
            self._p[start] = p
        return self._p[start]

    def output_sensitivity(self, k: int, start: int) -> float:
        """dx_n/d out_k: the scalar on the kept call's output."""
        p = self.chain_sensitivity(start)
        return sum(c * p[i + 1] for i, c in self.out_users[k])

    def importance(self, start: int) -> Tensor:
        """p[k] over the calls ``start..n-1`` (zero before), proportional to |dx_n/d out_k|: the
        importance policies' draw. A call the final sample does not depend on is never drawn."""
        sens = torch.tensor([0.0] * start + [abs(self.output_sensitivity(k, start)) for k in range(start, self.n)],
                            dtype=torch.float64)
        if not bool(sens.sum() > 0):  # nothing reaches x_n: uniform (every gradient is zero anyway)
            sens[start:] = 1.0
        return sens / sens.sum()

    def reach(self, k: int, start: int) -> float:
        """dx_k/dx_start with all outputs held: how the start latent reaches the kept call."""
        q = {k: 1.0}
        for j in range(k - 1, start - 1, -1):
            q[j] = sum(c * q.get(i + 1, 0.0) for i, c in self.x_users[j] if i + 1 <= k)
        return q[start]


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


class ClassConditional(torch.nn.Module):
    """A zoo model (``model(x, t, labels)``) as an SDO ``model_fn(x, t)``: returns
    ``(eps_uncond, eps_cond)`` (one batched call) when ``guidance`` is on, else the output for
    ``labels`` (e.g. all ``NULL_LABEL`` for the unconditional model)."""

    def __init__(self, model: torch.nn.Module, labels, guidance: bool = False, null_label: int | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.long).flatten(), persistent=False)
        self.guidance = bool(guidance)
        self.null_label = int(null_label if null_label is not None else getattr(model, "null_label", 10))

    def forward(self, x: Tensor, t) -> Tensor | tuple[Tensor, Tensor]:
        labels = self.labels.to(x.device)
        if labels.numel() == 1:
            labels = labels.expand(x.shape[0])
        if not self.guidance:
            return self.model(x, t, labels)
        t = torch.as_tensor(t, device=x.device)
        t2 = torch.cat([t, t]) if t.ndim else t
        both = self.model(torch.cat([x, x]), t2, torch.cat([torch.full_like(labels, self.null_label), labels]))
        uncond, cond = both.chunk(2)
        return uncond, cond


class TextConditional(torch.nn.Module):
    """A diffusers text-conditioned UNet (``UNet2DConditionModel``: SD-1.x/2.x, SDXL) as an
    SDO ``model_fn(x, t)``.

    prompt_embeds: ``[1 or B, tokens, dim]`` from the pipeline's text encoder (e.g.
        ``pipe.encode_prompt``); one row is broadcast over the batch.
    negative_prompt_embeds: the unconditional embeddings; given, the call is one batched
        pass returning ``(eps_uncond, eps_cond)`` for classifier-free guidance.
    added_cond_kwargs: SDXL's ``{"text_embeds": [1 or B, d], "time_ids": [1 or B, 6]}``, for
        the conditional half; ``negative_added_cond_kwargs`` for the unconditional one (default:
        the same).
    """

    def __init__(self, unet: torch.nn.Module, prompt_embeds: Tensor, negative_prompt_embeds: Tensor | None = None,
                 added_cond_kwargs: dict | None = None, negative_added_cond_kwargs: dict | None = None):
        super().__init__()
        self.model = unet
        if prompt_embeds.dim() != 3:
            raise ValueError(f"prompt_embeds must be [1 or B, tokens, dim], got shape {tuple(prompt_embeds.shape)}")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} does not match "
                             f"prompt_embeds {tuple(prompt_embeds.shape)} after the batch dimension")
        self.cond, self.uncond = prompt_embeds, negative_prompt_embeds
        self.added = dict(added_cond_kwargs or {})
        self.negative_added = dict(negative_added_cond_kwargs or self.added)
        self.guidance = negative_prompt_embeds is not None

    @staticmethod
    def _rows(t: Tensor, batch: int, name: str) -> Tensor:
        if t.shape[0] == batch:
            return t
        if t.shape[0] != 1:
            raise ValueError(f"{name} has {t.shape[0]} rows for a batch of {batch}: give 1 or {batch}")
        return t.expand(batch, *t.shape[1:])

    def _kwargs(self, embeds: Tensor, added: dict, batch: int, like: Tensor, which: str) -> dict:
        kw = {"encoder_hidden_states": self._rows(embeds, batch, which).to(like.device)}
        if added:
            kw["added_cond_kwargs"] = {k: self._rows(v, batch, f"{which} {k}").to(like.device)
                                       for k, v in added.items()}
        return kw

    def forward(self, x: Tensor, t) -> Tensor | tuple[Tensor, Tensor]:
        n = x.shape[0]
        cond = self._kwargs(self.cond, self.added, n, x, "prompt_embeds")
        if not self.guidance:
            return self.model(x, t, **cond, return_dict=False)[0]
        uncond = self._kwargs(self.uncond, self.negative_added, n, x, "negative_prompt_embeds")
        t = torch.as_tensor(t, device=x.device)
        t2 = torch.cat([t, t]) if t.ndim else t
        both = {"encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])}
        if "added_cond_kwargs" in cond:
            both["added_cond_kwargs"] = {k: torch.cat([uncond["added_cond_kwargs"][k], v])
                                         for k, v in cond["added_cond_kwargs"].items()}
        out = self.model(torch.cat([x, x]), t2, **both, return_dict=False)[0]
        eu, ec = out.chunk(2)
        return eu, ec


class DiTConditional(torch.nn.Module):
    """A diffusers class-conditional transformer (``DiTTransformer2DModel``: DiT-XL/2) as an SDO
    ``model_fn(x, t)``: the eps channels of its output (a learned-sigma model's variance half is
    dropped, as ``DiTPipeline`` does). With ``guidance``, one batched call returns
    ``(eps for null_class, eps for class_labels)``; ``null_class`` defaults to the model's
    number of classes (1000 for DiT-XL/2), the label its pipeline uses."""

    def __init__(self, transformer: torch.nn.Module, class_labels, guidance: bool = False,
                 null_class: int | None = None):
        super().__init__()
        cfg = getattr(transformer, "config", None)
        if cfg is None or "in_channels" not in cfg:
            raise TypeError(f"transformer must be a diffusers model with a config, got {type(transformer).__name__}")
        self.model = transformer
        self.channels = int(cfg["in_channels"])
        self.register_buffer("labels", torch.as_tensor(class_labels, dtype=torch.long).flatten(), persistent=False)
        if null_class is None:
            null_class = cfg.get("num_embeds_ada_norm")
        if guidance and null_class is None:
            raise ValueError("give null_class: the model's config has no num_embeds_ada_norm")
        self.guidance, self.null_class = bool(guidance), null_class

    def forward(self, x: Tensor, t) -> Tensor | tuple[Tensor, Tensor]:
        n = x.shape[0]
        labels = self.labels.to(x.device)
        if labels.numel() == 1:
            labels = labels.expand(n)
        elif labels.numel() != n:
            raise ValueError(f"{labels.numel()} class labels for a batch of {n}: give 1 or {n}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(n) if t.ndim == 0 else t
        if not self.guidance:
            return self.model(x, timestep=t, class_labels=labels).sample[:, :self.channels]
        null = torch.full_like(labels, int(self.null_class))
        out = self.model(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=torch.cat([null, labels])).sample
        eu, ec = out[:, :self.channels].chunk(2)
        return eu, ec


# ---------------------------------------------------------------- one step

class _Runner:
    """Everything one run needs: plan, model, guidance, kept calls, noise."""

    def __init__(self, plan: Plan, model_fn, guidance, autocast, start: WarmStart | None,
                 kept: Tensor, generator, progress: bool, checkpoint_kept: bool):
        self.plan, self.model_fn, self.autocast = plan, model_fn, autocast
        self.guidance = None if guidance is None else float(guidance)
        self.warm = start
        self.start = 0 if start is None else start.index
        self.kept = kept
        self.weights: Tensor | None = None  # [B] float64: each sample's multiplier on its kept call's gradient
        self.generator = generator
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
        from ..dipgo import accelerate

        model, schedule = self.chain_schedule
        stack = contextlib.ExitStack()
        handle = stack.enter_context(accelerate(model, schedule))
        stack.enter_context(handle.run())
        return stack

    # model -------------------------------------------------------------
    def denoise(self, x_in: Tensor, t, like: Tensor) -> tuple[Tensor, Tensor]:
        ctx = (torch.autocast(like.device.type, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with ctx:
            out = self.model_fn(x_in, t)
        if self.guidance is None:
            if not isinstance(out, Tensor):
                raise TypeError("model_fn returned a pair but guidance is None; give guidance=w for "
                                "classifier-free guidance, or return one tensor")
            out = out.to(like.dtype)
            return out, out
        if isinstance(out, Tensor) or len(out) != 2:
            raise TypeError("with guidance, model_fn(x, t) must return (output_uncond, output_cond)")
        return out[0].to(like.dtype), out[1].to(like.dtype)

    @property
    def w(self) -> float:
        return 1.0 if self.guidance is None else self.guidance

    def noise(self, st: LinearStep, like: Tensor) -> Tensor | None:
        if not st.noise:
            return None
        z = torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=self.generator.device)
        return z.to(like.device)

    def update(self, st: LinearStep, x: Tensor, eu: Tensor, ec: Tensor, xs: dict, outs: dict) -> Tensor:
        """x_{i+1}: the fused CFG + update of this call, plus earlier calls' terms and noise."""
        return guided_update(st, x, eu, ec, self.w, xs, outs, self.plan.kept_x, self.plan.kept_out,
                             self.noise(st, x))

    def first_latent(self, x: Tensor) -> tuple[Tensor, dict, dict]:
        if self.warm is None:
            return x * self.plan.init_scale, {}, {}
        return x, dict(self.warm.xs), dict(self.warm.outs)

    def bar(self):
        return tqdm(total=self.plan.n - self.start, desc="sdo chain", disable=not self.progress, leave=False)

    # (a) autograd chain --------------------------------------------------
    def autograd_chain(self, x_start: Tensor, one_call: bool) -> Tensor:
        x, xs, outs = self.first_latent(x_start)
        kept = self.kept
        with self.chain_context(), self.bar() as bar:
            for st in self.plan.steps[self.start:]:
                i, t = st.index, self.plan.timesteps[st.index]
                mask = (kept == i) if one_call else None
                keep = bool(mask.any()) if one_call else bool((kept == i).any())
                x_in = st.input_scale * x
                if keep and self.checkpoint_kept:
                    eu, ec = checkpoint(lambda xi, t=t, x=x: self.denoise(xi, t, x), x_in, use_reentrant=False)
                elif keep:
                    eu, ec = self.denoise(x_in, t, x)
                else:
                    with torch.no_grad():
                        eu, ec = self.denoise(x_in, t, x)
                if keep and one_call and not bool(mask.all()):  # per-sample: only these samples keep it
                    m = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
                    eu = torch.where(m, eu, eu.detach())
                    ec = torch.where(m, ec, ec.detach())
                if keep and one_call and self.weights is not None:
                    w = self.weights.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
                    eu, ec = _ScaleGrad.apply(eu, w), _ScaleGrad.apply(ec, w)
                x = self.update(st, x, eu, ec, xs, outs)
                bar.update(1)
        return x

    # (b) memory-light ----------------------------------------------------
    def light_forward(self, x_start: Tensor) -> tuple[Tensor, Tensor]:
        with merged_adapters(self.adapters), torch.inference_mode(), self.chain_context(), self.bar() as bar:
            x, xs, outs = self.first_latent(x_start.detach())
            kept_x = torch.empty_like(x)
            kept = self.kept.to(x.device)
            kept_steps = set(self.kept.tolist())  # decided on the host: no device sync per call
            for st in self.plan.steps[self.start:]:
                if st.index in kept_steps:
                    mask = kept == st.index
                    kept_x[mask] = x[mask]
                eu, ec = self.denoise(st.input_scale * x, self.plan.timesteps[st.index], x)
                x = self.update(st, x, eu, ec, xs, outs)
                bar.update(1)
        return x.clone(), kept_x.clone()  # out of inference mode: ordinary tensors

    def light_backward(self, kept_x: Tensor, grad: Tensor, need_x: bool, params: Sequence[Tensor]):
        plan, start = self.plan, self.start
        ks = self.kept.tolist()
        uniq = sorted(set(ks))
        gamma = {k: plan.output_sensitivity(k, start) for k in uniq}
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
            eu, ec = self.denoise(scale * xk, t, xk)
            out = guided_step(xk, eu, ec, 0.0, 1.0, self.w)  # the kept call's (guided) output
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
    policy: str | Policy = "first",
    *,
    guidance: float | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    warm_start: WarmStart | None = None,
    memory_light: bool | None = None,
    params: Iterable[Tensor] | None = None,
    autocast: torch.dtype | None = None,
    plan: Plan | None = None,
    chain_schedule=None,
    chain_model: torch.nn.Module | None = None,
    merge_adapters: bool = True,
    progress: bool = False,
    return_kept: bool = False,
):
    """Sample with ``scheduler`` from ``x_T`` keeping the graph of one denoiser call per sample.

    model_fn: ``model_fn(x, t) -> output`` (``t``: a 0-d timestep, or one per sample under
        ``per-sample``); with ``guidance``, it returns ``(output_uncond, output_cond)``
        (``ClassConditional`` wraps a zoo model, ``TextConditional`` a diffusers text UNet).
        Outputs are what the scheduler's ``prediction_type`` says (eps, v, ...). Must be
        deterministic (recomputed at backward).
    scheduler: a diffusers scheduler with ``set_timesteps`` called (see
        ``shortcut_kernels.samplers`` for the supported ones). It is not mutated.
    x_T: unit Gaussian noise ``[B, ...]`` (scaled by ``init_noise_sigma`` here, as diffusers
        pipelines do with ``latents=``), or with ``warm_start`` the latent entering call
        ``warm_start.index``. The gradient reaches it when it requires grad.
    policy: ``first``, ``fixed:k``, ``random``, ``per-sample``, ``random:importance``,
        ``per-sample:importance``; or a baseline ``full``, ``draft:K``, ``alignprop`` (see
        ``sdo.policy``).
    guidance: the CFG scale ``w`` (``eps_u + w*(eps_c - eps_u)``), or None (one output).
    eta: DDIM's noise weight; noise (DDIM eta > 0, DDPM) is drawn from ``generator`` once per
        call of this function and held fixed, as are the random policies' choices.
    memory_light: one-call policies default to the memory-light path (True); False runs the
        reference autograd chain. Baselines always run the autograd chain.
    params: tensors the gradient should reach through the kept call (default: the
        parameters of ``model_fn`` that require grad, if it is a Module).
    autocast: a dtype (torch.bfloat16 / torch.float16) to run the model calls in.
    chain_schedule: a DiP-GO ``Schedule`` for the chain's calls (one-call policies): the other
        calls reuse cached blocks as it says, the kept calls compute everything (their rows are
        made full) and the backward recompute runs the full model. ``chain_model`` is the
        model the schedule applies to (default: ``model_fn.model`` or ``model_fn``).
    merge_adapters: the calls that keep no graph run with the model's LoRA adapters (peft)
        merged into their base weights, restored bit-exactly after (``sdo.adapters``); the kept
        call keeps them apart, so the gradient reaches them. The model is ``chain_model`` or
        ``model_fn`` when it is a Module. False runs every call with the adapters apart.
    return_kept: also return the kept call(s) (``[B]`` for one-call policies).
    Returns the final sample ``x_0`` (same dtype as ``x_T``).
    """
    _check_latent(x_T, "x_T")
    pol = parse_policy(policy)
    if plan is None:
        plan = Plan(scheduler, eta)
    if guidance is not None:
        guidance = float(guidance)
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be finite, got {guidance}")
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast}")
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
    if memory_light is None:
        memory_light = pol.one_call
    if memory_light and not pol.one_call:
        raise ValueError(f"policy {str(pol)!r} keeps several calls: memory_light applies to one-call policies")
    runner = _Runner(plan, model_fn, guidance, autocast, warm_start, kept, generator, progress,
                     checkpoint_kept=not pol.one_call)
    runner.weights = pol.grad_weights(kept, start, probs)
    if chain_schedule is not None:
        runner.chain_schedule = _kept_calls_full(chain_schedule, chain_model or getattr(model_fn, "model", model_fn),
                                                 plan, pol, kept, warm_start)
    if merge_adapters:
        owner = chain_model if chain_model is not None else model_fn
        runner.adapters = owner if isinstance(owner, torch.nn.Module) else None
    grad_wanted = torch.is_grad_enabled() and (x_T.requires_grad or bool(ps))
    if not grad_wanted:
        with torch.no_grad(), merged_adapters(runner.adapters):
            x0 = runner.autograd_chain(x_T, pol.one_call)
    elif memory_light:
        runner.params = ps
        x0 = _Shortcut.apply(runner, x_T, *ps)
    else:
        x0 = runner.autograd_chain(x_T, pol.one_call)
    return (x0, kept) if return_kept else x0


def _kept_calls_full(schedule, model, plan: Plan, pol: Policy, kept: Tensor, warm_start):
    """Check ``schedule`` against the model and the run; return it with the kept calls' rows full."""
    from ..dipgo import Schedule

    check_chain_schedule(schedule, model, plan, pol, warm_start)
    keep = schedule.keep.clone()
    keep[sorted(set(kept.tolist()))] = True
    full = Schedule(keep, schedule.graph, name=schedule.name, params=schedule.params,
                    sampler=schedule.sampler, steps=schedule.steps)
    return model, full


def check_chain_schedule(schedule, model, plan: Plan, pol: Policy, warm_start=None) -> None:
    """Raise unless ``schedule`` can run the chain of ``model`` under ``plan`` and policy ``pol``
    (callers that change the model first, like ``finetune``, check before they do)."""
    from ..dipgo import Schedule

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
def warmup(model_fn: Callable, scheduler, x_T: Tensor, calls: int, *, guidance: float | None = None,
           eta: float = 0.0, generator: torch.Generator | None = None, autocast: torch.dtype | None = None,
           plan: Plan | None = None, progress: bool = False) -> WarmStart:
    """Run the first ``calls`` denoiser calls once (no graph) and return the state to re-run
    the rest from (``shortcut_sample(..., warm_start=state)``, optimising ``state.x``)."""
    _check_latent(x_T, "x_T")
    plan = plan or Plan(scheduler, eta)
    if not 0 <= calls < plan.n:
        raise ValueError(f"calls must lie in 0..{plan.n - 1} (the scheduler has {plan.n} calls), got {calls}")
    if generator is None and plan.needs_noise:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    runner = _Runner(plan, model_fn, guidance, autocast, None, torch.zeros(0, dtype=torch.long), generator,
                     progress, False)
    x, xs, outs = runner.first_latent(x_T.detach())
    for st in plan.steps[:calls]:
        eu, ec = runner.denoise(st.input_scale * x, plan.timesteps[st.index], x)
        x = runner.update(st, x, eu, ec, xs, outs)
    # keep only what the re-run calls still reference
    need_x = {j for st in plan.steps[calls:] for j in st.history_x if j < calls}
    need_out = {j for st in plan.steps[calls:] for j in st.history_out if j < calls}
    return WarmStart(calls, x, {j: xs[j] for j in need_x}, {j: outs[j] for j in need_out}, plan.n)
