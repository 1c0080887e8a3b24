"""cache-dit section (``cache-dit``): the cache-dit package (DBCache, its TaylorSeer calibrator,
static step masks) beside our schedules on the zoo DiT (``digits-dit``), compute counted the
same way for both.

Protocol (both libraries, the same process): 50 DDIM calls, guidance 3 batched into one call,
``per_class`` samples of each digit from the held-out noise of ``zoo.dipgo_eval.EVAL_SEED``
(schedule learners train on seeds 10,000+), PSNR against the full model's samples from the
same noise: set PSNR (one MSE over all images) and the mean of the per-image PSNRs.

Compute: the share of transformer-block forwards that ran. A forward pre-hook on the
transformer numbers the calls and a forward hook on each block's self-attention (``attn1``)
marks the blocks that computed (:class:`BlockCounter`). The attention is hooked, not the block:
our runtime calls a reused block's (cached) forward, which returns its cache without running
the block; cache-dit does not call the blocks it skips at all (the test checks both: hooks on
the blocks themselves give the same count for cache-dit, and our counts equal the schedule's
keep matrix). The MAC share weighs the same matrix with the block graph's MACs (the
embedding and output layers, which both run at every call, counted as kept); cache-dit's own
work (the residual difference, the TaylorSeer update) is not counted.

cache-dit is used as a library: ``cache_dit.enable_cache`` on a ``BlockAdapter`` of the
transformer's ``transformer_blocks`` (``ForwardPattern.Pattern_3``: hidden states in, hidden
states out) with cache-dit's own ``DiTPatchFunctor``, on a deep copy of the model per setting
(the patch stays on the module after ``disable_cache``). Its settings (:func:`cache_dit_grid`):
DBCache with ``Fn_compute_blocks`` 1 or 2 (cache-dit requires at least 1: the first block
runs at every call), ``Bn_compute_blocks`` 0, dynamic (``residual_diff_threshold`` and
``max_warmup_steps``) or a static ``steps_computation_mask`` (evenly spaced full calls after a
lead of full calls, and cache-dit's predefined ``steps_mask`` policies), each with TaylorSeer
order 0 (no calibrator: the cached residual is repeated), 1 or 2.

Ours (:func:`our_schedules`): ``skip_steps`` (uniform, power-1.5 and cache-dit's lead-and-even
placement) and ``fora`` at the most full calls each budget allows, each with ``forecast=1`` and
``2`` where the runtime has forecast reuse; ``deepcache`` is a UNet builder and is recorded as
not applicable; the cache-dit settings' evenly spread static masks run as our schedules too
(:func:`mask_schedules`: the same blocks computed, our repeat and forecast reuse; quick: Fn 1
only); and a schedule learned on training noise (:func:`learned`: ``dipgo.learn`` from our best
schedule at that budget, choosing where to compute and, per block, whether to repeat or
forecast; quick: at 50%, FULL: at every budget).

Per budget (quick: 20% and 50%; FULL: 20, 30, 40, 50, 60%), the best row of each library at
no more compute and the difference in set PSNR. FULL screens (``Plan.screen_per_class``): every
row runs first on 30 samples, then the 3 best of each library at each budget (by set PSNR at
no more compute; :func:`finalists`) and the learned schedules run on the 200, and the bests
are taken from those; the screen's rows are in the JSON too (``screen``). Wall-clock: seconds per sample of each row
over the full model's in the same process; valid only when ``make bench`` runs alone.

Forecast cost (:func:`forecast_cost`, a few seconds): one denoiser call of ``digits-dit`` with
a schedule row in ``READ`` against the same row forecasting at order 1 and 2, interleaved; the
cost ratio, the extrapolation's bytes and the time of copying as many bytes in the same run
(issue 28, must hold 3: forecast within 5% of ``READ`` plus the bytes).
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch

# whole-call schedules at cache-dit's mask placement: a lead of each share of the full calls,
# as the learner's starts
from shortcut_kernels.dipgo.learn import LEAD_SHARES

MODEL = "digits-dit"
CALLS = 50
GUIDANCE = 3.0
MARGIN_DB = 1.0  # issue 28, must hold 1: ours beats cache-dit's best by at least this much
QUICK_BUDGETS = (0.2, 0.5)
FULL_BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.6)
ORDERS = (0, 1, 2)  # TaylorSeer orders (0: no calibrator)
EPS = 1e-9


# ----------------------------------------------------------------------------- counting


class BlockCounter:
    """Which transformer blocks computed at each call of ``transformer``: ``ran`` is a bool
    ``[calls, blocks]`` tensor. Hooks the blocks' ``attn1`` (``on_blocks=True``: the blocks
    themselves, to check a library that skips blocks without calling them)."""

    def __init__(self, transformer: torch.nn.Module, on_blocks: bool = False):
        self.blocks = list(transformer.transformer_blocks)
        self.rows: list[list[bool]] = []
        self._handles = [transformer.register_forward_pre_hook(self._call)]
        for b, block in enumerate(self.blocks):
            target = block if on_blocks else block.attn1
            self._handles.append(target.register_forward_hook(partial(self._ran, b)))

    def _call(self, module, args) -> None:
        self.rows.append([False] * len(self.blocks))

    def _ran(self, b: int, module, args, out) -> None:
        if not self.rows:
            raise RuntimeError("a block ran outside a call of the transformer")
        if self.rows[-1][b]:
            raise RuntimeError(f"block {b} ran twice in call {len(self.rows) - 1}")
        self.rows[-1][b] = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BlockCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def ran(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.bool).reshape(len(self.rows), len(self.blocks))


def compute_share(ran: torch.Tensor) -> float:
    """Share of the block forwards that ran (an exact ratio of counts, so that 10 of 50 calls
    is 0.2 as the budgets are written)."""
    return int(ran.sum()) / ran.numel()


def mac_share(ran: torch.Tensor, graph) -> float:
    """Share of the MACs: the ran blocks weighed by the fine graph's block MACs, the
    graph's overhead (embedding, output layers) counted at every call."""
    macs = torch.tensor(graph.block_macs, dtype=torch.float64)
    calls = ran.shape[0]
    return float(((ran.double() * macs).sum() + calls * graph.overhead_macs) / (calls * graph.total_macs))


