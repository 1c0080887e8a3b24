"""Sampling with a schedule: ``accelerate(pipe_or_model, schedule)``.

    handle = accelerate(pipe, schedule)       # or: with accelerate(pipe, schedule): ...
    images = pipe(prompt_embeds=e, num_inference_steps=schedule.calls).images
    handle.remove()                           # the model is exactly as before

How it works. Every block of the schedule's graph becomes an instance of a small cached
subclass of its own class (``_CachedBlock``; same name, same parameters and buffers, same
module path, so ``state_dict`` keys, LoRA/peft adapters, ``pipe.to(...)`` and attribute
access are untouched). Its ``forward`` looks up the block's mode at the current call in
the per-run :class:`CacheState`:

* ``COMPUTE``: run the block; if a later call reuses it, keep its output (a transformer
  block keeps its residual update ``out - in``);
* ``READ``: return the cached output;
* ``FORECAST``: return the output (transformer blocks: ``x`` + the residual) extrapolated
  from the block's last 2 or 3 computed ones (:mod:`.forecast`); other blocks (UNet
  outputs) on ``gated_blend``, its gates 0-d tensors on the block's device made once per
  (call, block) and handed to the block at the call's start. A block
  that some call forecasts keeps its last ``order + 1`` computed outputs
  (``CacheState.older`` holds those before the newest), per run like every cache;
* a run of consecutive reused transformer blocks (``READ`` or ``FORECAST``) is one
  ``cache_residual(x, caches, weights)`` at the first block, the others pass their input on:
  ``x`` plus each repeating block's residual and each forecasting block's last ``order + 1``
  residuals weighted by :func:`.forecast.weights` (weight 1 for a repeat; no weights when
  every block repeats), one pass however many blocks and orders; the weights are a 1-D
  tensor on the block's device, made once per (call, run);
* ``DEAD``: nothing that runs reads the block: it returns an empty tensor of the right
  shape (recorded at call 0) without computing anything. Its values are garbage, read by
  no one as long as the block graph names every consumer; ``accelerate(..., debug=True)``
  fills them with NaN and checks every call's output, so a graph that misses a consumer
  raises ``FloatingPointError`` naming the dead blocks instead of passing garbage on.

A NaN/inf in a cached tensor raises ``FloatingPointError`` at the first call that would
reuse it. The check (a sum, then ``isfinite`` elementwise only when the sum is not
finite: :func:`_all_finite`) waits for the device, so by default
(``check_finite=None``) it runs on CPU tensors only: on a GPU the default path adds no
host-device sync; ``check_finite=True`` checks on every device, ``False`` nowhere;
compiled calls skip it. A forecast checks its output and, when that is not finite, names the
block whose cached outputs hold the NaN/inf.

One accelerate per model: a second ``accelerate`` on a model that is already accelerated
(any schedule, any granularity) raises until the first handle's ``remove()``.

Calls and runs. A forward pre-hook on the denoiser counts calls. The counter restarts at
the start of every sampling run, decided in this order:

1. inside ``with handle.run():`` - the run is the block (explicit per-run context);
2. with a scheduler (a pipeline's ``pipe.scheduler``, or ``scheduler=`` for a bare
   model): a run starts whenever the scheduler has new ``timesteps`` (every pipeline
   call and ``zoo.sample`` batch runs ``set_timesteps``); the run's call count is
   ``len(timesteps) - begin`` (``begin``: the scheduler's ``begin_index``, or the
   position of the first call's timestep - img2img) and must equal the schedule's
   (``ValueError`` naming both, unless ``auto_resize=True``);
3. otherwise (a bare model, no scheduler): a run starts after ``schedule.calls`` calls,
   and earlier at a call whose timestep is above the previous call's (samplers' timesteps
   fall, so a higher one is a new run: an interrupted run does not shift the next). A
   call 1 with call 0's timestep is ambiguous (a run restarted at the same timestep, or
   two calls per step) and raises ``RuntimeError``. This reads each call's timestep (a
   host sync when it lives on a GPU: give ``scheduler=`` or use ``handle.run()`` there).

A call that raises ends its run: the next call starts a new one (inside ``handle.run()``
the block stays the run).
With a scheduler whose timesteps did not change, the first timestep after a complete run
starts a new run too (a custom loop sampling twice after one ``set_timesteps``).

The call index never comes from ``scheduler.timesteps.index(t)`` (wrong for multi-call
samplers), so DDIM, PLMS, DPM-Solver++, Euler and Heun all work: the schedule counts
denoiser calls. A pipeline that calls the denoiser more than once per step (separate
cond/uncond passes) is refused: its second call of a step gets the same timestep as the
first where the scheduler expects the next one - a ``RuntimeError`` says so. Batched CFG
(one call on a doubled batch) and PAG (one call, tripled batch) are one call.

Threads. A handle holds one run's caches, so runs through it must not overlap: a call
from another thread while a run is in progress raises ``RuntimeError`` (``reset()`` ends
a run that its thread abandoned; a run whose thread died ends by itself).

torch.compile. ``handle.compile(**options)`` compiles the denoiser's forward
(``fullgraph=True`` by default) below the call counter: the keep-pattern of the call is
plain Python state, so each distinct pattern (modes and forecast orders) compiles once and
no call breaks the graph; the forecast weights are tensor inputs, not constants of a graph.
(Compiling the whole model yourself, ``torch.compile(unet)``, would trace the counter
and recompile for every call index.) Call 0 of each run runs eagerly (it records the
output shapes the ``DEAD`` blocks need). ``compile()`` raises Dynamo's global recompile
limit to the number of keep-patterns (``remove()`` puts the old value back) and skips the
NaN check in compiled calls whatever ``check_finite`` says.

Stable API (used by ``shortcut_kernels.sdo``): ``accelerate``, ``Accelerated.remove``,
``.run()``, ``.reset()``, ``.compile()``, ``.state``, ``.schedule``, ``.model``.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..models import denoiser
from ..models.adapters import model_kind
from ..ops.cache_residual import cache_residual
from . import forecast as _forecast
from .schedule import COMPUTE, DEAD, FORECAST, READ, Schedule

__all__ = ["accelerate", "Accelerated", "CacheState"]


# ----------------------------------------------------------------------------- state


class CacheState:
    """What one sampling run remembers: the call index, this call's modes, the caches.

    Reset at the start of every run (no stale caches across runs) and emptied after the
    run's last call and by ``remove()``."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.call = -1  # index of the current call; -1 before the first call of a run
        self.calls = 0  # calls of the current run (the schedule's)
        self.modes: tuple[int, ...] = (COMPUTE,) * num_blocks
        self.runs: tuple[tuple[int, ...], ...] = ((),) * num_blocks
        self.orders: tuple[int, ...] = (0,) * num_blocks  # this call's forecast orders
        # this call's forecast coefficients: 0-d gate tensors per UNet block, a 1-D weight tensor
        # per run of reused transformer blocks (at its first block; None where every block repeats)
        self.gates: tuple[Any, ...] = (None,) * num_blocks
        self.reads: list[Any] = [None] * num_blocks  # this call's forecast inputs, newest first
        self.record = False  # record output shapes (call 0)
        self.check_finite: bool | None = None  # the handle's setting, see _checks_finite
        self.cache: list[Any] = [None] * num_blocks
        self.older: list[tuple] = [()] * num_blocks  # forecast blocks: computed outputs before the newest
        self.inputs: list[Any] = [None] * num_blocks  # inputs of transformer blocks being computed
        self.unchecked = [False] * num_blocks
        self.computed_at = [-1] * num_blocks
        self.meta: list[Any] = [None] * num_blocks  # (structure, [(shape, dtype, device)])
        self.where: list[Any] = [None] * num_blocks  # (device, gate dtype) per block, recorded at call 0
        # (meta, placeholder output) per dead block: one allocation per run, not one per call
        # (torch.empty on a GPU costs microseconds of host time; a cached SD-1.5 call has ~27)
        self.placeholders: list[Any] = [None] * num_blocks

    def reset(self) -> None:
        """Forget everything of the previous run."""
        self.call = -1
        self.clear()
        self.meta = [None] * self.num_blocks
        self.where = [None] * self.num_blocks

    def clear(self) -> None:
        """Drop the cached tensors (keeps the call index)."""
        self.cache = [None] * self.num_blocks
        self.older = [()] * self.num_blocks
        self.gates = (None,) * self.num_blocks
        self.reads = [None] * self.num_blocks
        self.inputs = [None] * self.num_blocks
        self.unchecked = [False] * self.num_blocks
        self.placeholders = [None] * self.num_blocks

    # what a run holds between two calls (call 0 records meta / where)
    _BETWEEN_CALLS = ("cache", "older", "inputs", "unchecked", "computed_at", "meta", "where", "placeholders")

    def snapshot(self) -> dict:
        """The run's state between two calls, for :meth:`restore`: the lists copied, the tensors
        shared (the runtime replaces a cached tensor, it never writes into one)."""
        return {"call": self.call, **{f: list(getattr(self, f)) for f in self._BETWEEN_CALLS}}

    def restore(self, snap: dict, depth) -> None:
        """Back to ``snap``'s point of its run, to run the calls after it again - with another
        schedule whose calls up to that point run as the snapshot's did, and whose
        :attr:`.Schedule.forecast_depth` is ``depth`` (older outputs beyond it are dropped).
        The snapshot's run must have stored every block (``store_all``) for the new schedule to
        find every cache it reads."""
        for f in self._BETWEEN_CALLS:
            setattr(self, f, list(snap[f]))
        self.older = [o[:d] for o, d in zip(self.older, depth)]
        self.call = snap["call"]

    def cached_tensors(self) -> list[torch.Tensor]:
        """The tensors the state holds now."""
        out = []
        for c in self.cache + self.inputs + [o for old in self.older for o in old]:
            out.extend(_leaves(c))
        return out

    def cache_bytes(self) -> int:
        seen, n = set(), 0
        for t in self.cached_tensors():
            key = (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                n += t.numel() * t.element_size()
        return n


def _leaves(out) -> list[torch.Tensor]:
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        res = []
        for o in out:
            res.extend(_leaves(o))
        return res
    if hasattr(out, "to_tuple"):
        return _leaves(out.to_tuple())
    return []


def _describe(out):
    """Structure and leaf metadata of a block output (for placeholders of dead blocks)."""
    if isinstance(out, torch.Tensor):
        return ("tensor", ((tuple(out.shape), out.dtype, out.device),))
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor) and isinstance(out[1], tuple):
        return ("hidden_and_skips", tuple((tuple(t.shape), t.dtype, t.device) for t in (out[0],) + out[1]))
    if isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out):
        return ("tuple", tuple((tuple(t.shape), t.dtype, t.device) for t in out))
    raise TypeError(f"block returned a {type(out).__name__}; cached blocks return a tensor or a tuple of tensors")


