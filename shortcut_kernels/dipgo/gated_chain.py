"""A sampling run of a class-conditional model through the SuperNet, call by call: the chain
that DiP-GO's pruner training (:mod:`.train`) and the estimate-guided learner (:mod:`.learn`)
both run, and the full model's samples they are compared with.

``_Chain.run`` takes one gate row per call; with hard, cascade-normalised gates and no graph it
runs through the runtime (``accelerate``), which skips the reused blocks, so the run costs the
kept MACs. ``on_call`` / ``on_output`` see each call's inputs, caches and outputs.
``_Chain.run_schedule`` runs a :class:`Schedule` through the SuperNet with its forecast reuse:
each call's caches are extrapolated from the blocks' computed outputs on the runtime's forecast
ops (:func:`forecast_caches`), so :func:`.learn.estimate` and its adjoint see what a forecasting
schedule computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..chain import Chain
from ..models.conditioning import guidance_batch
from ..runtime import forecast as _forecast
from ..runtime.cache import accelerate
from ..runtime.schedule import Schedule
from .supernet import SuperNet, _flatten

__all__ = ["full_samples", "forecast_caches", "pushed", "Trace", "first_change"]

History = list  # per block: [(call, cache leaves), ...] of its last computed outputs, newest last
DEPTH = 3       # computed outputs a history keeps: what order 2 reads


def forecast_caches(hist: History, call: int, keep, orders) -> list:
    """The caches a SuperNet call at ``call`` reads: per block, its newest computed output, or
    where the block is reused at forecast order ``orders[b]`` (lowered to what its history
    allows, as :meth:`Schedule.forecast_orders`) the extrapolation of its last ones
    (:func:`.forecast.extrapolate` with :func:`.forecast.gates`; transformer blocks: their
    residuals, as the runtime)."""
    out = []
    for b, h in enumerate(hist):
        order = 0 if bool(keep[b]) else min(int(orders[b]), len(h) - 1)
        if order == 0:
            out.append(h[-1][1])
            continue
        last = h[::-1][:order + 1]
        gates = _forecast.gates(_forecast.weights(call, [c for c, _ in last]))
        leaves = last[0][1]
        acc = torch.promote_types(leaves[0].dtype, torch.float32)  # as the runtime's gates
        coefs = tuple(None if g is None else torch.tensor(g, dtype=acc, device=leaves[0].device) for g in gates)
        out.append([_forecast.extrapolate([lv[i] for _, lv in last], coefs) for i in range(len(leaves))])
    return out


def pushed(hist: History | None, call: int, keep, caches) -> History:
    """``hist`` after ``call``: the blocks ``keep`` computes add their new caches (a new list;
    ``hist`` itself is unchanged, so recorded histories can be shared)."""
    if hist is None:
        return [[(call, c)] for c in caches]
    return [(h + [(call, c)])[-DEPTH:] if bool(k) else h for h, k, c in zip(hist, keep, caches)]


@dataclass
class Trace:
    """A traced run (:meth:`_Chain.traced_run`) of ``schedule``: per call, at its entry, the
    sample, the sampler's earlier samples and outputs and the runtime's state; and the final
    sample. The tensors are shared with the run, so a trace holds about every block output the
    run computed."""

    schedule: Schedule
    entries: list  # per call: (x, xs, outs, runtime state snapshot)
    final: Tensor


def first_change(traced: Schedule, schedule: Schedule) -> int:
    """The first call at which ``schedule`` runs differently from ``traced`` (its modes or
    forecast orders; the forecast weights follow from those and the earlier calls), so a run of
    it can resume from a trace of ``traced`` there; ``schedule.calls`` if none does, 0 if it
    cannot resume (another graph or call count, or a block forecasting from more outputs than
    the trace keeps)."""
    if traced.graph.names != schedule.graph.names or traced.calls != schedule.calls or any(
            d > e for d, e in zip(schedule.forecast_depth, traced.forecast_depth)):
        return 0
    for t, (a, b, oa, ob) in enumerate(zip(traced.modes, schedule.modes, traced.forecast_orders,
                                           schedule.forecast_orders)):
        if a != b or oa != ob:
            return t
    return schedule.calls


class _Chain:
    """One sampling run of a class-conditional zoo-style model ``model(x, t, labels) -> eps``
    with classifier-free guidance, through the SuperNet: the gates of call ``i`` are row ``i``,
    the caches pass from call to call."""

    def __init__(self, net: SuperNet, scheduler, guidance: float, null_label: int):
        self.net = net
        self.chain = Chain(scheduler, guidance)
        self.plan = self.chain.plan
        if self.plan is None:
            raise ValueError(f"{type(scheduler).__name__} has no linear form: DiP-GO training needs one "
                             "(see shortcut_kernels.samplers)")
        self.steps, self.timesteps, self.n = self.plan.steps, self.plan.timesteps, self.plan.n
        self.w = self.chain.w
        self.null = null_label

    def call(self, x: Tensor, t: Tensor, labels: Tensor, gates: Tensor, caches):
        """One guided denoiser call on ``x`` (already input-scaled): (eps_u, eps_c, caches)."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        g = gates if gates.dim() == 1 else torch.cat([gates, gates])  # per-sample rows: both halves
        out, caches = self.net(*guidance_batch(x, t, labels, self.null), gates=g, caches=caches)
        eu, ec = out.chunk(2)
        return eu, ec, caches

    def schedule_of(self, gates: Tensor) -> Schedule | None:
        """The schedule that hard, cascade-normalised gates describe (None for any other gates:
        soft values, per-sample rows, call 0 not computing, or nothing reused)."""
        if gates.dim() != 2 or not bool(((gates == 0) | (gates == 1)).all()) or bool(gates.all()):
            return None
        keep = gates.detach().cpu() > 0.5
        if not bool(keep[0].all()) or not torch.equal(self.net.graph.cascade(keep), keep):
            return None
        return Schedule(keep, self.net.graph)

    def _run_skipping(self, x_T: Tensor, labels: Tensor, schedule: Schedule, on_call: Callable | None,
                      on_output: Callable | None = None):
        """The no-graph run through the runtime (:func:`.accelerate`): reused blocks are not
        computed, so the run costs the kept MACs. With hard cascade-normalised gates the
        SuperNet computes the same sample (it computes every block and then discards the
        reused ones) and leaves the same caches, which ``on_call`` receives in its format."""
        with accelerate(self.net.model, schedule, store_all=on_call is not None) as handle, handle.run():
            def seen(i: int, x: Tensor) -> None:
                on_call(i, x, None if i == 0 else [_flatten(c)[0] for c in handle.state.cache])

            return self.chain.run(self.chain.first_latent(x_T), self._model_call(labels),
                                  on_call=seen if on_call is not None else None, on_output=on_output)

    def _model_call(self, labels: Tensor):
        """``call(i, x_in, t) -> (eps_u, eps_c)``: the model itself on the guidance batch (under
        ``accelerate``, the runtime's run)."""
        def call(i: int, x_in: Tensor, t: Tensor):
            t = t.expand(x_in.shape[0]) if t.dim() == 0 else t
            return self.net.model(*guidance_batch(x_in, t, labels, self.null)).chunk(2)

        return call

    def traced_run(self, x_T: Tensor, labels: Tensor, schedule: Schedule, trace: "Trace | None" = None
                   ) -> tuple[Tensor, "Trace"]:
        """``(final sample, trace)`` of the no-graph runtime run of ``schedule`` (the sample of
        :meth:`_run_skipping`, bit for bit), resumed from ``trace`` - a traced run of another
        schedule on the same ``x_T`` and ``labels`` - at the first call that runs differently
        (:func:`first_change`): the calls before it are not run again. What a validated move
        costs then is the calls from its first changed one on."""
        start = 0 if trace is None else first_change(trace.schedule, schedule)
        if start == schedule.calls:
            return trace.final, Trace(schedule, trace.entries, trace.final)
        entries = [] if trace is None else trace.entries[:start]
        if start == 0:
            x, xs, outs = self.chain.first_latent(x_T), {}, {}
        else:
            x, xs, outs, _ = trace.entries[start]
            xs, outs = dict(xs), dict(outs)  # the sampler fills them in place
        with accelerate(self.net.model, schedule, store_all=True) as handle, handle.run():
            if start:
                handle.state.restore(trace.entries[start][3], schedule.forecast_depth)

            def seen(i: int, x: Tensor) -> None:
                entries.append((x, dict(xs), dict(outs), handle.state.snapshot()))

            x0 = self.chain.run(x, self._model_call(labels), start=start, xs=xs, outs=outs, on_call=seen)
        return x0, Trace(schedule, entries, x0)

    def run_schedule(self, x_T: Tensor, labels: Tensor, schedule: Schedule, *, grad: str = "none",
                     on_call: Callable | None = None, on_output: Callable | None = None) -> Tensor:
        """The final sample of ``schedule`` through the SuperNet (every block computes; reused
        ones take their cache, repeated or forecast as ``schedule.forecast`` says): the runtime's
        sample. ``grad``: as :meth:`run`. ``on_call(i, x, hist)`` sees the sample entering each
        call and the history its caches come from (:func:`forecast_caches`)."""
        keep, orders = schedule.keep, schedule.forecast.tolist()
        gates = keep.to(x_T.dtype)
        hist = None

        def seen(i: int, x: Tensor) -> None:
            on_call(i, x, hist)

        def call(i: int, x_in: Tensor, t: Tensor):
            nonlocal hist
            caches = None if hist is None else forecast_caches(hist, i, keep[i], orders[i])
            if grad == "exact":
                eu, ec, new = checkpoint(self.call, x_in, t, labels, gates[i], caches, use_reentrant=False)
            else:
                eu, ec, new = self.call(x_in, t, labels, gates[i], caches)
            hist = pushed(hist, i, keep[i], new)
            return eu, ec

        return self.chain.run(self.chain.first_latent(x_T), call, on_call=seen if on_call is not None else None,
                              on_output=on_output)

    def run(self, x_T: Tensor, labels: Tensor, gates: Tensor, *, grad: str = "none", on_call: Callable | None = None,
            skip_reused: bool = True, on_output: Callable | None = None):
        """The final sample. ``grad``: ``"none"`` (no graph), ``"exact"`` (graph through every
        call, one checkpoint per call). ``on_call(i, x, caches)`` sees each call's inputs,
        ``on_output(i, eps_u, eps_c) -> (eps_u, eps_c)`` its outputs (:meth:`Chain.run`).
        Without a graph and with hard gates (``skip_reused``) reused blocks are skipped."""
        schedule = self.schedule_of(gates) if skip_reused and grad == "none" and not torch.is_grad_enabled() else None
        if schedule is not None:
            return self._run_skipping(x_T, labels, schedule, on_call, on_output)
        caches = None

        def seen(i: int, x: Tensor) -> None:
            on_call(i, x, caches)

        def call(i: int, x_in: Tensor, t: Tensor):
            nonlocal caches
            if grad == "exact":  # the caches pass as inputs, so the recompute sees this call's
                eu, ec, caches = checkpoint(self.call, x_in, t, labels, gates[i], caches, use_reentrant=False)
            else:
                eu, ec, caches = self.call(x_in, t, labels, gates[i], caches)
            return eu, ec

        return self.chain.run(self.chain.first_latent(x_T), call, on_call=seen if on_call is not None else None,
                              on_output=on_output)


@torch.no_grad()
def full_samples(net: SuperNet, scheduler, noise: Tensor, labels: Tensor, guidance: float, null_label: int,
                 batch_size: int = 64) -> Tensor:
    """The full model's samples (every gate at 1: the model itself, bit for bit)."""
    chain = _Chain(net, scheduler, guidance, null_label)
    ones = torch.ones(chain.n, net.num_blocks)
    return torch.cat([chain.run(noise[i:i + batch_size], labels[i:i + batch_size], ones)
                      for i in range(0, noise.shape[0], batch_size)])