def per_call(ran: torch.Tensor) -> str:
    """Blocks computed per call as one digit each (``66611161...``)."""
    return "".join(str(int(n)) for n in ran.sum(1).tolist())


# ----------------------------------------------------------------------------- the protocol


@dataclass
class Protocol:
    """What every row shares: the model, the sampler and the noise."""

    model: str = MODEL
    calls: int = CALLS
    guidance: float = GUIDANCE
    per_class: int = 5
    seed: int | None = None  # None: zoo.dipgo_eval.EVAL_SEED


class Bench:
    """Samples ``digits-dit`` under the protocol, plain, with our schedules and with cache-dit,
    and turns each run into a row against the full model's samples."""

    def __init__(self, protocol: Protocol):
        from shortcut_kernels import zoo
        from shortcut_kernels.runtime.schedule import graph_of
        from shortcut_kernels.zoo.dipgo_eval import EVAL_SEED

        self.p = protocol
        self.seed = EVAL_SEED if protocol.seed is None else protocol.seed
        z = zoo.load(protocol.model)
        self.model, self.scheduler_config = z.model, z.scheduler_config
        self.labels = torch.arange(10).repeat_interleave(protocol.per_class)
        self.graph = graph_of(self.model, "fine")
        names = [f"transformer_blocks.{i}" for i in range(len(self.model.transformer.transformer_blocks))]
        if self.graph.names != names:
            raise ValueError(f"expected the fine graph to be the transformer blocks {names}, got {self.graph.names}")
        self.ref = None
        self.full_seconds = None

    def scheduler(self):
        from shortcut_kernels import zoo

        return zoo.make_scheduler(self.scheduler_config)

    def _sample(self, model, scheduler):
        from shortcut_kernels import zoo

        t0 = time.perf_counter()
        x = zoo.sample(model, scheduler, self.labels, steps=self.p.calls, guidance=self.p.guidance, seed=self.seed,
                       progress=False)
        return x, time.perf_counter() - t0

    def _row(self, library: str, key: str, x, ran, seconds: float, **extra) -> dict:
        from shortcut_kernels import zoo

        if ran.shape[0] != self.p.calls:
            raise RuntimeError(f"{library} {key}: counted {ran.shape[0]} transformer calls, expected {self.p.calls}")
        ref = x if self.ref is None else self.ref
        n = len(self.labels)
        return dict(library=library, key=key, compute=compute_share(ran), macs=mac_share(ran, self.graph),
                    psnr=zoo.metrics.psnr(x, ref), psnr_image_mean=float(zoo.metrics.psnr(x, ref, per_image=True).mean()),
                    class_accuracy=zoo.metrics.class_accuracy(x, self.labels), seconds=seconds,
                    seconds_per_sample=seconds / n,
                    time_vs_full=None if self.full_seconds is None else seconds / self.full_seconds,
                    blocks_per_call=per_call(ran), **extra)

    @torch.no_grad()
    def full(self) -> dict:
        """The reference: every block at every call (sets ``ref`` and ``full_seconds``)."""
        with BlockCounter(self.model.transformer) as c:
            x, dt = self._sample(self.model, self.scheduler())
        self.ref, self.full_seconds = None, None
        row = self._row("full", "full", x, c.ran, dt)
        self.ref, self.full_seconds = x, dt
        row["time_vs_full"] = 1.0
        return row

    @torch.no_grad()
    def ours(self, key: str, schedule) -> dict:
        """One of our schedules through ``accelerate``; checks that the blocks that ran are the
        schedule's computed ones."""
        from shortcut_kernels.runtime import accelerate

        sched = self.scheduler()
        with BlockCounter(self.model.transformer) as c, \
                accelerate(self.model, schedule, scheduler=sched, auto_resize=False):
            x, dt = self._sample(self.model, sched)
        ran = c.ran
        if not torch.equal(ran, schedule.keep):
            raise RuntimeError(f"{key}: the blocks that ran differ from the schedule's computed blocks")
        return self._row("ours", key, x, ran, dt, schedule_macs=schedule.macs_kept, params=dict(schedule.params),
                         builder=schedule.name)

    @torch.no_grad()
    def cache_dit(self, setting: "CacheDiTSetting", on_blocks: bool = False) -> dict:
        """One cache-dit setting on a deep copy of the model. ``cached_steps``: the calls
        cache-dit reports as cached (its own statistics); ``counts_agree``: the hooks counted
        exactly Fn (+ Bn) blocks at those calls and every block at the others."""
        import cache_dit

        model = copy.deepcopy(self.model)
        t = model.transformer
        adapter = cache_dit.BlockAdapter(transformer=t, blocks=t.transformer_blocks,
                                         forward_pattern=cache_dit.ForwardPattern.Pattern_3,
                                         patch_functor=_dit_patch_functor(), check_forward_pattern=True)
        cache_config, calibrator = setting.configs(self.p.calls)
        cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)
        try:
            with BlockCounter(t, on_blocks=on_blocks) as c:
                x, dt = self._sample(model, self.scheduler())
            cached = sorted(int(s) for s in getattr(t, "_cached_steps", []))
        finally:
            cache_dit.disable_cache(adapter)
        ran = c.ran
        n = ran.shape[1]
        expected = torch.ones_like(ran)
        expected[cached, setting.Fn:n - setting.Bn] = False
        return self._row("cache-dit", setting.label, x, ran, dt, setting=setting.to_json(), cached_steps=cached,
                         counts_agree=bool(torch.equal(ran, expected)))


