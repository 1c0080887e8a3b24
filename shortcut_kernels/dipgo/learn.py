"""Learn a cache schedule from a forward-difference shortcut estimate, validated on a bank.

    result = learn(model, scheduler, target_macs=0.4, time_budget=300)
    result.schedule.save("learned.json")          # <= 40% of the MACs, better on the bank

**The estimate.** A *unit* is one call's row changed to another candidate row: a computed call
reusing everything (a *drop*), a reused call computing everything or a partial row (an *add*;
:func:`partial_rows`), ... One no-graph run of the current schedule records, at every call ``t``, the
sample entering it, the caches it reads and its guided output ``out_t = eps_u + w (eps_c -
eps_u)``. With every other call's output held, the final sample is linear in ``out_t`` with the
scalar ``gamma_t = Plan.output_sensitivity(t, 0)`` (SDO's shortcut), so changing call ``t``'s
row changes the consistency loss by, to first order,

    sum_s gamma_s * <dL/dx_0, out_s(flipped) - out_s(current)>

over ``s = t`` and the later calls up to the next call that computes every block: those read
the caches the flip changes (the reuse segment it opens or closes; with forecast reuse, further:
below). ``out_s(flipped)`` is a
SuperNet call on the recorded input of call ``s`` and the caches the flip leaves (forwards
only, nothing backpropagates through the chain). It is exact for the loss linearised in the
calls' outputs with every call's input held; it leaves out how the changed samples move the
later calls' inputs, which is why every move is validated.

**The learner.** Start from the hand-made schedule that scores best on the bank within the
budget (``LearnConfig.starts``: the few best with distinct keep rows, each climbed in turn with
a share of the time, the best result kept); propose single flips that keep the MACs within ``target_macs`` (and, with
``LearnConfig.window``, above ``(1 - window) * target_macs``) and equal-budget swaps
(one drop plus one add), ranked by the summed estimates; sample them in that order, a few at
a time, on the bank (the true loss) and accept the best of a few that raises its PSNR by
``min_gain``; re-estimate at the new schedule and repeat. It stops at ``time_budget`` or when
no validated proposal helps, so the result is never worse on the bank than the start and never
over the budget. A move's bank run resumes the current schedule's traced run at the first call
the move changes (:meth:`_Chain.traced_run`, ``LearnConfig.resume``): the same loss, bit for
bit, for the calls from there on only.

**Forecast reuse** (``LearnConfig.forecast``, e.g. ``(0, 1, 2)``): the learner also decides how
each block's reused outputs are made - repeated (order 0) or extrapolated from its last computed
outputs (:mod:`shortcut_kernels.runtime.forecast`, order 1 or 2), one order per block. Each
hand-made start is scored at every allowed order; moves of keep rows keep the current orders;
when no keep move helps, order moves (one block to another order, or every block to one order,
no MAC change) are validated on the bank the same way, and the keep moves resume after an
accepted one; when none of those helps either, one reuse segment at another order
(:func:`segment_order_moves`; a keep move then gives its newly reused cells their block's
order). Before those order moves, shifts: every call from one whole call on moved one call
earlier or later (:func:`shift_moves`), which changes one gap between computed calls and keeps
the others, where a single-call move changes two. :func:`estimate` runs the forecasts too (:meth:`_Chain.run_schedule`: a flipped call
changes the extrapolations of the next ``p + 1`` reuse segments at order ``p``, and it follows
the flip that far), but on forecasting schedules no first-order estimate ranks single flips
(measured: docs/dipgo_learning.md), so the learner ranks its proposals with the cheaper
estimate of the same keep rows repeating, and the bank runs with the forecasts decide.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from ..models.conditioning import sample_shape
from ..ops.guided_step import guided_step
from .evaluate import handmade
from .losses import consistency_loss
from ..runtime.builders import skip_steps
from ..runtime.schedule import Schedule
from .search import with_trades
from .supernet import SuperNet
from .gated_chain import Trace, _Chain, first_change, forecast_caches, full_samples, pushed

__all__ = ["Bank", "Unit", "Estimate", "LearnConfig", "LearnResult", "make_bank", "bank_sampler", "estimate",
           "output_adjoints",
           "learn", "partial_rows", "order_moves", "segment_order_moves", "shift_moves", "LabelConditioned", "TRAIN_SEED"]

TRAIN_SEED = 10_000  # training noise; held-out evaluations use other seeds


# ----------------------------------------------------------------------------- the bank


@dataclass
class Bank:
    """Training noise, its labels and the full model's samples from it (the targets)."""

    noise: Tensor
    labels: Tensor
    targets: Tensor

    def __post_init__(self):
        n = self.noise.shape[0]
        if self.labels.shape != (n,) or self.targets.shape != self.noise.shape:
            raise ValueError(f"bank: noise {tuple(self.noise.shape)}, labels {tuple(self.labels.shape)} and targets "
                             f"{tuple(self.targets.shape)} must have one label and one target per noise")

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def head(self, n: int | None) -> "Bank":
        """The first ``n`` samples (all of them for None)."""
        return self if n is None or n >= len(self) else Bank(self.noise[:n], self.labels[:n], self.targets[:n])


def _null_label(model) -> int:
    null = getattr(model, "null_label", None)
    if null is None:
        raise TypeError(f"model must be class-conditional with a null_label attribute (model(x, t, labels), the "
                        f"zoo's form), got {type(model).__name__}: wrap a diffusers model in LabelConditioned")
    return int(null)


def _dtype(model) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