def _where(leaf) -> tuple:
    """(device, gate dtype) of a block from one output leaf's (shape, dtype, device): the
    gates of its forecasts live there, in the fused op's accumulation dtype."""
    _, dtype, device = leaf
    return (device, torch.float64 if dtype == torch.float64 else torch.float32)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf. One reduction first: the sum of a tensor with a NaN
    or inf is not finite, so a finite sum settles it (half-precision tensors are summed in
    float32, where their sum cannot overflow); a sum that is not finite (a NaN or inf, or
    finite values whose sum overflowed) is settled elementwise. On the CPU a sum is much
    cheaper than ``isfinite(t).all()``, which writes a bool tensor and then reduces it."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


def _checks_finite(setting: bool | None, device: torch.device) -> bool:
    """Whether a cached tensor on ``device`` is checked for NaN/inf. The check waits for the
    device (``bool()`` of a device tensor), so the default (``None``) checks host tensors only."""
    if setting is None:
        return device.type == "cpu"
    return bool(setting)


def _poison(out):
    """Fill a placeholder's floating-point leaves with NaN (debug mode): a read of it shows."""
    for t in _leaves(out):
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
    return out


def _placeholder(meta):
    structure, leaves = meta
    ts = [torch.empty(s, dtype=d, device=dev) for s, d, dev in leaves]
    if structure == "tensor":
        return ts[0]
    if structure == "hidden_and_skips":
        return ts[0], tuple(ts[1:])
    return tuple(ts)