def _dit_patch_functor():
    """cache-dit's DiTTransformer2DModel patch (its forward reads the first block's
    ``norm1.emb`` before the blocks are swapped for cache-dit's)."""
    from cache_dit.caching.patch_functors import DiTPatchFunctor

    return DiTPatchFunctor()


# ----------------------------------------------------------------------------- cache-dit settings


@dataclass(frozen=True)
class CacheDiTSetting:
    """One cache-dit configuration: DBCache (``Fn``, ``Bn``, ``threshold``, ``warmup``), a
    TaylorSeer ``order`` (0: no calibrator) and an optional step mask (``mask``: 1 computes
    the call, 0 lets ``policy`` decide: "static" always reuses, "dynamic" asks the threshold)."""

    Fn: int = 1
    Bn: int = 0
    threshold: float = 0.08
    warmup: int = 4
    order: int = 0
    mask: tuple[int, ...] | None = None
    policy: str = "dynamic"
    mask_name: str | None = None

    @property
    def label(self) -> str:
        head = f"F{self.Fn}B{self.Bn}"
        if self.mask is not None and self.policy == "static":
            body = f"mask {self.mask_name} ({sum(self.mask)} full), static"
        elif self.mask is not None:
            body = f"mask {self.mask_name} ({sum(self.mask)} full), dynamic R{self.threshold:g}"
        else:
            body = f"W{self.warmup} R{self.threshold:g}"
        return f"{head} {body} TaylorSeer{self.order}"

    def configs(self, calls: int):
        """(DBCacheConfig, TaylorSeerCalibratorConfig or None) for a run of ``calls`` calls."""
        import cache_dit

        if self.mask is not None and len(self.mask) != calls:
            raise ValueError(f"the step mask has {len(self.mask)} entries for {calls} calls")
        cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=self.Fn, Bn_compute_blocks=self.Bn,
                                      residual_diff_threshold=self.threshold, max_warmup_steps=self.warmup,
                                      num_inference_steps=calls, enable_separate_cfg=False,
                                      steps_computation_mask=None if self.mask is None else list(self.mask),
                                      steps_computation_policy=self.policy)
        cal = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.order) if self.order else None
        return cfg, cal

    def to_json(self) -> dict:
        d = asdict(self)
        d["mask"] = None if self.mask is None else "".join(map(str, self.mask))
        return d


def most_full_calls(calls: int, blocks: int, fn: int, budget: float) -> int:
    """The most full calls a static mask may have at ``budget`` (compute share) when the
    other calls run ``fn`` blocks; 0 when even one full call (call 0) does not fit."""
    k = math.floor((budget * calls * blocks - fn * calls) / (blocks - fn) + EPS)
    return max(0, min(calls, k)) if k >= 1 else 0


def spread_mask(calls: int, full: int, lead: int) -> tuple[int, ...]:
    """``full`` full calls: the first ``lead`` calls, the rest evenly spaced (centred in equal
    parts) over the remaining calls."""
    lead = min(lead, full)
    rest = full - lead
    pos = set(range(lead)) | {lead + math.floor((i + 0.5) * (calls - lead) / rest) for i in range(rest)}
    return tuple(1 if i in pos else 0 for i in range(calls))


def predefined_masks(calls: int) -> dict[str, tuple[int, ...]]:
    """cache-dit's own step masks (``cache_dit.steps_mask`` policies) at ``calls`` steps."""
    import cache_dit

    return {p: tuple(cache_dit.steps_mask(mask_policy=p, total_steps=calls)) for p in ("slow", "medium", "fast", "ultra")}


def cache_dit_grid(calls: int, blocks: int, budgets, full: bool) -> list[CacheDiTSetting]:
    """The cache-dit settings of the run. Static masks at each budget's most full calls
    (Fn 1 and 2; a lead of 1, 2 or 4 full calls, quick: 1 and 4 with Fn 1, 4 with Fn 2),
    cache-dit's predefined masks (static; FULL also dynamic) near a budget, and dynamic
    DBCache (quick: threshold 0.1 at warmup 4; FULL: Fn 1, 2 x warmup 2, 4, 8 x threshold
    0.05, 0.1, 0.2, 0.4); every one with TaylorSeer order 0, 1 and 2 (quick dynamic: 0, 2)."""
    out: list[CacheDiTSetting] = []
    for b in budgets:
        for fn in (1, 2):
            k = most_full_calls(calls, blocks, fn, b)
            if k < 1:
                continue
            for lead in ((1, 2, 4) if full else (1, 4) if fn == 1 else (4,)):
                m = spread_mask(calls, k, lead)
                out += [CacheDiTSetting(Fn=fn, warmup=min(lead, k), order=o, mask=m, policy="static",
                                        mask_name=f"lead{min(lead, k)}+even") for o in ORDERS]
    for name, m in predefined_masks(calls).items():
        for policy in (("static", "dynamic") if full else ("static",)):
            s = CacheDiTSetting(Fn=1, warmup=calls, threshold=0.1, mask=m, policy=policy, mask_name=name)
            floor = (sum(m) * blocks + (calls - sum(m))) / (calls * blocks)  # what the mask computes at least
            near = any(b - 0.1 < floor <= b + EPS for b in budgets) if policy == "static" else floor <= max(budgets)
            if near:
                out += [CacheDiTSetting(**{**asdict(s), "order": o, "mask": m}) for o in ORDERS]
    if full:
        for fn in (1, 2):
            for w in (2, 4, 8):
                for r in (0.05, 0.1, 0.2, 0.4):
                    out += [CacheDiTSetting(Fn=fn, warmup=w, threshold=r, order=o) for o in ORDERS]
    else:
        out += [CacheDiTSetting(Fn=1, warmup=4, threshold=0.1, order=o) for o in (0, 2)]
    seen, unique = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