@torch.no_grad()
def make_bank(model, scheduler, size: int = 30, *, guidance: float = 3.0, seed: int = TRAIN_SEED) -> Bank:
    """``size`` training samples (labels 0..9 in turn) from the noise of ``seed`` and the full
    model's samples from it (every gate at 1: the model itself)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (bank samples), got {size!r}")
    net = SuperNet(model, "coarse")
    try:
        noise = torch.randn((size, *sample_shape(model)), generator=torch.Generator().manual_seed(seed)).to(
            _dtype(model))
        labels = torch.arange(size) % 10
        targets = full_samples(net, scheduler, noise, labels, guidance, _null_label(model))
    finally:
        net.remove()
    return Bank(noise, labels, targets)


def _psnr(mse: float) -> float:
    """PSNR in dB of one MSE on [-1, 1] data (the search's set PSNR)."""
    return math.inf if mse <= 0 else 10.0 * math.log10(4.0 / mse)


# ----------------------------------------------------------------------------- units and the estimate


@dataclass(frozen=True)
class Unit:
    """Call ``call`` gets ``row`` (one bool per block) instead of its current row."""

    call: int
    row: tuple[bool, ...]
    macs: float  # change of the schedule's kept-MAC share
    kind: str    # "drop" (fewer MACs) or "add"


@dataclass
class Estimate:
    """The schedule's loss on the bank and the predicted loss change of every unit."""

    loss: float
    units: list[Unit]
    predicted: Tensor  # [units], float64

    @property
    def psnr(self) -> float:
        return _psnr(self.loss)


def candidate_rows(graph, patterns=()) -> list[tuple[bool, ...]]:
    """The rows a call may take: reuse everything, compute everything, and each partial
    ``pattern`` (block indices), cascade-normalised as the schedule runs them."""
    n = len(graph)
    rows = [tuple([False] * n), tuple([True] * n)]
    for p in patterns:
        keep = [b in set(p) for b in range(n)]
        rows.append(tuple(graph.cascade(keep)))
    return list(dict.fromkeys(rows))


def _row_share(graph, row, calls: int) -> float:
    return sum(m for m, k in zip(graph.block_macs, row) if k) / (calls * graph.total_macs)


def units_of(schedule: Schedule, patterns=()) -> list[Unit]:
    """Every unit of ``schedule``: each call after call 0 (which always computes) to each
    candidate row other than its own."""
    g, rows = schedule.graph, candidate_rows(schedule.graph, patterns)
    out = []
    for t in range(1, schedule.calls):
        cur = tuple(schedule.keep[t].tolist())
        for row in rows:
            if row != cur:
                d = _row_share(g, row, schedule.calls) - _row_share(g, cur, schedule.calls)
                out.append(Unit(t, row, d, "drop" if d < 0 else "add"))
    return out


def _guided(chain: _Chain, eu: Tensor, ec: Tensor) -> Tensor:
    return guided_step(eu, eu, ec, 0.0, 1.0, chain.w)


def output_adjoints(chain: _Chain, bank: Bank, schedule: Schedule) -> list[Tensor]:
    """``dL/d out_s`` for every call ``s`` of ``schedule``'s run on the bank (``L`` the
    consistency MSE, ``out_s`` the guided output): one SuperNet run with a graph through every
    call (checkpointed; forecast caches as the schedule's) and one backward. Unlike the
    shortcut's ``gamma_s * dL/dx_0`` it carries how a changed output moves every later call's
    input and caches."""
    zs = []

    def on_output(i, eu, ec):
        z = torch.zeros_like(eu, requires_grad=True)  # out = eu + w (ec - eu) moves by z
        zs.append(z)
        return eu + z, ec + z

    with torch.enable_grad():
        x0 = chain.run_schedule(bank.noise, bank.labels, schedule, grad="exact", on_output=on_output)
        loss = consistency_loss(x0, bank.targets, "mse").mean()
        return [g.double() for g in torch.autograd.grad(loss, zs)]


@torch.no_grad()
def estimate(chain: _Chain, bank: Bank, schedule: Schedule, units: list[Unit] | None = None, *,
             patterns=(), max_batch: int = 256, sensitivity: str = "shortcut") -> Estimate:
    """Predicted change of the bank's consistency loss (MSE) for flipping each unit of
    ``schedule`` (default: :func:`units_of`), from one no-graph run (through the runtime, or
    with forecast reuse :meth:`_Chain.run_schedule`) that records every call's input,
    the history of computed outputs its caches come from, and its guided output. Per unit,
    SuperNet forwards on those records: the flipped call, then each later call whose caches
    the flip changes, every call's input held. Repeating caches, that reach ends at the next
    call computing every block (the reuse segment the flip opens or closes); forecasting at
    order ``p``, after ``p + 1`` such calls (the extrapolations read the flipped call's output,
    or miss it, until then). The units' forwards run batched, up to ``max_batch`` samples per
    SuperNet call. With ``sensitivity="shortcut"`` an output change ``d`` of call ``s`` counts
    ``gamma_s <dL/dx_0, d>``: exact for the loss linearised in the calls' outputs with their
    inputs held. ``"adjoint"`` counts ``<dL/d out_s, d>`` (:func:`output_adjoints`: one
    backward through the whole chain, about three runs' cost more), which also carries how the
    change moves later calls' inputs."""
    if schedule.graph.names != chain.net.graph.names:
        raise ValueError("schedule is on another block graph than the chain's SuperNet: build the SuperNet with "
                         "graph=schedule.graph")
    if schedule.calls != chain.n:
        raise ValueError(f"schedule has {schedule.calls} calls, the scheduler runs {chain.n}")
    if sensitivity not in ("shortcut", "adjoint"):
        raise ValueError(f"sensitivity must be 'shortcut' or 'adjoint', got {sensitivity!r}")
    units = units_of(schedule, patterns) if units is None else units
    xs, hists, outs = {}, {}, {}

    def on_call(i, x, hist):
        xs[i], hists[i] = x, hist

    def on_output(i, eu, ec):
        outs[i] = _guided(chain, eu, ec)
        return eu, ec

    flip_orders = _orders(schedule)  # a unit's reused blocks take their block's order (:func:`_with_units`)
    depth = max([0, *flip_orders, *schedule.forecast.flatten().tolist()])
    if depth == 0:  # repeat only: the runtime's run skips the reused blocks, its caches are the history
        def on_runtime_call(i, x, caches):
            on_call(i, x, None if caches is None else [[(i - 1, c)] for c in caches])

        x0 = chain._run_skipping(bank.noise, bank.labels, schedule, on_runtime_call, on_output)
    else:
        x0 = chain.run_schedule(bank.noise, bank.labels, schedule, on_call=on_call, on_output=on_output)
    x0 = x0.requires_grad_()
    with torch.enable_grad():
        loss = consistency_loss(x0, bank.targets, "mse").mean()
        (g,) = torch.autograd.grad(loss, x0)
    lam = output_adjoints(chain, bank, schedule) if sensitivity == "adjoint" else \
        [chain.plan.output_sensitivity(s, 0) * g.double() for s in range(chain.n)]
    keep, orders = schedule.keep, schedule.forecast.tolist()
    whole = [bool(r.all()) for r in keep]
    predicted = torch.zeros(len(units), dtype=torch.float64)
    # per unit: the flipped call, then the later calls that read caches it changed; one batched
    # SuperNet call per step, for up to `chunk` units at once (per-sample timesteps, gate rows and
    # cache rows); a unit's state: (call, keep row, orders, history, whole calls passed)
    b = len(bank)
    chunk = max(1, max_batch // b)
    for lo in range(0, len(units), chunk):
        part = list(range(lo, min(lo + chunk, len(units))))
        state = {j: (units[j].call, torch.tensor(units[j].row), flip_orders, hists[units[j].call], 0) for j in part}
        while state:
            js = list(state)
            x = torch.cat([chain.steps[state[j][0]].input_scale * xs[state[j][0]] for j in js])
            t = torch.cat([chain.timesteps[state[j][0]].reshape(1).expand(b) for j in js])
            rows = torch.cat([state[j][1].to(x.dtype).expand(b, -1) for j in js])
            per = [forecast_caches(state[j][3], state[j][0], state[j][1], state[j][2]) for j in js]
            both = [[torch.cat([c[:b] for c in ts] + [c[b:] for c in ts]) for ts in zip(*blk)]
                    for blk in zip(*per)]  # [uncond of every unit; cond of every unit]
            eu, ec, new = chain.call(x, t, bank.labels.repeat(len(js)), rows, both)
            out = _guided(chain, eu, ec)
            n = len(js) * b
            for k, j in enumerate(js):
                step, row, _, hist, passed = state[j]
                delta = (out[k * b:(k + 1) * b] - outs[step]).double()
                predicted[j] += float((lam[step] * delta).sum())
                mine = [[torch.cat([c[k * b:(k + 1) * b], c[n + k * b:n + (k + 1) * b]]) for c in blk] for blk in new]
                hist, nxt = pushed(hist, step, row, mine), step + 1
                while nxt < chain.n and whole[nxt]:
                    # a call computing every block reads no cache: its outputs are the recorded ones;
                    # the extrapolations after it still read the flipped call's until p + 1 of them
                    passed += 1
                    if passed > depth or nxt + 1 >= chain.n:
                        break
                    hist, nxt = pushed(hist, nxt, keep[nxt], [h[-1][1] for h in hists[nxt + 1]]), nxt + 1
                if nxt >= chain.n or whole[nxt]:
                    del state[j]
                    continue
                state[j] = (nxt, keep[nxt], orders[nxt], hist, passed)
    return Estimate(float(loss), units, predicted)


@torch.no_grad()
def bank_loss(chain: _Chain, bank: Bank, schedule: Schedule) -> float:
    """The consistency loss (MSE) of ``schedule``'s samples on the bank: the true value a move
    is judged by (through the runtime, any graph of the model)."""
    x0 = chain._run_skipping(bank.noise, bank.labels, schedule, None)
    return float(consistency_loss(x0, bank.targets, "mse").mean())


@torch.no_grad()
def traced_bank_loss(chain: _Chain, bank: Bank, schedule: Schedule, trace: Trace | None = None
                     ) -> tuple[float, Trace]:
    """:func:`bank_loss` and the run's trace, the run resumed from ``trace`` (a traced run of
    another schedule on the same bank) at the first call that runs differently
    (:meth:`_Chain.traced_run`): a move validated from the current schedule's trace costs only
    the calls from its first changed one on."""
    x0, trace = chain.traced_run(bank.noise, bank.labels, schedule, trace)
    return float(consistency_loss(x0, bank.targets, "mse").mean()), trace


def bank_sampler(model, scheduler, bank: Bank, *, guidance: float = 3.0):
    """``sample(schedule) -> images`` on the bank's noise and labels, through the runtime;
    ``sample(None)`` is the bank's targets. What :func:`.search.local_search` scores, so a
    search validates on the same samples as the learner, its runs resumed as the learner's are
    (the same samples, bit for bit)."""
    net = SuperNet(model, "coarse")
    net.remove()  # the runtime run needs the model and the chain only, not the SuperNet's hooks
    chain = _Chain(net, scheduler, guidance, _null_label(model))
    # a run resumes from the trace that runs the same longest (:meth:`_Chain.traced_run`); the three
    # traces last made or resumed from are kept (every one that ties counts as used): a search's
    # candidates are moves of its current schedule, whose trace each of them uses that way
    traces: list[Trace] = []

    @torch.no_grad()
    def sample(schedule: Schedule | None) -> Tensor:
        if schedule is None:
            return bank.targets
        firsts = [first_change(tr.schedule, schedule) for tr in traces]
        reach = max(firsts, default=0)
        used = [tr for tr, f in zip(traces, firsts) if f == reach > 0]
        x0, trace = chain.traced_run(bank.noise, bank.labels, schedule, used[0] if used else None)
        traces[:] = [trace, *used, *(tr for tr in traces if all(tr is not u for u in used))][:3]
        return x0

    return sample


# ----------------------------------------------------------------------------- proposals


def _orders(schedule: Schedule) -> list[int]:
    """One forecast order per block of ``schedule`` (the learner's schedules have one; per-cell
    orders of a given start are read as each block's highest)."""
    per = schedule.forecast_blocks
    return per if per is not None else [int(v) for v in schedule.forecast.max(dim=0).values.tolist()]


def _learned(schedule: Schedule, keep: Tensor, orders) -> Schedule:
    return Schedule(keep, schedule.graph, name="learned",
                    params={"start": schedule.params.get("start", schedule.name)}, sampler=schedule.sampler,
                    steps=schedule.steps, forecast=orders)


def _with_units(schedule: Schedule, units) -> Schedule:
    """``schedule`` with each unit's call set to its row; the other calls keep their forecast
    orders, a unit's reused blocks take their block's (:func:`_orders`)."""
    keep, forecast = schedule.keep.clone(), schedule.forecast.clone()
    blocks = torch.tensor(_orders(schedule), dtype=forecast.dtype)
    for u in units:
        keep[u.call] = torch.tensor(u.row)
        forecast[u.call] = blocks
    return _learned(schedule, keep, forecast)


def order_moves(schedule: Schedule, allowed) -> list[list[int]]:
    """The forecast orders to try at ``schedule`` (keep rows unchanged): every block at one
    allowed order, then one block at another allowed order; only blocks it reuses somewhere,
    each distinct list once."""
    cur = _orders(schedule)
    reused = [bool((~schedule.keep[:, b]).any()) for b in range(len(cur))]
    out = [[o if r else 0 for r in reused] for o in allowed]
    for b, r in enumerate(reused):
        for o in allowed:
            if r and o != cur[b]:
                out.append(cur[:b] + [o] + cur[b + 1:])
    norm = [[o if r else 0 for o, r in zip(m, reused)] for m in out]
    mine = [o if r else 0 for o, r in zip(cur, reused)]
    return [m for i, m in enumerate(norm) if m != mine and m not in norm[:i]]


def segment_order_moves(schedule: Schedule, allowed) -> list[Tensor]:
    """Per-cell forecast orders to try at ``schedule`` (keep rows unchanged): every reused block
    of one reuse segment (the calls between two calls that compute every block) at one other
    allowed order; each distinct ``[calls, blocks]`` tensor once. An extrapolation's error grows
    with its distance from the computed calls, so the best order differs between long and short
    segments and along the trajectory."""
    keep, cur = schedule.keep, schedule.forecast
    whole = [t for t in range(schedule.calls) if bool(keep[t].all())] + [schedule.calls]
    out = []
    for a, b in zip(whole, whole[1:]):
        if b - a < 2:
            continue
        for o in allowed:
            f = cur.clone()
            f[a + 1:b] = o
            f[keep] = 0
            if not torch.equal(f, cur) and not any(torch.equal(f, g) for g in out):
                out.append(f)
    return out


def shift_moves(schedule: Schedule) -> list[tuple[dict, Schedule]]:
    """Keep moves that keep the spacing of the computed calls: for each call ``c`` computing
    every block (after call 0) and ``d`` of -1 and +1, every call from ``c`` on moved ``d``
    later, rows and forecast orders alike (``({"call": c, "by": d}, schedule)``). Legal where
    the call overwritten (``c - 1``) or pushed out (the last) reuses every block, so the MACs
    stay; the call left behind reuses every block at its blocks' orders (:func:`_orders`). A
    forecast extrapolates from evenly spaced computed calls best, and a single-call move
    breaks that spacing where a shift moves one gap only."""
    keep, forecast, n = schedule.keep, schedule.forecast, schedule.calls
    blocks = torch.tensor(_orders(schedule), dtype=forecast.dtype)
    out = []
    for c in range(1, n):
        if not bool(keep[c].all()):
            continue
        for d in (-1, 1):
            gone = c - 1 if d < 0 else n - 1
            if gone < 1 or bool(keep[gone].any()):
                continue
            k, f = keep.clone(), forecast.clone()
            if d > 0:
                k[c + 1:], f[c + 1:] = keep[c:n - 1], forecast[c:n - 1]
                k[c], f[c] = False, blocks
            else:
                k[c - 1:n - 1], f[c - 1:n - 1] = keep[c:], forecast[c:]
                k[n - 1], f[n - 1] = False, blocks
            out.append((dict(call=c, by=d), _learned(schedule, k, f)))
    return out


def proposals(est: Estimate, macs: float, budget: float, *, swaps: bool = True,
              max_per_unit: int = 2, floor: float = 0.0) -> list[tuple[float, tuple[Unit, ...]]]:
    """Moves within the MAC ``budget`` (and keeping at least ``floor``), best predicted first:
    single units and (``swaps``) one
    drop plus one add at another call. The predicted change of a swap is the sum of its
    units'. Moves predicted to hurt stay in the list, last: the estimate is first order (it
    overrates drops of the first calls), so after the predicted gains the learner still tries
    the least harmful ones. A unit's moves beyond its first ``max_per_unit`` go after all the
    others, so the top few are not one unit paired with everything."""
    p = est.predicted.tolist()
    idx = list(range(len(est.units)))
    def fits(d: float) -> bool:
        return floor - 1e-9 <= macs + d <= budget + 1e-9

    moves = [(p[i], (est.units[i],)) for i in idx if fits(est.units[i].macs)]
    if swaps:
        drops = [i for i in idx if est.units[i].kind == "drop"]
        adds = [i for i in idx if est.units[i].kind == "add"]
        for d in drops:
            for a in adds:
                ud, ua = est.units[d], est.units[a]
                if ud.call != ua.call and fits(ud.macs + ua.macs):
                    moves.append((p[d] + p[a], (ud, ua)))
    moves.sort(key=lambda m: m[0])
    used: dict[Unit, int] = {}
    out, later = [], []
    for m in moves:
        if all(used.get(u, 0) < max_per_unit for u in m[1]):
            out.append(m)
            for u in m[1]:
                used[u] = used.get(u, 0) + 1
        else:
            later.append(m)
    return out + later


# ----------------------------------------------------------------------------- the learner


@dataclass
class LearnConfig:
    """Settings of :func:`learn`."""

    bank_size: int = 30         # training samples (when no bank is given)
    # the first samples of the bank the starts are scored and the moves validated on; the others pick
    # the schedule returned among every one the climbs passed through (early stopping; None: all
    # samples do both, the best climb's end is returned). A bank small enough for many moves gets
    # fitted by them, and a small pick bank can pick wrongly. 16 of 32 did best with forecast orders
    # (docs/dipgo_learning.md, "Early stopping" and "Resumed bank runs"); not measured without them,
    # so off by default
    climb_size: int | None = None
    estimate_size: int | None = 16  # the first samples of the bank the estimate runs on (None: all)
    guidance: float = 3.0
    patterns: bool = True       # partial rows as units (:func:`partial_rows`)
    swaps: bool = True          # equal-budget swaps besides single flips
    validate: int = 4           # proposals sampled per batch; the best improving one is taken
    max_validations: int = 32   # proposals sampled at one schedule (best predicted first) before stopping
    min_gain: float = 0.02      # dB of bank PSNR a move must add
    # forecast orders reused blocks may take (0 repeat, 1 / 2 extrapolate; module docstring)
    forecast: tuple = (0,)
    # moves keep at least target_macs * (1 - window) of the MACs (or the start's, if fewer): for
    # comparisons at equal MACs; None: any share up to the target
    window: float | None = None
    # hand-made starts climbed (the best on the bank with distinct keep rows), the best result kept:
    # the start best on the bank is not always the best basin for the moves
    starts: int = 2
    # validate a move by resuming the current schedule's bank run at the move's first changed call
    # (the same loss, bit for bit, for the calls after it only); the trace it resumes from holds
    # about every block output of one bank run: False runs every move whole, for a model and bank
    # whose run does not fit in memory twice
    resume: bool = True


@dataclass
class LearnResult:
    schedule: Schedule
    start: Schedule
    start_psnr: float           # set PSNR on the bank (dB)
    psnr: float
    evaluations: int            # chain runs on the bank (start scoring, validations)
    seconds: float
    estimates: int = 0          # iterations: estimates made (each followed by its validations)
    history: list[dict] = field(default_factory=list)  # the start, then one record per accepted move
    climbs: list[dict] = field(default_factory=list)   # per start climbed: start, bank PSNRs, moves, seconds
    path: list[Schedule] = field(default_factory=list)  # the schedule after each record of ``history``


def _check_learn_args(model, scheduler, target_macs, start, time_budget, cfg: LearnConfig) -> None:
    if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0 < target_macs <= 1:
        raise ValueError(f"target_macs is the kept-MAC share in (0, 1], got {target_macs!r}")
    if getattr(scheduler, "timesteps", None) is None or not len(scheduler.timesteps):
        raise ValueError("scheduler: call scheduler.set_timesteps(calls) first (one row per denoiser call)")
    if start is not None:
        if not isinstance(start, Schedule):
            raise TypeError(f"start must be a Schedule, got {type(start).__name__}")
        if start.calls != len(scheduler.timesteps):
            raise ValueError(f"start has {start.calls} calls, the scheduler runs {len(scheduler.timesteps)}: "
                             "resize it (start.resize(calls))")
        if start.macs_kept > target_macs + 1e-9:
            raise ValueError(f"start keeps {start.macs_kept:.1%} of the MACs, over target_macs {target_macs:.1%}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be positive seconds or None, got {time_budget!r}")
    if cfg.window is not None and not 0 <= cfg.window < 1:
        raise ValueError(f"config: window is a fraction in [0, 1) of target_macs, got {cfg.window!r}")
    if cfg.climb_size is not None and (isinstance(cfg.climb_size, bool) or not isinstance(cfg.climb_size, int)
                                       or cfg.climb_size < 1):
        raise ValueError(f"config: climb_size is a positive number of bank samples or None, got {cfg.climb_size!r}")
    if isinstance(cfg.starts, bool) or not isinstance(cfg.starts, int) or cfg.starts < 1:
        raise ValueError(f"config: starts is the number of hand-made starts to climb (>= 1), got {cfg.starts!r}")
    if cfg.validate < 1 or cfg.max_validations < cfg.validate:
        raise ValueError(f"config: need 1 <= validate ({cfg.validate}) <= max_validations ({cfg.max_validations})")
    orders = cfg.forecast if isinstance(cfg.forecast, (tuple, list)) else None
    if not orders or any(isinstance(o, bool) or o not in (0, 1, 2) for o in orders):
        raise ValueError(f"config: forecast is a tuple of the orders reused blocks may take, from 0 (repeat), 1 "
                         f"and 2 (extrapolate), e.g. (0, 1, 2); got {cfg.forecast!r}")
    _null_label(model)


def partial_rows(model, start: Schedule) -> tuple[Schedule, list[list[int]]]:
    """``(start, patterns)``: the partial rows the learner may give a call besides whole ones.
    UNets: the DeepCache-branch rows on the fine graph (:func:`.search.with_trades`, ``start``
    moved there). Transformers on the fine graph (every block residual): the rows computing the
    first 1, 2 and half of the blocks, the others reusing (DBCache's ``Fn`` rows: the first
    blocks see the current input, the reused residuals add to it)."""
    start, patterns = with_trades(model, start)
    blocks = start.graph.blocks
    if patterns or start.graph.granularity != "fine" or not all(b.residual for b in blocks):
        return start, patterns
    n = len(blocks)
    return start, [list(range(k)) for k in sorted({1, 2, n // 2}) if 0 < k < n]


LEAD_SHARES = (0.2, 0.4, 0.6)
"""Leads of the ``skip_steps(placement="lead")`` starts, as shares of the computed calls."""


def start_options(model, calls: int, target: float, orders=(0,)) -> list[Schedule]:
    """The starts :func:`learn` scores: the hand-made schedules within ``target`` keeping at
    least 90% of the most any of them keeps, each ``skip_steps`` count among them also at
    cache-dit's lead-and-even placement (a lead of each share in :data:`LEAD_SHARES`), at
    every forecast order of ``orders``."""
    options = [s for s in handmade(model, calls).values() if s.macs_kept <= target + 1e-9]
    if not options:
        raise ValueError(f"target_macs: no hand-made schedule keeps <= {target:.1%} of the MACs at {calls} calls; "
                         "give start=")
    top = max(s.macs_kept for s in options)
    options = [s for s in options if s.macs_kept >= 0.9 * top]
    counts = sorted({s.params["count"] for s in options if s.name == "skip_steps" and s.params.get("count")})
    leads = {(c, max(1, round(share * c))) for c in counts for share in LEAD_SHARES}
    options += [skip_steps(model, calls, count=c, placement="lead", lead=lead) for c, lead in sorted(leads)]
    return [s.with_forecast(o) for s in options for o in orders]


def _best_handmade(model, chain: _Chain, bank: Bank, target: float, orders=(0,), count: int = 1
                   ) -> tuple[list[Schedule], int]:
    """The ``count`` starts (:func:`start_options`) that score best on the bank, best first, each
    with other keep rows than the ones before it (the same rows at another order are one basin:
    the order moves reach it); and how many were scored."""
    options = start_options(model, chain.n, target, orders)
    ranked = sorted(options, key=lambda s: bank_loss(chain, bank, s))
    picked: list[Schedule] = []
    for s in ranked:
        if not any(torch.equal(s.keep, p.keep) for p in picked):
            picked.append(s)
        if len(picked) == count:
            break
    return picked, len(options)


def learn(model, scheduler, target_macs: float, *, start: Schedule | None = None, bank: Bank | None = None,
          time_budget: float | None = None, config: LearnConfig | None = None, progress: bool = True,
          **overrides) -> LearnResult:
    """Learn a schedule of ``model`` (zoo-style ``model(x, t, labels)`` with ``null_label``)
    sampled by ``scheduler`` (``set_timesteps`` called) keeping at most ``target_macs`` of the
    MACs; see the module docstring.

    start: the first schedule (default: the ``config.starts`` best hand-made ones on the bank
        within the budget, each climbed in turn; the best result on the bank is returned, or
        with ``config.climb_size`` the best on the samples the climbs did not see).
    bank: training samples (default: :func:`make_bank` with ``config.bank_size``); with
        ``config.climb_size`` its first samples score the starts and validate the moves, and the
        others pick the schedule returned: the best of every start and accepted move of every
        climb (early stopping).
    time_budget: seconds of learning after the bank is made: scoring the starts, then the
        climbs, each given the time left over the climbs left (with ``config.climb_size`` a
        climb also scores its schedules on the other samples in its time).
    config / overrides: :class:`LearnConfig` fields.
    """
    cfg = LearnConfig(**{**LearnConfig().__dict__, **(config.__dict__ if config else {}), **overrides})
    _check_learn_args(model, scheduler, target_macs, start, time_budget, cfg)
    bank = bank if bank is not None else make_bank(model, scheduler, cfg.bank_size, guidance=cfg.guidance)
    climb_bank = bank.head(cfg.climb_size)
    pick_bank = bank if len(climb_bank) == len(bank) else Bank(*(v[len(climb_bank):] for v in
                                                                   (bank.noise, bank.labels, bank.targets)))
    evaluations = 0
    t0 = time.perf_counter()
    if start is None:
        starts, evaluations = _on_probe(model, scheduler, cfg, lambda chain: _best_handmade(
            model, chain, climb_bank, target_macs, cfg.forecast, cfg.starts))
    else:
        starts = [start]
    early_stopping = pick_bank is not climb_bank
    results = []
    for k, first in enumerate(starts):
        left = None if time_budget is None else max(0.0, time_budget - (time.perf_counter() - t0))
        if left is not None and left <= 0 and results:  # the first climb at least scores its start
            break
        share = None if left is None else left / (len(starts) - k)
        results.append(_climb(model, scheduler, climb_bank, first, target_macs, cfg, share, progress,
                              pick_bank if early_stopping else None))
    climbs = [dict(start=r.start.name, start_params=r.start.params, start_psnr=r.start_psnr, psnr=r.psnr,
                   moves=len(r.history) - 1, seconds=r.seconds) for r in results]
    if not early_stopping:
        best = max(results, key=lambda r: r.psnr)
    else:
        # early stopping: every schedule the climbs passed through, the starts included, on the
        # samples no move was fitted to; the best is returned, its later moves dropped
        picks = [[h["pick_psnr"] for h in r.history] for r in results]
        for c, p in zip(climbs, picks):
            c["pick_psnrs"] = p
        k, i = max(((k, i) for k, p in enumerate(picks) for i in range(len(p))), key=lambda ki: picks[ki[0]][ki[1]])
        best = results[k]
        best.schedule, best.psnr = best.path[i], best.history[i]["psnr"]
        best.history, best.path = best.history[:i + 1], best.path[:i + 1]
    best.evaluations += evaluations + sum(r.evaluations for r in results if r is not best)
    best.estimates += sum(r.estimates for r in results if r is not best)
    best.seconds, best.climbs = time.perf_counter() - t0, climbs
    return best


def _on_probe(model, scheduler, cfg: LearnConfig, run):
    """``run(chain)`` on a coarse SuperNet of ``model``, its hooks removed afterwards (the
    climbs hook the model with their own)."""
    probe = SuperNet(model, "coarse")
    try:
        return run(_Chain(probe, scheduler, cfg.guidance, _null_label(model)))
    finally:
        probe.remove()


class _BankRuns:
    """Bank losses of schedules, each run resumed from the trace last kept (:meth:`keep`; with
    ``resume`` off, whole runs)."""

    def __init__(self, chain: _Chain, bank: Bank, resume: bool):
        self.chain, self.bank, self.resume, self.trace = chain, bank, resume, None

    def loss(self, schedule: Schedule) -> tuple[float, Trace | None]:
        if not self.resume:
            return bank_loss(self.chain, self.bank, schedule), None
        return traced_bank_loss(self.chain, self.bank, schedule, self.trace)

    def keep(self, trace: Trace | None) -> None:
        self.trace = trace


def _climb(model, scheduler, bank: Bank, start: Schedule, target_macs: float, cfg: LearnConfig,
           time_budget: float | None, progress: bool, pick_bank: Bank | None = None) -> LearnResult:
    """The learner from one start (the module docstring): estimate, validate the best proposals,
    accept the best that raises the bank PSNR, repeat until no proposal helps or time is up.
    With ``pick_bank`` the start and each accepted move are also scored on it, within the time
    (``history[i]["pick_psnr"]``, for :func:`learn`'s early stopping)."""
    start, patterns = partial_rows(model, start) if cfg.patterns else (start, [])
    net = SuperNet(model, graph=start.graph)
    chain = _Chain(net, scheduler, cfg.guidance, _null_label(model))
    est_bank = bank.head(cfg.estimate_size)
    floor = 0.0 if cfg.window is None else min(start.macs_kept, target_macs * (1 - cfg.window))
    t0 = time.perf_counter()
    try:
        runs = _BankRuns(chain, bank, cfg.resume)  # resumed from the current schedule's run
        picks = None if pick_bank is None else _BankRuns(chain, pick_bank, cfg.resume)  # from the last one's
        result = LearnResult(start, start, 0.0, 0.0, 0, 0.0)

        def reached(schedule: Schedule, loss: float, trace: Trace | None, **record) -> None:
            runs.keep(trace)
            if picks is not None:
                pick_loss, pick_trace = picks.loss(schedule)
                picks.keep(pick_trace)
                result.evaluations += 1
                record["pick_psnr"] = _psnr(pick_loss)
            seconds = time.perf_counter() - t0 if result.path else 0.0  # the curve starts at the start
            result.history.append(dict(seconds=seconds, psnr=_psnr(loss), macs_kept=schedule.macs_kept, **record))
            result.path.append(schedule)

        best, (best_loss, trace) = start, runs.loss(start)
        result.start_psnr, result.evaluations = _psnr(best_loss), 1
        reached(start, best_loss, trace, move=None)
        bar = tqdm(desc="dipgo learn", disable=not progress, unit="move")

        def out_of_time() -> bool:
            return time_budget is not None and time.perf_counter() - t0 >= time_budget

        while not out_of_time():
            # no first-order estimate ranks the flips of a forecasting schedule (docs/dipgo_learning.md):
            # its proposals are ranked by the repeat estimate of the same keep rows, 3-4x cheaper
            est = estimate(chain, est_bank, best.with_forecast(0) if bool(best.forecast.any()) else best,
                           patterns=patterns)
            result.estimates += 1
            moves = proposals(est, best.macs_kept, target_macs, swaps=cfg.swaps, floor=floor)
            accepted = _first_improving(runs.loss, [((pred, units), _with_units(best, units))
                                                for pred, units in moves[:cfg.max_validations]],
                                        best_loss, cfg, result, out_of_time)
            if accepted is None and len(cfg.forecast) > 1 and not out_of_time():
                accepted = _structure_move(runs.loss, best, best_loss, cfg, result, out_of_time)
            if accepted is None:
                break  # no move helps on the bank: a local optimum of the moves
            best_loss, what, best, trace = accepted
            pred, units = what if isinstance(what, tuple) else (None, what)
            reached(best, best_loss, trace, predicted=pred, evaluations=result.evaluations,
                    move=units if isinstance(units, dict) else
                    [dict(call=u.call, kind=u.kind, computes=sum(u.row)) for u in units])
            bar.update(1)
            bar.set_postfix(psnr=f"{_psnr(best_loss):.2f}")
        bar.close()
    finally:
        net.remove()
    result.schedule, result.psnr = best, _psnr(best_loss)
    result.seconds = time.perf_counter() - t0
    return result


def _structure_move(score, best: Schedule, best_loss: float, cfg: LearnConfig, result: LearnResult,
                    out_of_time) -> tuple | None:
    """The best move of the first family that has one raising the bank PSNR by ``min_gain``, as
    ``(loss, what moved, schedule, trace)`` (``score``: as :func:`_first_improving`), else None.
    The families, in turn: the calls from one whole call on shifted by one
    (:func:`shift_moves`), one order per block (:func:`order_moves`), one order per reuse
    segment (:func:`segment_order_moves`). Each family is sampled whole and its
    best move taken (steepest ascent): taking the first improving few instead ended lower on
    digits-dit at 20% (docs/dipgo_learning.md, "Early stopping")."""
    def ordered(forecasts):
        return [(dict(forecast=c.forecast_blocks or c.forecast.tolist()), c)
                for c in (_learned(best, best.keep, f) for f in forecasts)]

    families = (lambda: [(dict(shift=m), c) for m, c in shift_moves(best)],
                lambda: ordered(order_moves(best, cfg.forecast)),
                lambda: ordered(segment_order_moves(best, cfg.forecast)))
    for family in families:
        candidates = family()
        found = _first_improving(score, candidates, best_loss, cfg, result, out_of_time,
                                 batch=max(1, len(candidates)))
        if found is not None or out_of_time():
            return found
    return None


def _first_improving(score, candidates: list, best_loss: float, cfg: LearnConfig, result: LearnResult,
                     out_of_time, batch: int | None = None) -> tuple | None:
    """Sample ``candidates`` (``(what, schedule)``, best predicted first) on the bank
    (``score(schedule) -> (loss, trace)``) ``batch`` (default ``cfg.validate``) at a time and
    return ``(loss, what, schedule, trace)`` of the best in the first batch holding one that
    raises the bank PSNR by ``cfg.min_gain``; None when none does (or time runs out). The
    estimate's proposals go a few at a time (the ranking does the choosing, the bank confirms);
    a structure family in one batch (its best move)."""
    batch = batch or cfg.validate
    for lo in range(0, len(candidates), batch):
        best = None  # only the batch's best keeps its trace
        for what, cand in candidates[lo:lo + batch]:
            loss, trace = score(cand)
            result.evaluations += 1
            if best is None or loss < best[0]:
                best = (loss, what, cand, trace)
            if out_of_time():
                break
        if _psnr(best[0]) > _psnr(best_loss) + cfg.min_gain:
            return best
        if out_of_time():
            return None
    return None


# ----------------------------------------------------------------------------- diffusers models


class LabelConditioned(torch.nn.Module):
    """A bare diffusers denoiser as the zoo's class-conditional ``model(x, t, labels) -> eps``
    (what :func:`learn` and :mod:`.train` sample), with ``null_label`` for classifier-free
    guidance. The denoiser stays ``.backbone``, so schedules are built for its blocks.

    DiT (``DiTTransformer2DModel``): ``labels`` are its class labels, the null label its
    ``num_embeds_ada_norm``, the output its eps channels. UNet (``UNet2DConditionModel``):
    ``embeddings[label]`` (``[labels + 1, tokens, dim]``, the last row the null one) is the
    ``encoder_hidden_states``.
    """

    def __init__(self, backbone: torch.nn.Module, embeddings: Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        cfg = backbone.config
        if "num_embeds_ada_norm" in cfg and cfg.get("num_embeds_ada_norm"):
            self.null_label = int(cfg["num_embeds_ada_norm"])
            self.embeddings = None
        elif embeddings is None or embeddings.dim() != 3:
            raise ValueError("embeddings: a text-conditioned UNet needs [labels + 1, tokens, dim] embeddings "
                             "(the last row the unconditional one)")
        else:
            self.register_buffer("embeddings", embeddings, persistent=False)
            self.null_label = embeddings.shape[0] - 1

    def forward(self, x: Tensor, t, labels: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t  # DiT's timestep embedding wants one per sample
        if self.embeddings is None:
            out = self.backbone(x, t, class_labels=labels, return_dict=False)[0]
            return out[:, :x.shape[1]]
        return self.backbone(x, t, encoder_hidden_states=self.embeddings[labels], return_dict=False)[0]