# ----------------------------------------------------------------------------- cached blocks


@dataclass
class _Slot:
    """What a cached block module knows: its block, where it sits in the block, the runtime."""

    runtime: "Accelerated"
    block: int
    name: str
    first: bool
    last: bool
    residual: bool
    store: bool
    forward: Callable


class _CachedBlock:
    """Mixin put in front of a block's own class (see the module docstring)."""

    _sk_slot: _Slot

    def forward(self, *args, **kwargs):
        slot = self._sk_slot
        if slot.residual:
            return slot.runtime._residual_forward(self, slot, args, kwargs)
        return slot.runtime._block_forward(self, slot, args, kwargs)


_CLASSES: dict[type, type] = {}


def _cached_class(cls: type) -> type:
    """``cls`` with ``_CachedBlock`` in front; same ``__name__``/``__qualname__`` so that code
    dispatching on class names (block graphs, diffusers) sees the original."""
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (_CachedBlock, cls),
                   {"__qualname__": cls.__qualname__, "__module__": cls.__module__, "_sk_original_class": cls})
        _CLASSES[cls] = sub
    return sub


# ----------------------------------------------------------------------------- block modes per call


class _CallModes:
    """Per call: the modes of the blocks and, for transformer chains, the runs of reused
    (repeated or forecast) blocks with their weights."""

    def __init__(self, schedule: Schedule, store_all: bool = False):
        g = schedule.graph
        self.schedule = schedule
        self.modes = [tuple(row) for row in schedule.modes]
        self.orders = [tuple(row) for row in schedule.forecast_orders]
        self.depth = tuple(schedule.forecast_depth)
        self.forecasts = tuple(b for b, d in enumerate(self.depth) if d)  # blocks with a history
        self.patterns = set(zip(self.modes, self.orders))
        self._weighted = tuple(blk.residual for blk in g.blocks)
        cached = set(range(len(g))) if store_all else set(schedule.cached_blocks)
        self.store = tuple(b in cached for b in range(len(g)))
        self.runs = []
        self._gate_values = []
        reused = (READ, FORECAST)
        for row, weights in zip(self.modes, schedule.forecast_weights):
            runs = [()] * len(g)
            # UNet blocks forecast on gated_blend with its gates; transformer blocks in runs
            values = [None if w is None or self._weighted[b] else _forecast.gates(w) for b, w in enumerate(weights)]
            b = 0
            while b < len(g):
                if g.blocks[b].residual and row[b] in reused:
                    e = b
                    while e + 1 < len(g) and g.blocks[e + 1].residual and row[e + 1] in reused \
                            and g.blocks[e + 1].producers == (e,):
                        e += 1
                    runs[b] = tuple(range(b, e + 1))
                    if any(row[c] == FORECAST for c in runs[b]):  # a repeat weighs 1
                        values[b] = tuple(x for c in runs[b] for x in (weights[c] if row[c] == FORECAST else (1.0,)))
                    b = e + 1
                else:
                    b += 1
            self.runs.append(tuple(runs))
            self._gate_values.append(tuple(values))
        self._gates: dict[tuple, tuple] = {}
        self._no_gates = (None,) * len(g)

    def gates(self, call: int, where: list) -> tuple:
        """Per block: the forecast coefficients of ``call`` on the block's device in its
        accumulation dtype (``where``: (device, dtype) per block, recorded at call 0), made
        once per call and placement: at the first block of a run of reused transformer blocks
        that forecasts, the run's weights as one 1-D tensor; a UNet block's gates as 0-d
        tensors; None elsewhere."""
        values = self._gate_values[call]
        if not any(values):
            return self._no_gates
        key = (call, tuple(where[b] for b, v in enumerate(values) if v is not None))
        out = self._gates.get(key)
        if out is None:
            out = []
            for b, v in enumerate(values):
                if v is None:
                    out.append(None)
                    continue
                if where[b] is None:
                    raise RuntimeError(f"block {self.schedule.graph.names[b]!r} is reused at call {call} but its "
                                       "device is unknown (call 0 of a run records it)")
                dev, dtype = where[b]
                if self._weighted[b]:
                    out.append(torch.tensor(v, dtype=dtype, device=dev))
                    continue
                out.append(tuple(None if x is None else torch.tensor(x, dtype=dtype, device=dev) for x in v))
            out = self._gates[key] = tuple(out)
        return out


