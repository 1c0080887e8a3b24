"""The sampling chain: the one loop over a scheduler's denoiser calls.

Every sampler in the library runs through :class:`Chain`: the zoo's ``sample``, SDO's
autograd and memory-light chains and its ``warmup``, DiP-GO's training runs. The chain owns
what all of them share:

- the loop over calls, each call's input scaling and the scheduler's update
  (``samplers.guided_update``: classifier-free guidance fused with the update, the history
  terms of multistep samplers, the noise of stochastic ones, drawn from ``generator``);
- the outputs' form: with ``guidance`` the denoiser returns ``(output_uncond, output_cond)``
  (one batched call, ``models.conditioning``), without it one output;
- autocast of the denoiser calls;
- one hook for "this call keeps its graph" (``keeps_graph``): the other calls run under
  ``torch.no_grad()``. What a kept call does beyond that (checkpointing, per-sample masks,
  gradient weights) is the caller's ``call`` function's business.

A cache schedule (``dipgo.accelerate``) is applied around ``run`` by the caller: the runtime
sits above this module.

Schedulers without a linear form here (``samplers.is_supported`` is False) still sample: their
own ``step()`` makes the update from the guided output. Gradient methods need the linear form
(``plan``) and raise without it.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from .ops.guided_step import guided_step
from .samplers import LinearStep, Plan, guided_update, is_supported

__all__ = ["Chain"]

# call(i, x_in, t) -> output, or (output_uncond, output_cond) with guidance
Call = Callable[[int, Tensor, Tensor], "Tensor | tuple[Tensor, Tensor]"]


class Chain:
    """One sampling run of ``scheduler`` (``set_timesteps`` called).

    guidance: the CFG scale ``w`` (``out_u + w * (out_c - out_u)``); None: the denoiser
        returns one output.
    eta: DDIM's noise weight (linear form only).
    generator: draws the noise of stochastic samplers (DDPM, DDIM with eta > 0).
    plan: the scheduler's :class:`~shortcut_kernels.samplers.Plan`, when the caller has one.
    autocast: a dtype (``torch.bfloat16`` / ``torch.float16``) to run the denoiser calls in.
    noise_rows: ``(global_batch, rows)``: the run is the ``rows`` slice of a larger batch (one
        rank's share of a distributed batch); each noise draw is the whole batch's, from the
        same ``generator`` on every rank, and this run takes its rows, so the ranks' samples
        are those of one process running the whole batch. None: the draw is this run's batch.
    """

    def __init__(self, scheduler, guidance: float | None = None, *, eta: float = 0.0,
                 generator: torch.Generator | None = None, plan: Plan | None = None,
                 autocast: torch.dtype | None = None, noise_rows: tuple[int, slice] | None = None):
        self.scheduler = scheduler
        if plan is None and is_supported(scheduler):
            plan = Plan(scheduler, eta)
        self.plan = plan
        self.noise_rows = _check_noise_rows(noise_rows, plan)
        self.guidance = None if guidance is None else float(guidance)
        self.generator = generator
        self.autocast = autocast
        self.timesteps = plan.timesteps if plan is not None else scheduler.timesteps
        self.n = plan.n if plan is not None else len(scheduler.timesteps)

    @property
    def w(self) -> float:
        """The guidance weight of the update (1: the conditional output alone)."""
        return 1.0 if self.guidance is None else self.guidance

    # ------------------------------------------------------------------ one call
    def first_latent(self, noise: Tensor) -> Tensor:
        """Unit noise scaled to the scheduler's first sample (``init_noise_sigma``)."""
        if self.plan is not None:
            return noise * self.plan.init_scale
        return noise * self.scheduler.init_noise_sigma

    def model_input(self, i: int, x: Tensor) -> Tensor:
        """The denoiser's input at call ``i`` (``scheduler.scale_model_input``)."""
        if self.plan is not None:
            return self.plan.steps[i].input_scale * x
        return self.scheduler.scale_model_input(x, self.timesteps[i])

    def outputs(self, out, like: Tensor) -> tuple[Tensor, Tensor]:
        """A denoiser's return as ``(output_uncond, output_cond)`` in ``like``'s dtype."""
        if self.guidance is None:
            if not isinstance(out, Tensor):
                raise TypeError("model_fn returned a pair but guidance is None; give guidance=w for "
                                "classifier-free guidance, or return one tensor")
            out = out.to(like.dtype)
            return out, out
        if isinstance(out, Tensor) or len(out) != 2:
            raise TypeError("with guidance, model_fn(x, t) must return (output_uncond, output_cond)")
        return out[0].to(like.dtype), out[1].to(like.dtype)

    def denoise(self, call: Call, i: int, x_in: Tensor, t, like: Tensor) -> tuple[Tensor, Tensor]:
        """``call`` under the chain's autocast, its outputs as a pair in ``like``'s dtype."""
        ctx = (torch.autocast(like.device.type, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with ctx:
            out = call(i, x_in, t)
        return self.outputs(out, like)

    def noise(self, st: LinearStep, like: Tensor) -> Tensor | None:
        """This call's noise draw (None for a deterministic update)."""
        if not st.noise:
            return None
        if self.generator is None:
            raise ValueError(f"call {st.index} injects noise: give the chain a generator")
        shape = tuple(like.shape)
        if self.noise_rows is not None:
            whole, rows = self.noise_rows
            shape = (whole, *shape[1:])
        z = torch.randn(shape, generator=self.generator, dtype=like.dtype, device=self.generator.device)
        if self.noise_rows is not None:
            z = z[rows]
            if z.shape[0] != like.shape[0]:
                raise ValueError(f"noise_rows takes {z.shape[0]} rows of the batch of {whole}, the chain runs "
                                 f"{like.shape[0]} samples: give the rows of this run's samples")
        return z.to(like.device)

    def update(self, i: int, x: Tensor, eu: Tensor, ec: Tensor, xs: dict, outs: dict) -> Tensor:
        """x_{i+1}: the fused guidance + update of call ``i``, plus earlier calls' terms."""
        if self.plan is None:
            kw = {}
            if "generator" in inspect.signature(self.scheduler.step).parameters:
                kw["generator"] = self.generator
            out = guided_step(x, eu, ec, 0.0, 1.0, self.w)
            return self.scheduler.step(out, self.timesteps[i], x, **kw).prev_sample
        st = self.plan.steps[i]
        return guided_update(st, x, eu, ec, self.w, xs, outs, self.plan.kept_x, self.plan.kept_out,
                             self.noise(st, x))

    # ------------------------------------------------------------------ the loop
    def run(self, x: Tensor, call: Call, *, start: int = 0, stop: int | None = None, xs: dict | None = None,
            outs: dict | None = None, keeps_graph: Callable[[int], bool] | None = None,
            on_call: Callable[[int, Tensor], None] | None = None,
            on_output: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
            progress: bool | tqdm = False,
            desc: str = "sampling") -> Tensor:
        """Run calls ``start..stop-1`` from ``x`` (the sample entering call ``start``: for a
        whole run, ``first_latent(noise)``) and return the sample after the last one.

        call: ``call(i, x_in, t)``, the denoiser at call ``i`` on its scaled input.
        xs / outs: the earlier samples and guided outputs that later multistep updates use
            (a warm start's); filled in place.
        keeps_graph: ``keeps_graph(i)`` says whether call ``i`` keeps its graph; the other
            calls run under ``torch.no_grad()``. None: every call runs in the ambient grad mode.
        on_call: ``on_call(i, x)`` sees the sample entering each call, before it runs.
        on_output: ``on_output(i, out_u, out_c) -> (out_u, out_c)`` may change each call's
            outputs before the update (SDO's per-sample masks and gradient weights).
        progress: show a bar, or a ``tqdm`` bar to advance (one tick per call).
        """
        xs = {} if xs is None else xs
        outs = {} if outs is None else outs
        stop = self.n if stop is None else stop
        if not 0 <= start <= stop <= self.n:
            raise ValueError(f"calls {start}..{stop} do not lie in the run's 0..{self.n}")
        own_bar = not isinstance(progress, tqdm)
        bar = tqdm(total=stop - start, desc=desc, disable=not progress, leave=False) if own_bar else progress
        try:
            for i in range(start, stop):
                if on_call is not None:
                    on_call(i, x)
                x_in = self.model_input(i, x)
                t = self.timesteps[i]
                if keeps_graph is None or keeps_graph(i):
                    eu, ec = self.denoise(call, i, x_in, t, x)
                else:
                    with torch.no_grad():
                        eu, ec = self.denoise(call, i, x_in, t, x)
                if on_output is not None:
                    eu, ec = on_output(i, eu, ec)
                x = self.update(i, x, eu, ec, xs, outs)
                bar.update(1)
        finally:
            if own_bar:
                bar.close()
        return x


def _check_noise_rows(noise_rows, plan: Plan | None) -> tuple[int, slice] | None:
    """``noise_rows`` as ``(global_batch, slice)``, or a clear error."""
    if noise_rows is None:
        return None
    if (not isinstance(noise_rows, tuple) or len(noise_rows) != 2 or not isinstance(noise_rows[1], slice)
            or not isinstance(noise_rows[0], int) or noise_rows[0] < 1):
        raise TypeError(f"noise_rows must be (global_batch, slice) with global_batch >= 1, got {noise_rows!r}")
    if plan is None:  # the scheduler's own step() draws the noise of the batch it is given
        raise ValueError("noise_rows needs a scheduler with a linear form (samplers.is_supported): "
                         "its step() draws only this run's batch")
    return noise_rows