# ----------------------------------------------------------------------------- our schedules


def forecast_orders() -> tuple[int, ...]:
    """The reuse orders our builders take: (0,) before the runtime had forecast reuse, (0, 1, 2)
    once ``fora``/``skip_steps`` take ``forecast=``."""
    from shortcut_kernels.runtime import fora, skip_steps

    ok = all("forecast" in inspect.signature(f).parameters for f in (fora, skip_steps))
    return (0, 1, 2) if ok else (0,)


@dataclass
class Ours:
    """Our schedules of the run: ``schedules`` by key; ``same_as``: keys left out because
    their schedule equals the kept key's (same keep rows, same forecast order);
    ``not_applicable``: builder -> why it does not apply to the model."""

    schedules: dict = field(default_factory=dict)
    same_as: dict = field(default_factory=dict)
    not_applicable: dict = field(default_factory=dict)

    def add(self, name: str, schedule) -> None:
        """Keep ``schedule`` under ``name`` unless an equal one is kept already."""
        sig = self._sig(schedule)
        first = next((k for k, s in self.schedules.items() if self._sig(s) == sig), None)
        if first is None:
            self.schedules[name] = schedule
        else:
            self.same_as.setdefault(first, []).append(name)

    @staticmethod
    def _sig(schedule):
        f = getattr(schedule, "forecast", None)  # per-cell orders; absent before forecast reuse
        return schedule.keep.numpy().tobytes(), None if f is None else f.numpy().tobytes()


def our_schedules(model, calls: int, budgets, orders=(0,)) -> Ours:
    """Our hand-made builders at each budget: ``skip_steps`` with the most whole calls the
    budget allows (uniform, power 1.5, and cache-dit's mask placement - a lead of full calls,
    the rest evenly spread - with a lead of each share in :data:`LEAD_SHARES` of them),
    ``fora`` with the smallest interval that fits, each with every forecast order in
    ``orders``."""
    from shortcut_kernels.runtime import deepcache, fora, skip_steps

    ours = Ours()
    try:
        deepcache(model, calls)
    except ValueError as e:
        ours.not_applicable["deepcache"] = str(e).splitlines()[0]

    def add(key, build, **kw):
        for o in orders:
            ours.add(key + (f" forecast{o}" if o else ""), build(**kw, **({"forecast": o} if o else {})))

    for b in budgets:
        count = math.floor(b * calls + EPS)
        for placement, name in (("uniform", "uniform"), ("power", "power1.5")):
            add(f"skip_steps({count},{name})", partial(skip_steps, model, calls, count=count, placement=placement,
                                                       exponent=1.5, granularity="fine"))
        for share in LEAD_SHARES:
            lead = max(1, round(share * count))
            add(f"skip_steps({count},lead{lead}+even)", partial(skip_steps, model, calls, count=count, placement="lead",
                                                               lead=lead, granularity="fine"))
        interval = next(n for n in range(1, calls + 1) if math.ceil(calls / n) <= count)
        add(f"fora({interval})", partial(fora, model, calls, interval))
    return ours


def taylorseer_orders(mask, order: int, fn: int, blocks: int) -> torch.Tensor:
    """The forecast order cache-dit's TaylorSeer (1.5.3) runs at each call of a static
    ``mask``, as a ``[calls, blocks]`` tensor for our :class:`Schedule` (the first ``fn``
    blocks compute at every call: 0 there, as at the mask's full calls).

    TaylorSeer keeps, per cached stream, the last computed value and its derivatives, updated
    at every computed call ``c``: ``d1 = (Y_c - Y_prev) / window``, ``d2 = (d1 - d1_prev) /
    window``, each only where the previous update has the one below it and the state's step
    counter is past 1. That state is made at its first update (call 0 of a run: cache-dit
    makes new calibrators with every fresh context), after the step counters were advanced, so
    its step is the call index minus one: a computation at call ``c`` gives a first derivative
    only when ``c >= 3`` (and a computation came before), a second only when the computation
    before it gave a first. A reused call forecasts with the derivatives its newest
    computation has (``y_0 + e d1 + e^2 / 2 d2``), up to ``order``."""
    calls = len(mask)
    out = torch.zeros(calls, blocks, dtype=torch.int8)
    have, seen = 0, 0  # derivatives the newest computation holds; computations so far
    for t, m in enumerate(mask):
        if m:
            have = 0 if seen == 0 or t - 1 <= 1 else min(order, have + 1)
            seen += 1
        elif seen:
            out[t, fn:] = have
    return out