# ----------------------------------------------------------------------------- handle


class Accelerated:
    """Handle of an accelerated model (see :func:`accelerate`). Context manager; ``remove()``."""

    def __init__(self, target: Any, model: nn.Module, schedule: Schedule, scheduler: Any = None,
                 check_finite: bool | None = None, auto_resize: bool = False, store_all: bool = False,
                 debug: bool = False):
        self.target = target
        self.model = model
        self.schedule = schedule
        self.check_finite = check_finite
        self.auto_resize = auto_resize
        self.store_all = store_all
        self.debug = debug
        self._scheduler_source = scheduler
        self._modes_by_calls: dict[int, _CallModes] = {schedule.calls: _CallModes(schedule, store_all)}
        self._call_modes = self._modes_by_calls[schedule.calls]
        self.state = CacheState(len(schedule.graph))
        self._explicit = False
        self._ts_ref = None
        self._run_ts = None  # (timesteps, begin) of the current scheduler-driven run
        self._swapped: list[nn.Module] = []
        self._hooks = []
        self._compiled = None
        self._dynamo_limit = None  # (config name, value before compile(), value compile() set)
        self._active = False
        self.runs_started = 0
        self._timestep_position = _timestep_position(model)
        self._last_t: float | None = None  # timestep of the previous call (bare models)
        self._aborted = False  # the last call raised: the next call starts a run
        self._lock = threading.Lock()
        self._owner: threading.Thread | None = None  # the thread whose run is in progress

    # ------------------------------------------------------------------ install / remove
    def _install(self) -> None:
        g = self.schedule.graph
        plan = self._call_modes
        try:
            for b in g.blocks:
                paths = b.module_paths
                for j, p in enumerate(paths):
                    mod = self.model.get_submodule(p)
                    if isinstance(mod, _CachedBlock):
                        raise RuntimeError(f"{p} is already cached by another accelerate(); call handle.remove() "
                                           "on that handle first")
                    if "forward" in mod.__dict__:
                        raise RuntimeError(f"{p} has an instance-level forward (patched by another library, e.g. "
                                           "DeepCache's helper, which leaves them behind after disable()); "
                                           "undo that first")
                    cls = type(mod)
                    mod.__class__ = _cached_class(cls)
                    mod._sk_slot = _Slot(self, b.index, b.name, j == 0, j == len(paths) - 1, b.residual,
                                         plan.store[b.index], cls.forward)
                    self._swapped.append(mod)
        except Exception:
            self._uninstall_blocks()
            raise
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_call, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._post_call, always_call=True))
        self._active = True

    def _uninstall_blocks(self) -> None:
        for mod in self._swapped:
            mod.__class__ = mod._sk_original_class
            del mod._sk_slot
        self._swapped = []

    def remove(self) -> None:
        """Restore the model exactly (classes, forward) and drop every cached tensor."""
        if not self._active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._uninstall_blocks()
        if self._compiled is not None:
            self.model.__dict__.pop("forward", None)
            self._compiled = None
        self._restore_dynamo_limit()
        self.reset()
        self._active = False

    def __enter__(self) -> "Accelerated":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def active(self) -> bool:
        return self._active

    # ------------------------------------------------------------------ runs
    def reset(self) -> None:
        """Start a new run at the next call (ends the run in progress, whichever thread runs it)."""
        self._forget_run()
        self._release()

    def _forget_run(self) -> None:
        self.state.reset()
        self._ts_ref = self._run_ts = self._last_t = None
        self._aborted = False

    # one run at a time: a run's caches belong to the thread that runs it
    def _claim(self) -> None:
        me = threading.current_thread()
        with self._lock:
            owner = self._owner
            if owner is not None and owner is not me:
                if owner.is_alive():
                    raise RuntimeError(
                        f"another thread ({owner.name!r}) is in the middle of a sampling run through this "
                        f"accelerated {type(self.model).__name__}: a handle holds one run's caches, so runs through "
                        "it must not overlap - sample from one thread at a time (a lock around the sampling call) "
                        "or accelerate a copy of the model per thread (if that thread abandoned its run, "
                        "handle.reset() ends it)")
                self._aborted = True  # its thread died mid-run: start afresh
            self._owner = me

    def _release(self) -> None:
        with self._lock:
            self._owner = None

    def _abort(self) -> None:
        """The call raised: the run is broken; the next call starts a new one."""
        self._aborted = True
        if not self._explicit:
            self.state.clear()
            self._release()

    @contextlib.contextmanager
    def run(self):
        """Explicit per-run context for bare models: the calls inside are one run, which
        must make exactly ``schedule.calls`` calls (ValueError at exit otherwise)."""
        if self._explicit:
            raise RuntimeError("handle.run() contexts do not nest")
        self._claim()
        self._forget_run()
        self._explicit = True
        ok = False
        try:
            yield self
            ok = True
        finally:
            self._explicit = False
            made = self.state.call + 1
            self.state.reset()
            self._release()
            if ok and made not in (0, self._call_modes.schedule.calls):
                raise ValueError(f"the run made {made} denoiser calls but the schedule has "
                                 f"{self._call_modes.schedule.calls}; use schedule.resize({made})")

    def _scheduler(self):
        if self._scheduler_source is not None:
            return self._scheduler_source
        return getattr(self.target, "scheduler", None) if self.target is not self.model else None

    def _use_calls(self, calls: int, why: str) -> None:
        if calls != self._call_modes.schedule.calls:
            if not self.auto_resize:
                raise ValueError(f"schedule has {self.schedule.calls} denoiser calls but this run makes {calls} "
                                 f"({why}); use schedule.resize({calls}) or accelerate(..., auto_resize=True)")
            if calls not in self._modes_by_calls:
                self._modes_by_calls[calls] = _CallModes(self.schedule.resize(calls), self.store_all)
            self._call_modes = self._modes_by_calls[calls]
            self._follow_plan()
        elif self._call_modes.schedule.calls != self.schedule.calls:
            self._call_modes = self._modes_by_calls[self.schedule.calls]
            self._follow_plan()

    def _follow_plan(self) -> None:
        """Store flags follow the plan in use."""
        for mod in self._swapped:
            mod._sk_slot.store = self._call_modes.store[mod._sk_slot.block]

    def _timestep(self, args, kwargs):
        """The call's timestep (its first element), or None."""
        pos = self._timestep_position
        t = kwargs.get("timestep", args[pos] if pos is not None and len(args) > pos else None)
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0]) if t.numel() else None
        return float(t) if isinstance(t, (int, float)) else None

    def _start_run(self) -> None:
        self.state.reset()
        self.runs_started += 1

    def _pre_call(self, module, args, kwargs):
        self._claim()
        if self._explicit:
            if self.state.call + 1 >= self._call_modes.schedule.calls:
                raise ValueError(f"more than the schedule's {self._call_modes.schedule.calls} denoiser calls in one "
                                 "handle.run(); use schedule.resize(...)")
        else:
            sched = self._scheduler()
            ts = getattr(sched, "timesteps", None) if sched is not None else None
            if isinstance(ts, torch.Tensor) and ts.numel():
                self._scheduler_call(sched, ts, args, kwargs)
            else:
                self._bare_call(args, kwargs)
        self._aborted = False
        st = self.state
        st.call += 1
        plan = self._call_modes
        st.calls = plan.schedule.calls
        st.modes = plan.modes[st.call]
        st.runs = plan.runs[st.call]
        st.orders = plan.orders[st.call]
        st.gates = plan.gates(st.call, st.where)
        if plan.forecasts:
            self._prepare_forecasts(plan)
        st.record = st.call == 0
        st.check_finite = self.check_finite
        return None

    def _prepare_forecasts(self, plan: _CallModes) -> None:
        """The history bookkeeping of forecast blocks, done here (eager, before the call) so
        that a compiled call sees only this call's tensors, as many as its pattern says: a
        block that computes at this call moves its previous output into ``older`` (the
        newest ``depth`` are kept); a block that forecasts gets its ``order + 1`` newest
        computed outputs in ``reads``."""
        st = self.state
        reads = [None] * st.num_blocks
        for b in plan.forecasts:
            mode = st.modes[b]
            if mode == COMPUTE and st.cache[b] is not None:
                st.older[b] = ((st.cache[b],) + st.older[b])[:plan.depth[b]]
            elif mode == FORECAST:
                need = st.orders[b]
                if st.cache[b] is None or len(st.older[b]) < need:
                    raise RuntimeError(
                        f"block {self.schedule.graph.names[b]!r} forecasts at call {st.call} from its last {need + 1} "
                        f"computed outputs but has {0 if st.cache[b] is None else 1 + len(st.older[b])} (was the "
                        "run restarted mid-way?)")
                reads[b] = [st.cache[b], *st.older[b][:need]]
        st.reads = reads

    def _scheduler_call(self, sched, ts: torch.Tensor, args, kwargs) -> None:
        """Run boundaries from the scheduler: new timesteps (set_timesteps ran), an aborted
        run, or the first timestep again after a complete run."""
        st = self.state
        calls = self._call_modes.schedule.calls
        if ts is not self._ts_ref or self._aborted:
            self._ts_ref = ts
            self._start_run()
            begin = getattr(sched, "begin_index", None)
            if begin is None:
                t0 = self._timestep(args, kwargs)
                hits = (ts.detach().float().cpu() == t0).nonzero().flatten().tolist() if t0 is not None else []
                begin = hits[0] if hits else 0
            self._run_ts = (ts, int(begin))
            self._use_calls(len(ts) - int(begin), f"{len(ts)} scheduler timesteps from index {begin}")
        elif st.call + 1 >= calls:
            ts_, begin = self._run_ts
            t = self._timestep(args, kwargs)
            if t is None or begin >= len(ts_) or float(ts_[begin]) != t:
                raise RuntimeError(
                    f"the denoiser was called more than {calls} times in one sampling run (the scheduler's "
                    f"timesteps did not change and this call's timestep is not their first): a loop that samples "
                    "again with the same timesteps must call scheduler.set_timesteps(...) or handle.reset() "
                    "before it; a pipeline that calls the denoiser more than once per step (separate cond/uncond "
                    "passes) must batch classifier-free guidance into one call")
            self._start_run()  # a custom loop samples again over the same timesteps
        elif st.call == 0:
            self._check_second_call(args, kwargs)

    def _check_second_call(self, args, kwargs) -> None:
        """Call 1 with call 0's timestep where the scheduler has another: two calls per step."""
        ts_, begin = self._run_ts
        t = self._timestep(args, kwargs)
        k = begin + 1
        if t is not None and k < len(ts_) and float(ts_[k]) != t and float(ts_[k - 1]) == t:
            raise RuntimeError(
                f"denoiser call 1 of this run got timestep {t:g} again where the scheduler's next timestep is "
                f"{float(ts_[k]):g}: either the pipeline calls the denoiser more than once per step (separate "
                "cond/uncond passes, which schedules do not support - batch classifier-free guidance into one "
                "call), or a loop started again at the same timesteps without scheduler.set_timesteps(...) "
                "(call handle.reset() between runs)")

    def _bare_call(self, args, kwargs) -> None:
        """Run boundaries of a bare model: every ``schedule.calls`` calls, after an aborted
        run, and at a timestep above the previous call's (a new run after an interrupted one)."""
        st = self.state
        t = self._timestep(args, kwargs)
        last, self._last_t = self._last_t, t
        if st.call < 0 or st.call + 1 >= self._call_modes.schedule.calls or self._aborted:
            self._start_run()
        elif t is not None and last is not None:
            if t > last:
                self._start_run()
            elif t == last and st.call == 0:
                raise RuntimeError(
                    f"denoiser call 1 of this run got call 0's timestep ({t:g}) again: a bare model cannot tell a "
                    "new run that started at the same timestep from two calls per step - give "
                    "accelerate(..., scheduler=...) (runs then start at set_timesteps), call handle.reset() "
                    "between runs (or sample inside `with handle.run():`), or, if the loop calls the denoiser "
                    "twice per step (separate cond/uncond passes), batch classifier-free guidance into one call")

    def _post_call(self, module, args, output):
        if self._owner is not threading.current_thread():
            return None  # another thread's refused call: not this run's
        st = self.state
        if output is None:  # the call raised (an always_call hook sees None): the run is broken
            self._abort()
            return None
        if self.debug:
            self._check_output(output)
        if st.call >= st.calls - 1:
            st.clear()  # the run is over: hold nothing
            if not self._explicit:
                self._release()
        return None

    def _check_output(self, output) -> None:
        """Debug mode: dead blocks returned NaN; a non-finite output names them."""
        st = self.state
        dead = [self.schedule.graph.names[b] for b, m in enumerate(st.modes) if m == DEAD]
        leaves = [t for t in _leaves(output) if t.is_floating_point()]
        if dead and not all(_all_finite(t) for t in leaves):
            self._abort()  # raising here skips the always_call path
            raise FloatingPointError(
                f"debug: the output of call {st.call} is not finite, and at this call the dead blocks "
                f"{', '.join(dead)} returned NaN: the block graph misses a consumer of one of them (or the model "
                "made NaN itself - compare with debug=False)")

    # ------------------------------------------------------------------ blocks
    def _check(self, slot: _Slot, tensors) -> None:
        st = self.state
        for t in tensors:
            if _checks_finite(st.check_finite, t.device) and not _all_finite(t):
                raise FloatingPointError(
                    f"the cached output of block {slot.name!r} (computed at call {st.computed_at[slot.block]}) "
                    f"contains NaN or inf; call {st.call} would reuse it")
        if not st.older[slot.block]:  # the older outputs of a forecast block are checked by its forecasts
            st.unchecked[slot.block] = False

    def _block_forward(self, module, slot: _Slot, args, kwargs):
        st = self.state
        b = slot.block
        mode = st.modes[b]
        if mode == COMPUTE:
            out = slot.forward(module, *args, **kwargs)
            if st.record:
                st.meta[b] = _describe(out)
                st.where[b] = _where(st.meta[b][1][0])
            if slot.store:
                st.cache[b] = out
                st.unchecked[b] = True
                if not torch.compiler.is_compiling():
                    st.computed_at[b] = st.call
            return out
        if mode == READ:
            out = st.cache[b]
            if out is None:
                raise RuntimeError(f"block {slot.name!r} has no cached output at call {st.call} "
                                   "(was the run restarted mid-way?)")
            if st.check_finite is not False and st.unchecked[b] and not torch.compiler.is_compiling():
                self._check(slot, _leaves(out))
            return out
        if mode == FORECAST:
            caches = st.reads[b]
            out = _forecast.extrapolate_output(caches, st.gates[b])
            if st.check_finite is not False and st.unchecked[b] and not torch.compiler.is_compiling():
                self._check_forecast(slot, caches, _leaves(out))
            return out
        if st.meta[b] is None:
            raise RuntimeError(f"block {slot.name!r} is not needed at call {st.call} but its output shape is unknown "
                               "(call 0 of a run records it)")
        if self.debug:
            return _poison(_placeholder(st.meta[b]))
        if torch.compiler.is_compiling() or torch.is_grad_enabled():  # a graph may save it: fresh each call
            return _placeholder(st.meta[b])
        held = st.placeholders[b]
        if held is None or held[0] is not st.meta[b]:  # a new run recorded new shapes
            held = st.placeholders[b] = (st.meta[b], _placeholder(st.meta[b]))
        return held[1]  # its values are never read: nothing downstream of a dead block is live

    def _residual_forward(self, module, slot: _Slot, args, kwargs):
        st = self.state
        b = slot.block
        x = args[0] if args else kwargs["hidden_states"]
        mode = st.modes[b]
        if mode == COMPUTE:
            if slot.first and st.record:
                st.where[b] = _where((None, x.dtype, x.device))
            if slot.first and slot.store:
                st.inputs[b] = x
            out = slot.forward(module, *args, **kwargs)
            if slot.last and slot.store:
                st.cache[b] = out - st.inputs[b]
                st.inputs[b] = None
                st.unchecked[b] = True
                if not torch.compiler.is_compiling():
                    st.computed_at[b] = st.call
            return out
        if slot.first and st.runs[b]:  # a run of reused blocks: one pass at its first block
            caches = []
            for c in st.runs[b]:
                if st.modes[c] == FORECAST:
                    caches += st.reads[c]
                elif st.cache[c] is None:
                    raise RuntimeError(f"block {self.schedule.graph.names[c]!r} has no cached residual at "
                                       f"call {st.call}")
                else:
                    caches.append(st.cache[c])
            out = cache_residual(x, caches, weights=st.gates[b])
            if st.check_finite is not False and not torch.compiler.is_compiling():
                self._check_run(st.runs[b], out)
            return out
        return x  # inside a run (or a block's later modules): the first one added every delta

    def _check_forecast(self, slot: _Slot, caches: list, leaves: list) -> None:
        """A NaN or inf in a cached output reaches the forecast, so one check of the forecast
        stands for all the outputs it read; only when it fails are they searched for the
        culprit. Checked when it read every output the block holds."""
        st = self.state
        b = slot.block
        if _checks_finite(st.check_finite, leaves[0].device) and not all(_all_finite(t) for t in leaves):
            self._forecast_culprit(slot, caches)
        if len(caches) == 1 + len(st.older[b]):
            st.unchecked[b] = False

    def _forecast_culprit(self, slot: _Slot, caches: list) -> None:
        """Raise naming the block if one of the outputs its forecast reads is not finite."""
        for c in caches:
            for t in _leaves(c):
                if not _all_finite(t):
                    raise FloatingPointError(f"a cached output of block {slot.name!r} contains NaN or inf; call "
                                             f"{self.state.call} would forecast from it")

    def _check_run(self, run, out) -> None:
        """A NaN or inf in any cached residual reaches the run's output, so one check of the
        output stands for all of them; only when it fails are the caches searched for the culprit
        (a non-finite input alone is not the cache's fault). A block counts as checked when
        the run read every residual it holds."""
        st = self.state
        fresh = [c for c in run if st.unchecked[c]]
        if not fresh:
            return
        if _checks_finite(st.check_finite, out.device) and not _all_finite(out):
            for c in fresh:
                slot = next(m for m in self._swapped if m._sk_slot.block == c)._sk_slot
                if st.modes[c] == FORECAST:
                    self._forecast_culprit(slot, st.reads[c])
                else:
                    self._check(slot, [st.cache[c]])
        for c in fresh:
            read = len(st.reads[c]) if st.modes[c] == FORECAST else 1
            if read == 1 + len(st.older[c]):
                st.unchecked[c] = False

    # ------------------------------------------------------------------ compile
    def compile(self, **options) -> "Accelerated":
        """Compile the denoiser's forward below the call counter (``fullgraph=True`` unless
        given): one compile per distinct keep-pattern; call 0 of a run stays eager.

        Two global effects: Dynamo's recompile limit (``torch._dynamo.config.recompile_limit``)
        is raised to the number of keep-patterns, so that Dynamo keeps one graph per pattern
        (``remove()`` puts the old value back, unless someone changed it in between); and
        compiled calls skip the NaN check whatever ``check_finite`` says (call 0, eager, keeps it)."""
        if self._compiled is not None:
            raise RuntimeError("already compiled")
        options.setdefault("fullgraph", True)
        patterns = {p for m in self._modes_by_calls.values() for p in m.patterns}
        self._raise_dynamo_limit(len(patterns) + 2)
        model = self.model
        eager = type(model).forward.__get__(model)
        compiled = torch.compile(eager, **options)
        state = self.state

        def forward(*args, **kwargs):
            if state.record:
                return eager(*args, **kwargs)
            state.check_finite = False
            return compiled(*args, **kwargs)

        self._compiled = compiled
        model.forward = forward
        return self

    def _raise_dynamo_limit(self, graphs: int) -> None:
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        old = getattr(cfg, name)
        new = max(old, graphs)
        setattr(cfg, name, new)
        self._dynamo_limit = (name, old, new)

    def _restore_dynamo_limit(self) -> None:
        if self._dynamo_limit is None:
            return
        name, old, new = self._dynamo_limit
        cfg = torch._dynamo.config
        if getattr(cfg, name) == new:  # not changed by someone else since
            setattr(cfg, name, old)
        self._dynamo_limit = None