def taylorseer_weights(call: int, computed) -> tuple[float, ...]:
    """TaylorSeer's order-2 forecast as weights of the outputs computed at ``computed``
    (newest first): its second derivative divides the change of slope by the last window,
    ``d2 = (d1 - d1_prev) / (c_0 - c_1)``, where :func:`shortcut_kernels.runtime.forecast.weights`
    divides by the distance of the slopes' midpoints, ``(c_0 - c_2) / 2``; the same on evenly
    spaced computations. Order 1 (two outputs) is the library's, ``y_0 + e d1``. Used by the
    parity test and ``experiments/forecast_parity.py`` in place of the library's weights."""
    e, w0 = call - computed[0], computed[0] - computed[1]
    if len(computed) == 2:
        return (1 + e / w0, -e / w0)
    w1 = computed[1] - computed[2]
    q = e * e / (2 * w0)
    return (1 + e / w0 + q / w0, -e / w0 - q / w0 - q / w1, q / w1)


def mask_schedules(ours: Ours, model, settings, orders=(0,), fns=(1, 2)) -> Ours:
    """cache-dit's static masks as our schedules, added to ``ours``: the first ``Fn`` blocks
    at every call and every block at the mask's full calls (the blocks cache-dit computes),
    reused with each order in ``orders``, and for orders 1 and 2 also at the orders
    TaylorSeer runs call by call (:func:`taylorseer_orders`; key ``... forecast2 (TaylorSeer's
    orders)``, ``params["orders"] = "taylorseer"``) where they differ. Same compute as the
    cache-dit setting; order 0 is cache-dit's repeat (its blocks after the first Fn reuse one
    summed residual, ours one residual per block: the same sum)."""
    from shortcut_kernels.runtime.schedule import Schedule, graph_of

    g = graph_of(model, "fine")
    has_forecast = "forecast" in inspect.signature(Schedule).parameters
    done = set()
    for st in settings:
        if st.mask is None or st.policy != "static" or not (st.mask_name or "").startswith("lead") \
                or st.Fn not in fns or (st.Fn, st.mask) in done:
            continue
        done.add((st.Fn, st.mask))
        keep = torch.zeros(len(st.mask), len(g), dtype=torch.bool)
        keep[:, :st.Fn] = True
        keep[[t for t, m in enumerate(st.mask) if m]] = True
        key = f"first{st.Fn}+mask({st.mask_name},{sum(st.mask)} full)"
        params = {"Fn": st.Fn, "mask": st.to_json()["mask"]}
        for o in orders if has_forecast else (0,):
            fc = {"forecast": o} if o else {}
            sched = Schedule(keep, g, name="cache-dit-mask", params={**params, **fc}, **fc)
            ours.add(key + (f" forecast{o}" if o else ""), sched)
            if o:
                ts = Schedule(keep, g, name="cache-dit-mask", params={**params, **fc, "orders": "taylorseer"},
                              forecast=taylorseer_orders(st.mask, o, st.Fn, len(g)))
                if ts.forecast_orders != sched.forecast_orders:
                    ours.add(key + f" forecast{o} (TaylorSeer's orders)", ts)
    return ours


def _one_order(schedule):
    """The forecast of ``schedule`` as :meth:`Schedule.with_forecast` takes it for other keep
    rows: its order when every reused block has the same one (blocks never reused aside), else
    one order per block; None for per-cell orders (they do not follow moved rows)."""
    blocks = schedule.forecast_blocks
    if blocks is None:
        return None
    used = {o for b, o in enumerate(blocks) if bool((~schedule.keep[:, b]).any())}
    return used.pop() if len(used) == 1 else (0 if not used else blocks)


def search_start(bank, candidates: dict, budget: float) -> tuple[str, dict]:
    """The start of the search at ``budget``: of ``candidates`` (our schedules of the run, with
    and without forecast) those at no more block compute whose forecast follows moved rows
    (:func:`_one_order`), within 90% of the most compute among them, scored on ``bank``
    (training noise): ``(key of the best, {key: bank PSNR})``."""
    from shortcut_kernels.dipgo.search import psnr

    ok = {k: s for k, s in candidates.items()
          if compute_share(s.keep) <= budget + EPS and _one_order(s) is not None}
    if not ok:
        raise ValueError(f"none of our schedules computes <= {budget:.0%} of the block forwards")
    top = max(compute_share(s.keep) for s in ok.values())
    ok = {k: s for k, s in ok.items() if compute_share(s.keep) >= 0.9 * top - EPS}
    ref = bank(None)
    scores = {k: psnr(bank(s), ref) for k, s in ok.items()}
    return max(scores, key=scores.get), scores


def learned(bench: Bench, budget: float, seconds: float, candidates: dict, bank_size: int = 20):
    """A schedule learned at ``budget``: ``dipgo.learn`` for ``seconds`` on a training bank of
    ``bank_size`` samples (seeds 10,000+) from our best schedule at that budget on the same
    bank (:func:`search_start`: hand-made with and without forecast, cache-dit's masks as our
    schedules), choosing each block's reuse among repeat and forecast orders 1 and 2
    (``forecast=(0, 1, 2)``) and, besides whole calls, rows computing the first block(s) only
    (DBCache's Fn rows). Its MAC target is that of ``budget`` of the block forwards (the
    transformer blocks have equal MACs, so no more MACs is no more compute). Returns
    ``(LearnResult, start key, start scores)``."""
    from shortcut_kernels.dipgo.learn import make_bank, bank_sampler, learn

    sched = bench.scheduler()
    sched.set_timesteps(bench.p.calls)
    bank = make_bank(bench.model, sched, bank_size, guidance=bench.p.guidance)
    key, scores = search_start(bank_sampler(bench.model, sched, bank, guidance=bench.p.guidance), candidates, budget)
    start = candidates[key]
    target = max(start.macs_kept, _macs_at(bench, budget))
    result = learn(bench.model, sched, target, start=start, bank=bank, time_budget=seconds, progress=False,
                   forecast=(0, 1, 2), window=None, validate=2, max_validations=64, estimate_size=4)
    return result, key, scores


def _macs_at(bench: Bench, budget: float) -> float:
    """The MAC share of computing ``budget`` of the block forwards (whole calls)."""
    from shortcut_kernels.runtime import skip_steps

    return skip_steps(bench.model, bench.p.calls, count=max(1, math.floor(budget * bench.p.calls + EPS)),
                      granularity="fine").macs_kept


# ----------------------------------------------------------------------------- forecast cost


@dataclass
class CostPlan:
    """The forecast-cost rows (:func:`forecast_cost`): ``calls`` denoiser calls with full calls
    every ``interval``, ``per_class`` samples of each digit (batch ``2 * 10 * per_class`` per
    call with guidance), ``reps`` interleaved runs of each reuse mode, ``copies`` timed copies
    per rep."""

    calls: int = 9
    interval: int = 3
    per_class: int = 1
    reps: int = 5
    copies: int = 20
    slack: float = 0.05  # issue 28, must hold 3: within 5% of READ plus the extrapolation's bytes


class _Timed(torch.nn.Module):
    """The zoo model with the wall-clock of each of its calls (``times``): everything the
    runtime does in a denoiser call happens inside it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        self.times: list[float] = []

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        return out


def _cost_rows(model, calls: int, interval: int) -> dict:
    """The rows timed: ``fora`` (every block reused between full calls) and the first block at
    every call with the rest reused (cache-dit's Fn 1 pattern), each full every ``interval``."""
    from shortcut_kernels.runtime import fora
    from shortcut_kernels.runtime.schedule import Schedule

    base = fora(model, calls, interval)
    keep = base.keep.clone()
    keep[:, 0] = True
    return {f"fora({interval})": base,
            f"first1+every {interval}": Schedule(keep, base.graph, name="cache-dit-mask",
                                                 params={"Fn": 1, "interval": interval})}


def _bytes(schedule, call: int, tensor_bytes: int) -> tuple[int, int]:
    """At ``call``: the extrapolation's bytes (per forecasting block of order p: p + 1 cached
    tensors read, one written) and what the runtime's ops move beyond READ's. The runtime sums
    a run of consecutive reused blocks in one ``cache_residual`` pass reading x and the
    run's caches, writing one: n + 2 tensors for n repeated blocks, 2 + the sum of p + 1 for
    forecasting ones, so forecasting moves the sum of p beyond READ."""
    from shortcut_kernels.runtime.schedule import FORECAST, READ

    modes, orders = schedule.modes[call], schedule.forecast_orders[call]
    extrapolation = sum(o + 2 for m, o in zip(modes, orders) if m == FORECAST)
    if READ in modes:
        raise ValueError(f"call {call} repeats some blocks and forecasts others: time a call that forecasts all")
    runs, prev = [], None
    for m, o in zip(modes, orders):  # the runs of forecasting blocks, their orders
        if m == FORECAST:
            if prev != FORECAST:
                runs.append([])
            runs[-1].append(o)
        prev = m
    moved = sum(2 + sum(o + 1 for o in run) for run in runs)
    read = sum(2 + len(run) for run in runs)
    return extrapolation * tensor_bytes, (moved - read) * tensor_bytes


@torch.no_grad()
def forecast_cost(bench: Bench, cp: CostPlan | None = None) -> dict:
    """The CPU cost of a forecast reuse (issue 28, must hold 3): per row of
    :func:`_cost_rows`, the same keep rows with reused blocks repeating (``READ``) and
    forecasting at order 1 and 2, run by run interleaved (``reps`` runs of each, each mode
    first in turn); timed: each
    denoiser call (:class:`_Timed`), kept at the calls where the order-2 schedule forecasts
    every reused block at order 2 (the same calls for every mode). Per mode the median over
    runs of the mean call there; ``ratio``: the median over runs of forecast / READ (each run
    paired with the READ run of its round). The bytes' time: a copy that moves exactly the
    extrapolation's bytes (``clone`` of a tensor of half of them: it reads one half and
    writes the other into a new allocation, as the runtime's ops allocate their outputs),
    timed ``copies`` times per run in the same process, the median. Its working set is the
    forecast's (the extra caches do not fit a core's L2); the copy of one block output
    (``copy_s``, L2-resident, scaled to the bytes) is kept for comparison.
    ``over_bound``: the median over rounds of forecast / (READ + the extrapolation bytes'
    time); ``holds``: at most ``1 + slack``. Valid only when nothing else runs on the
    machine."""
    import statistics

    from shortcut_kernels import zoo
    from shortcut_kernels.runtime import accelerate
    from shortcut_kernels.runtime.schedule import FORECAST

    cp = cp or CostPlan()
    labels = torch.arange(10).repeat_interleave(cp.per_class)
    timed = _Timed(bench.model)
    shape = []
    hook = bench.model.transformer.transformer_blocks[0].register_forward_hook(
        lambda m, a, out: shape.append((tuple(out.shape), out.dtype)) if not shape else None)
    try:
        zoo.sample(bench.model, bench.scheduler(), labels, steps=1, guidance=bench.p.guidance, seed=0, progress=False)
    finally:
        hook.remove()
    (out_shape, dtype), = shape
    src = torch.randn(out_shape).to(dtype)

    def copy_times(t: torch.Tensor) -> list[float]:
        times = []
        for _ in range(cp.copies):
            t0 = time.perf_counter()
            t.clone()
            times.append(time.perf_counter() - t0)
        return times

    tensor_bytes = src.numel() * src.element_size()
    out = {"model": bench.p.model, "calls": cp.calls, "interval": cp.interval, "batch_per_call": 2 * len(labels),
           "threads": torch.get_num_threads(), "reps": cp.reps, "slack": cp.slack, "tensor_bytes": tensor_bytes,
           "block_output_shape": list(out_shape), "rows": []}
    for key, base in _cost_rows(bench.model, cp.calls, cp.interval).items():
        modes = {"read": base, "forecast1": base.with_forecast(1), "forecast2": base.with_forecast(2)}
        two = modes["forecast2"]
        at = [t for t in range(cp.calls) if any(m == FORECAST for m in two.modes[t])
              and all(o == 2 for m, o in zip(two.modes[t], two.forecast_orders[t]) if m == FORECAST)]
        if not at:
            raise ValueError(f"{key}: no call forecasts at order 2 in {cp.calls} calls; use more calls")
        per: dict = {k: [] for k in modes}
        names = list(modes)
        extra = {o: _bytes(modes[f"forecast{o}"], at[0], tensor_bytes) for o in (1, 2)}  # (bytes, moved)
        moving = {o: torch.randn(extra[o][0] // 2 // src.element_size()).to(dtype) for o in (1, 2)}
        copies: dict = {"block": [], 1: [], 2: []}
        for rep in range(cp.reps + 1):  # rep 0 warms up (allocator, first-call paths) and is dropped
            for name in names[rep % 3:] + names[:rep % 3]:  # each mode first in turn
                sched = modes[name]
                sch = bench.scheduler()
                timed.times = []
                with accelerate(bench.model, sched, scheduler=sch, auto_resize=False):
                    zoo.sample(timed, sch, labels, steps=cp.calls, guidance=bench.p.guidance, seed=rep,
                               progress=False)
                if len(timed.times) != cp.calls:
                    raise RuntimeError(f"{key}: timed {len(timed.times)} calls, expected {cp.calls}")
                if rep:
                    per[name].append(statistics.fmean(timed.times[t] for t in at))
            for k, t in (("block", src), (1, moving[1]), (2, moving[2])):
                times = copy_times(t)
                if rep:
                    copies[k] += times
        copy_s = statistics.median(copies["block"])  # moves 2 tensors' bytes
        read_s = statistics.median(per["read"])
        row = {"row": key, "calls_timed": at, "read_s": read_s, "copy_s": copy_s}
        for o in (1, 2):
            name = f"forecast{o}"
            (nbytes, moved), bytes_s = extra[o], statistics.median(copies[o])
            over = statistics.median(f / (r + bytes_s) for f, r in zip(per[name], per["read"]))
            row[name] = {"seconds": statistics.median(per[name]),
                         "ratio": statistics.median(f / r for f, r in zip(per[name], per["read"])),
                         "extrapolation_bytes": nbytes, "bytes_moved_beyond_read": moved, "bytes_s": bytes_s,
                         "copy_s_scaled": copy_s * nbytes / (2 * tensor_bytes), "bound_s": read_s + bytes_s, "over_bound": over, "holds": over <= 1 + cp.slack,
                         "times": per[name]}
        row["times_read"] = per["read"]
        out["rows"].append(row)
        print(f"forecast cost {key:18s} READ {1e3 * read_s:.3f} ms/call; " + "; ".join(
            f"order {o}: x{f['ratio']:.3f} (READ + {f['extrapolation_bytes'] / 2 ** 20:.1f} MiB: "
            f"{1e3 * f['bound_s']:.3f} ms, {f['over_bound']:.3f} of it)"
            for o, f in ((o, row[f"forecast{o}"]) for o in (1, 2))), flush=True)
    return out


# ----------------------------------------------------------------------------- bests per budget


def bests(rows: list[dict], budgets, margin: float = MARGIN_DB) -> list[dict]:
    """Per budget: each library's best row (set PSNR) among those at no more compute, and
    ours minus cache-dit in dB (``holds``: at least ``margin``)."""
    out = []
    for b in budgets:
        entry = {"budget": b}
        for lib in ("ours", "cache-dit"):
            ok = [r for r in rows if r["library"] == lib and r["compute"] <= b + EPS]
            best = max(ok, key=lambda r: r["psnr"], default=None)
            entry[lib] = None if best is None else {k: best[k] for k in (
                "key", "compute", "macs", "psnr", "psnr_image_mean", "class_accuracy", "time_vs_full")}
        if entry["ours"] and entry["cache-dit"]:
            entry["ours_minus_cache_dit_db"] = entry["ours"]["psnr"] - entry["cache-dit"]["psnr"]
            entry["holds"] = entry["ours_minus_cache_dit_db"] >= margin
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- the section


def _print(row: dict) -> None:
    print(f"{row['library']:9s} {row['key']:52s} compute {100 * row['compute']:5.1f}%  "
          f"PSNR {row['psnr']:6.2f} dB (mean {row['psnr_image_mean']:6.2f})  "
          f"acc {100 * row['class_accuracy']:5.1f}%", flush=True)


@dataclass
class Plan:
    """The run's size: budgets, samples per digit, search seconds per budget (0: no search),
    the forecast-cost rows (:class:`CostPlan`; None: not run)."""

    budgets: tuple = QUICK_BUDGETS
    per_class: int = 5
    learn_budgets: tuple = ()   # budgets that get a learned schedule
    learn_seconds: float = 0.0  # learning seconds per learned schedule
    notes: list = field(default_factory=list)
    cost: CostPlan | None = None  # the forecast-cost rows (None: not run)
    # FULL: every row first on this many samples per digit, then only the `finalists` best of
    # each library at each budget (and the learned schedules) on `per_class`; None: all on `per_class`
    screen_per_class: int | None = None
    finalists: int = 3


def plan(full: bool) -> Plan:
    if full:
        return Plan(FULL_BUDGETS, 20, FULL_BUDGETS, 240.0,
                    ["FULL: every row screened on 30 samples, the 3 best of each library per budget and the learned "
                     "schedules on 200"], cost=CostPlan(reps=15), screen_per_class=3)
    return Plan(QUICK_BUDGETS, 3, (0.5,), 60.0, ["quick: 30 samples, one learned schedule (50%, 60 s; FULL=1: "
                                                 "200 samples, one learned schedule per budget, 240 s each)"],
                cost=CostPlan())


def run(out_dir=None, full: bool = False) -> dict:
    """The section's JSON: every row (full, ours, cache-dit), the best of each per budget."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        return {"skipped": "cache-dit is not installed (`make install` adds cache-dit==1.5.3)"}
    torch.set_num_threads(1)  # the toy model runs fastest on one thread on a shared 2-core box
    pl = plan(full)
    return measure(Bench(Protocol(per_class=pl.per_class)), pl, full)


def measure(bench: Bench, pl: Plan, full: bool = False) -> dict:
    """Every row of ``pl`` on ``bench`` (the full model first: the reference), then the best
    of each library per budget."""
    import cache_dit

    rows = [bench.full()]
    _print(rows[0])
    screen = Bench(replace(bench.p, per_class=pl.screen_per_class)) if pl.screen_per_class else None
    orders = forecast_orders()
    cost = forecast_cost(bench, pl.cost) if pl.cost is not None and orders != (0,) else None
    ours = our_schedules(bench.model, bench.p.calls, pl.budgets, orders)
    grid = cache_dit_grid(bench.p.calls, len(bench.graph), pl.budgets, full)
    mask_schedules(ours, bench.model, grid, orders, fns=(1, 2) if full else (1,))
    schedules = ours.schedules
    search_log = []
    candidates = dict(schedules)
    for b in pl.learn_budgets:
        try:
            res, start, scores = learned(bench, b, pl.learn_seconds, candidates)
        except ValueError as e:
            search_log.append({"budget": b, "error": str(e)})
            continue
        schedules[f"learned({100 * b:.0f}%)"] = res.schedule
        search_log.append({"budget": b, "start": start, "start_scores": scores, "forecast": res.schedule.forecast_blocks,
                           "moves": len(res.history) - 1, "start_psnr": res.start_psnr, "bank_psnr": res.psnr,
                           "evaluations": res.evaluations, "seconds": res.seconds,
                           "history": res.history})
    screened = None
    if screen is not None:
        print(f"screening every row on {len(screen.labels)} samples", flush=True)
        screened = [screen.full()] + _rows(screen, schedules, grid, ours.same_as)
        keep = finalists(screened, pl.budgets, pl.finalists)
        print(f"finalists on {len(bench.labels)} samples: {len(keep)} rows", flush=True)
        schedules = {k: s for k, s in schedules.items() if ("ours", k) in keep or k.startswith("learned(")}
        grid = [s for s in grid if ("cache-dit", s.label) in keep]
    rows += _rows(bench, schedules, grid, ours.same_as)
    summary = bests(rows, pl.budgets)
    for e in summary:
        if "holds" in e:
            print(f"{100 * e['budget']:.0f}%: ours {e['ours']['key']} {e['ours']['psnr']:.2f} dB, cache-dit "
                  f"{e['cache-dit']['key']} {e['cache-dit']['psnr']:.2f} dB: {e['ours_minus_cache_dit_db']:+.2f} dB",
                  flush=True)
    return {"model": bench.p.model, "calls": bench.p.calls, "guidance": bench.p.guidance,
            "samples": len(bench.labels), "seed": bench.seed, "budgets": list(pl.budgets), "margin_db": MARGIN_DB,
            "cache_dit_version": getattr(cache_dit, "__version__", None), "forecast_orders": list(orders),
            "not_applicable": ours.not_applicable, "search": search_log, "notes": pl.notes,
            "compute": "share of transformer-block forwards that ran (hooks on each block's attn1)",
            "wall_clock": "time_vs_full: seconds over the full model's in the same process; valid only when make "
                          "bench runs alone",
            "bests": summary, "forecast_cost": cost, "rows": rows,
            "screen": None if screen is None else {"samples": len(screen.labels), "finalists": pl.finalists,
                                                   "rows": screened}}


def _rows(bench: Bench, schedules: dict, grid, same_as: dict) -> list[dict]:
    """One row per schedule of ours and per cache-dit setting on ``bench``."""
    rows = []
    for key, s in schedules.items():
        rows.append(bench.ours(key, s))
        rows[-1]["same_as"] = same_as.get(key, [])
        _print(rows[-1])
    for setting in grid:
        rows.append(bench.cache_dit(setting))
        _print(rows[-1])
    return rows


def finalists(rows: list[dict], budgets, count: int) -> set[tuple[str, str]]:
    """``(library, key)`` of the ``count`` best rows (set PSNR) of each library at no more
    compute than each budget: the rows a screened run measures again on all its samples."""
    keep = set()
    for b in budgets:
        for lib in ("ours", "cache-dit"):
            ok = sorted((r for r in rows if r["library"] == lib and r["compute"] <= b + EPS),
                        key=lambda r: r["psnr"], reverse=True)
            keep.update((lib, r["key"]) for r in ok[:count])
    return keep