def _timestep_position(model: nn.Module) -> int | None:
    """Position of ``timestep`` among the positional arguments of the model's forward
    (DiT and PixArt take ``encoder_hidden_states`` second), or None."""
    try:
        names = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
    except (TypeError, ValueError):  # pragma: no cover
        return None
    return names.index("timestep") if "timestep" in names else None


def _refuse_if_accelerated(model: nn.Module) -> None:
    """Two schedules on one model would both run (a coarse block around fine ones), and
    removing one would leave the other: one accelerate per model."""
    if any(isinstance(m, _CachedBlock) for m in model.modules()):
        raise RuntimeError(f"this {type(model).__name__} is already accelerated (its blocks are already cached by "
                           "another accelerate()): call handle.remove() on that handle first, then accelerate "
                           "again")


def accelerate(pipe_or_model: Any, schedule: Schedule, *, scheduler: Any = None, check_finite: bool | None = None,
               auto_resize: bool = False, store_all: bool = False, debug: bool = False) -> Accelerated:
    """Sample with ``schedule``: blocks reuse their cached outputs where it says so.

    Args:
        pipe_or_model: a diffusers pipeline (``.unet`` / ``.transformer``), a bare
            diffusers model, or a zoo model (``.backbone``).
        schedule: a :class:`Schedule` built for this model (checked: class, blocks).
        scheduler: for bare models, the scheduler whose ``set_timesteps`` starts a run
            (pipelines use ``pipe.scheduler``); see the module docstring for how runs start.
        check_finite: raise at the first reuse of a cached tensor holding NaN/inf: ``None``
            (default) for CPU tensors only (the check waits for the device, so the default
            adds no host-device sync on a GPU), ``True`` on every device, ``False`` never.
        auto_resize: when a run makes another number of calls than the schedule, use
            ``schedule.resize(calls)`` instead of raising.
        store_all: keep every computed block's output in ``handle.state.cache``, not only
            those a later call reads (DiP-GO's shortcut training reads them all; costs memory).
        debug: dead blocks return NaN instead of uninitialised memory, and a call whose
            output is not finite while some block is dead raises ``FloatingPointError``
            naming them: a block graph that misses a consumer shows instead of passing
            garbage on. Costs a fill per dead block and a host sync per call.
    A model takes one accelerate at a time: a second one raises ``RuntimeError`` until
    ``handle.remove()`` of the first. Runs through one handle must not overlap across threads.
    Returns the :class:`Accelerated` handle (``remove()``, context manager, ``run()``,
    ``compile()``).
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    model = denoiser(pipe_or_model)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("accelerate() the model before compiling it, then use handle.compile()")
    model_kind(model)
    _refuse_if_accelerated(model)
    if type(model).__name__ == "SD3Transformer2DModel":
        raise NotImplementedError("SD3's joint transformer blocks return two streams; schedules support DiT, "
                                  "PixArt and UNets")
    schedule.validate(pipe_or_model)
    handle = Accelerated(pipe_or_model, model, schedule, scheduler=scheduler, check_finite=check_finite,
                         auto_resize=auto_resize, store_all=store_all, debug=debug)
    handle._install()
    return handle
