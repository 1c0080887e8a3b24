"""DiP-GO schedules: which block computes at which denoiser call.

A :class:`Schedule` is a ``[calls, blocks]`` keep-mask over the block graph of one model
(:func:`shortcut_kernels.models.block_graph`, ``coarse`` or ``fine``): ``keep[t, b]``
says whether block ``b`` computes at denoiser call ``t`` or reuses the output it last
computed (DiP-GO's backup connection). One row per denoiser *call*, not per sampler
step: Heun and other multi-call samplers count each call; classifier-free guidance
batched into one call is one call.

Every schedule is cascade-normalised (a block none of whose consumers needs its output
is reused too, :meth:`BlockGraph.cascade`) and call 0 computes everything (there is
nothing cached yet). Each (call, block) then has one of four *modes*:

* :data:`COMPUTE`  - the block runs (and its output is cached if a later call reuses it);
* :data:`READ`     - the block's cached output (transformer blocks: cached residual) is read;
* :data:`FORECAST` - the block's output (residual) is extrapolated from its last 2 or 3
  computed ones (:mod:`.forecast`; the schedule's ``forecast`` orders, 0 = ``READ``);
* :data:`DEAD`     - nothing that runs needs the block: it costs nothing at all.

Forecast orders (:attr:`Schedule.forecast`, one per (call, block); builders take one int)
change only how a reused block's output is made, never which blocks compute: the cascade
and ``DEAD`` follow the keep rows alone. A reused cell forecasts at the order its block's
computed outputs so far allow (fewer than ``order + 1``: the lower order, down to ``READ``).

This module holds the type, its JSON (:meth:`Schedule.save`, :meth:`Schedule.load`; the
JSON carries the keep rows, the modes, the forecast orders and the graph, so a report can
draw a schedule without this package; format version 2, version-1 files - no forecast -
still load) and the check against the model it is applied to
(:meth:`Schedule.validate`). The builders are in :mod:`.builders` (``full``,
``deepcache``, ``skip_steps``, ``fora``), the post-processing of learned scores in
:mod:`.postprocess` (``from_scores``, ``from_ranking``); :meth:`Schedule.resize` maps a
schedule to another number of calls (rebuilding it, or with :mod:`.resize`). Stable API
(used by ``shortcut_kernels.sdo``): ``Schedule``, its properties ``keep``, ``calls``,
``graph``, ``modes``, ``macs_kept``, ``ideal_speedup``; for forecast reuse ``forecast``,
``forecast_orders``, ``forecast_weights``, :meth:`Schedule.with_forecast`.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..models import BlockGraph, block_graph, denoiser
from ..models.adapters import model_kind
from . import forecast as _forecast
from .resize import mapped_calls, resized_rows

COMPUTE, READ, DEAD, FORECAST = 0, 1, 2, 3
"""Modes of a block at one call (see the module docstring); the JSON writes them as digits."""
MODE_NAMES = ("compute", "read", "dead", "forecast")

FORMAT = "shortcut_kernels.dipgo.schedule"
VERSION = 2
"""2: the ``forecast`` orders and mode 3 (``FORECAST``); version-1 files load with no forecast."""
VERSIONS = (1, 2)

__all__ = ["Schedule", "graph_of", "check_calls", "check_graph_indices", "rebuildable", "COMPUTE", "READ", "DEAD",
           "FORECAST", "MODE_NAMES"]

_REBUILD: dict[str, Callable[..., "Schedule"]] = {}


def rebuildable(builder: Callable[..., "Schedule"]) -> Callable[..., "Schedule"]:
    """Register a builder whose schedules are named after it (``Schedule.name ==
    builder.__name__``) and whose ``params`` are its keyword arguments, so that
    :meth:`Schedule.resize` rebuilds them as ``builder(graph, calls, **params)``."""
    _REBUILD[builder.__name__] = builder
    return builder


# ----------------------------------------------------------------------------- graphs


def zoo_text_tokens(obj) -> int | None:
    """Text tokens of a zoo model's conditioning: the zoo UNet conditions on one class token
    (see ``shortcut_kernels.zoo.models.DigitsUNet``); None (the default) for anything else."""
    return 1 if hasattr(obj, "condition") and getattr(obj, "kind", None) == "unet" else None


def graph_of(model_or_graph: Any, granularity: str = "coarse", sample_shape=None, *,
             text_tokens: int | None = None, group_size: int = 4) -> BlockGraph:
    """The block graph a builder works on: a :class:`BlockGraph` as it is, or the graph of
    a model / pipeline / zoo model at ``granularity`` (MACs at ``sample_shape``, default
    the native size, batch 1)."""
    if isinstance(model_or_graph, BlockGraph):
        return model_or_graph
    if text_tokens is None:
        text_tokens = zoo_text_tokens(model_or_graph)
    return block_graph(model_or_graph, granularity, sample_shape, text_tokens=text_tokens, group_size=group_size)


def check_calls(calls) -> int:
    """``calls`` if it is a positive int (denoiser calls per sampling run), else ValueError."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be a positive int (denoiser calls per sampling run), got {calls!r}")
    return calls


def check_graph_indices(graph_dict: dict) -> None:
    """ValueError naming the field when a stored graph's block ``index``, ``consumers`` or
    ``producers`` point outside its blocks (a hand-edited file): the graph code would
    otherwise fail later with a bare IndexError, or not at all until a run."""
    blocks = graph_dict["blocks"]
    last = len(blocks) - 1
    for i, bd in enumerate(blocks):
        index = bd.get("index", i)
        if index != i:
            raise ValueError(f"graph.blocks[{i}].index is {index!r}; blocks are stored in execution order, "
                             f"so it must be {i} (valid block indices: 0..{last})")
        for field in ("consumers", "producers"):
            bad = [x for x in bd[field] if isinstance(x, bool) or not isinstance(x, int) or not -1 <= x <= last]
            if bad:
                raise ValueError(f"graph.blocks[{i}].{field} holds {bad}: valid are block indices 0..{last} "
                                 "and -1 (the model's stem/head)")


def _group_size(graph: BlockGraph) -> int:
    if graph.granularity == "coarse" and graph.blocks and graph.blocks[0].kind == "transformer_group":
        return len(graph.blocks[0].module_paths)
    return 4


# ----------------------------------------------------------------------------- Schedule


class Schedule:
    """A ``[calls, blocks]`` keep-mask over a block graph, cascade-normalised.

    Args:
        keep: ``[calls, blocks]`` bools (tensor or nested lists): True = compute.
        graph: the block graph the columns refer to (also carries the MACs).
        name, params: the builder and its arguments (kept in the JSON; :meth:`resize`
            rebuilds from them).
        sampler, steps: optional metadata (scheduler class name, sampler steps).
        forecast: how reused blocks make their output (:mod:`.forecast`): 0 repeats the
            cache (``READ``), 1 / 2 extrapolate linearly / quadratically from the block's
            last computed outputs; an int for every block, one per block, or ``[calls,
            blocks]``. Stored as :attr:`forecast`, ``[calls, blocks]`` with 0 where a block
            computes.
    """

    def __init__(self, keep, graph: BlockGraph, *, name: str = "custom", params: dict | None = None,
                 sampler: str | None = None, steps: int | None = None, forecast=0):
        if not isinstance(graph, BlockGraph):
            raise TypeError(f"graph must be a BlockGraph, got {type(graph).__name__}")
        k = torch.as_tensor(keep)
        if k.ndim != 2 or k.shape[1] != len(graph) or k.shape[0] < 1:
            raise ValueError(f"keep must be [calls, {len(graph)}] (one column per block of the "
                             f"{graph.granularity} {graph.model_class} graph), got shape {tuple(k.shape)}")
        if k.is_floating_point() and not bool(((k == 0) | (k == 1)).all()):
            raise ValueError("keep must be boolean (0/1); turn probabilities into a schedule with from_scores()")
        k = k.to(torch.bool)
        if not bool(k[0].all()):
            raise ValueError("call 0 must compute every block: there is nothing cached before it "
                             f"(row 0 reuses {[graph.names[i] for i in (~k[0]).nonzero().flatten().tolist()]})")
        self.graph = graph
        self.keep = graph.cascade(k).clone()
        self.forecast = _forecast.normalise(forecast, self.keep)
        self.name = name
        self.params = dict(params or {})
        self.sampler = sampler
        self.steps = steps
        self._modes = None
        self._orders = None
        self._weights = None

    # ------------------------------------------------------------------ basics
    @property
    def calls(self) -> int:
        return int(self.keep.shape[0])

    @property
    def block_names(self) -> list[str]:
        return self.graph.names

    @property
    def model_class(self) -> str:
        return self.graph.model_class

    @property
    def granularity(self) -> str:
        return self.graph.granularity

    def __len__(self) -> int:
        return self.calls

    def __eq__(self, other) -> bool:
        return (isinstance(other, Schedule) and torch.equal(self.keep, other.keep)
                and torch.equal(self.forecast, other.forecast)
                and self.graph.names == other.graph.names and self.model_class == other.model_class)

    def __repr__(self) -> str:
        order = int(self.forecast.max()) if self.forecast.numel() else 0
        return (f"Schedule({self.name}, {self.model_class} {self.granularity}, {self.calls} calls x "
                f"{len(self.graph)} blocks, {100 * self.macs_kept:.1f}% MACs kept, "
                f"ideal speedup {self.ideal_speedup:.2f}x" + (f", forecast order <= {order}" if order else "") + ")")

    @property
    def modes(self) -> list[tuple[int, ...]]:
        """Per call, per block: :data:`COMPUTE`, :data:`READ`, :data:`FORECAST` or :data:`DEAD`."""
        if self._modes is None:
            self._plan()
        return self._modes

    @property
    def forecast_orders(self) -> list[tuple[int, ...]]:
        """Per call, per block: the forecast order that runs (1 or 2 where the mode is
        :data:`FORECAST`, 0 elsewhere) - :attr:`forecast` lowered to what the block's
        computed outputs before the call allow."""
        if self._orders is None:
            self._plan()
        return self._orders

    @property
    def forecast_weights(self) -> list[tuple[tuple[float, ...] | None, ...]]:
        """Per call, per block: the Lagrange weights of the block's last computed outputs
        (newest first) where it forecasts, else None (:func:`.forecast.weights`)."""
        if self._weights is None:
            self._plan()
        return self._weights

    def _plan(self) -> None:
        """Modes, effective forecast orders and weights of every (call, block)."""
        modes, orders, weights = [], [], []
        computed: list[list[int]] = [[] for _ in range(len(self.graph))]
        for t, (row, f) in enumerate(zip(self.keep.tolist(), self.forecast.tolist())):
            live = self.graph.live(row)
            m, o, w = [], [], []
            for b, (k, lv) in enumerate(zip(row, live)):
                order = min(f[b], len(computed[b]) - 1) if lv and not k else 0
                m.append(COMPUTE if k else (DEAD if not lv else (FORECAST if order else READ)))
                o.append(order)
                w.append(_forecast.weights(t, computed[b][::-1][:order + 1]) if order else None)
            for b, k in enumerate(row):
                if k:
                    computed[b].append(t)
            modes.append(tuple(m))
            orders.append(tuple(o))
            weights.append(tuple(w))
        self._modes, self._orders, self._weights = modes, orders, weights

    @property
    def cached_blocks(self) -> list[int]:
        """Blocks whose output some call reads from the cache (repeated or forecast)."""
        return sorted({b for row in self.modes for b, m in enumerate(row) if m in (READ, FORECAST)})

    @property
    def forecast_depth(self) -> list[int]:
        """Per block: how many computed outputs before the newest the runtime keeps (the
        highest forecast order it runs at)."""
        return [max(row[b] for row in self.forecast_orders) for b in range(len(self.graph))]

    @property
    def forecast_blocks(self) -> list[int] | None:
        """One forecast order per block if every reused cell of each block has the same one
        (what the builders make), else None."""
        return _forecast.per_block(self.forecast, self.keep)

    def with_forecast(self, forecast) -> "Schedule":
        """This schedule with other forecast orders (an int, one per block or ``[calls,
        blocks]``; 0 = plain ``READ``): same keep rows, name and metadata. A builder's
        schedule given an int keeps rebuilding (``params["forecast"]``)."""
        params = {k: v for k, v in self.params.items() if k != "forecast"}
        builder = _REBUILD.get(self.name)
        if isinstance(forecast, int) and not isinstance(forecast, bool) and forecast and builder is not None \
                and "forecast" in inspect.signature(builder).parameters:
            params["forecast"] = forecast
        return Schedule(self.keep, self.graph, name=self.name, params=params, sampler=self.sampler, steps=self.steps,
                        forecast=forecast)

    def computed_calls(self, block: int | str | None = None) -> list[int]:
        """Calls at which ``block`` computes (``None``: calls at which any block does)."""
        if block is None:
            return [t for t in range(self.calls) if bool(self.keep[t].any())]
        b = self.graph.index(block)
        return [t for t in range(self.calls) if bool(self.keep[t, b])]

    # ------------------------------------------------------------------ MACs
    def macs_per_call(self) -> list[int]:
        """MACs of each call (overhead included) at the graph's input shape."""
        macs = torch.tensor(self.graph.block_macs, dtype=torch.float64)
        kept = (self.keep.to(torch.float64) * macs).sum(1)
        return [int(x) + self.graph.overhead_macs for x in kept.tolist()]

    @property
    def macs_kept(self) -> float:
        """Fraction of the full model's MACs this schedule spends (overhead counted as kept)."""
        return sum(self.macs_per_call()) / (self.calls * self.graph.total_macs)

    @property
    def ideal_speedup(self) -> float:
        """MAC-ideal speedup: total MACs / kept MACs."""
        return 1.0 / self.macs_kept

    def cache_bytes(self, sample_shape=None, dtype: torch.dtype = torch.float32) -> int:
        """Peak bytes of cached outputs at ``sample_shape`` (default: the graph's input).

        Block outputs scale with the batch and the latent's area (UNet feature maps and
        transformer tokens alike), so the graph's shapes are scaled from its own input."""
        scale = 1.0
        if sample_shape is not None:
            ref = self.graph.input_shapes.get("sample") or self.graph.input_shapes.get("hidden_states")
            if ref is None:
                raise ValueError("the schedule's graph has no recorded input shape to scale from")
            b, _, h, w = (int(x) for x in sample_shape)
            rb, _, rh, rw = (int(x) for x in ref)
            scale = (b * h * w) / (rb * rh * rw)
        size = torch.empty((), dtype=dtype).element_size()
        depth = self.forecast_depth
        return int(round(sum(self.graph.blocks[b].output_numel() * (1 + depth[b]) for b in self.cached_blocks)
                         * scale)) * size

    # ------------------------------------------------------------------ display
    def summary(self, sample_shape=None, dtype: torch.dtype = torch.float32, max_blocks: int = 60) -> str:
        """MACs kept, ideal speedup, cache memory and a calls x blocks map
        (``#`` compute, ``o`` read from cache, ``f`` forecast, ``.`` not needed)."""
        shape = sample_shape or self.graph.input_shapes.get("sample") or self.graph.input_shapes.get("hidden_states")
        lines = [
            f"{self.name} schedule for {self.model_class} ({self.granularity}, {len(self.graph)} blocks), "
            f"{self.calls} denoiser calls" + (f", sampler {self.sampler}" if self.sampler else ""),
            f"MACs kept: {100 * self.macs_kept:.1f}% ({sum(self.macs_per_call()) / 1e9:.3f} of "
            f"{self.calls * self.graph.total_macs / 1e9:.3f} GMACs at input {tuple(shape) if shape else '?'}); "
            f"ideal speedup {self.ideal_speedup:.2f}x",
            f"cache: {len(self.cached_blocks)} blocks, {self.cache_bytes(sample_shape, dtype) / 2**20:.2f} MiB "
            f"({str(dtype).replace('torch.', '')}, input {tuple(shape) if shape else '?'})",
            f"full calls: {[t for t in range(self.calls) if bool(self.keep[t].all())]}",
            "map (rows = calls, columns = blocks; # compute, o cached, f forecast, . not needed):",
        ]
        sym = "#o.f"
        n = len(self.graph)
        cols = range(min(n, max_blocks))
        for t, row in enumerate(self.modes):
            lines.append(f"{t:>4} " + "".join(sym[row[b]] for b in cols) + (" ..." if n > max_blocks else ""))
        lines.append("blocks: " + ", ".join(f"{i}={nm}" for i, nm in enumerate(self.graph.names)))
        return "\n".join(lines)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "params": self.params,
            "model_class": self.model_class, "granularity": self.granularity, "calls": self.calls,
            "sampler": self.sampler, "steps": self.steps, "block_names": self.block_names,
            "macs_kept": self.macs_kept, "ideal_speedup": self.ideal_speedup,
            "keep": ["".join("1" if x else "0" for x in row) for row in self.keep.tolist()],
            "modes": ["".join(str(m) for m in row) for row in self.modes],
            "forecast": _forecast.to_json(self.forecast, self.keep),
            "graph": self.graph.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a schedule (expected \"format\": \"{FORMAT}\")")
        if d.get("version") not in VERSIONS:
            raise ValueError(f"schedule format version {d.get('version')!r} is not supported (this package reads "
                             f"{', '.join(map(str, VERSIONS))})")
        try:
            check_graph_indices(d["graph"])
            graph = BlockGraph.from_dict(d["graph"])
            rows = d["keep"]
            keep = [[c == "1" for c in row] for row in rows]
            if any(set(row) - {"0", "1"} for row in rows):
                raise ValueError("keep rows must be strings of 0/1")
            forecast = _forecast.from_json(d.get("forecast") if d["version"] >= 2 else None, len(rows),
                                           len(graph.names))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed schedule: {e!r}") from e
        if d.get("block_names") is not None and list(d["block_names"]) != graph.names:
            raise ValueError("malformed schedule: block_names disagree with the stored graph")
        if d.get("calls") is not None and int(d["calls"]) != len(keep):
            raise ValueError(f"malformed schedule: calls={d['calls']} but {len(keep)} keep rows")
        return cls(keep, graph, name=d.get("name", "custom"), params=d.get("params"), sampler=d.get("sampler"),
                   steps=d.get("steps"), forecast=forecast)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any = None, calls: int | None = None) -> "Schedule":
        """Read a schedule file; with ``model`` (and ``calls``) also :meth:`validate` it."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read schedule file {path}: {e}") from e
        try:
            s = cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if model is not None:
            s.validate(model, calls)
        return s

    def validate(self, model: Any, calls: int | None = None) -> None:
        """Raise ValueError naming the mismatch if this schedule does not fit ``model``
        (class, granularity's block names) or ``calls`` denoiser calls, or if its
        ``forecast`` orders are not a ``[calls, blocks]`` tensor of 0, 1 and 2."""
        if not torch.equal(_forecast.normalise(self.forecast, self.keep), self.forecast):
            raise ValueError("schedule.forecast was changed in place into something that is not its normal form "
                             "(0 at computing cells); use schedule.with_forecast(...)")
        m = denoiser(model)
        cls = type(m).__name__
        if cls != self.model_class:
            raise ValueError(f"schedule was built for a {self.model_class}, not for this {cls}")
        model_kind(m)
        g = block_graph(m, self.granularity, text_tokens=zoo_text_tokens(model),
                        group_size=_group_size(self.graph))
        if g.names != self.block_names:
            diff = next((i for i, (a, b) in enumerate(zip(g.names, self.block_names)) if a != b),
                        min(len(g.names), len(self.block_names)))
            raise ValueError(
                f"schedule's blocks do not match this {cls}: it has {len(self.block_names)} "
                f"{self.granularity} blocks, the model {len(g.names)}; first difference at block {diff}: "
                f"schedule {self.block_names[diff] if diff < len(self.block_names) else None!r}, "
                f"model {g.names[diff] if diff < len(g.names) else None!r}")
        self._check_module_paths(m, g)
        if [b.consumers for b in g] != [b.consumers for b in self.graph]:
            raise ValueError(f"schedule's block topology does not match this {cls} (same names, other wiring)")
        if calls is not None and calls != self.calls:
            raise ValueError(f"schedule has {self.calls} denoiser calls but the run makes {calls}; "
                             f"use schedule.resize({calls})")

    def _check_module_paths(self, model: torch.nn.Module, graph: BlockGraph) -> None:
        """ValueError naming the first stored module path that ``model`` lacks or that sits on
        another block in ``graph`` (the model's own graph): the runtime swaps the modules at
        these paths, so a wrong one would only fail inside :func:`accelerate`."""
        cls = type(model).__name__
        have = {name for name, _ in model.named_modules()}
        for mine, theirs in zip(self.graph, graph):
            if mine.module_paths == theirs.module_paths:
                continue
            missing = [p for p in mine.module_paths if p not in have]
            if missing:
                raise ValueError(f"schedule block {mine.index} ({mine.name!r}) runs module {missing[0]!r}, which this "
                                 f"{cls} does not have: the schedule was made for another model")
            raise ValueError(f"schedule block {mine.index} ({mine.name!r}) runs modules {list(mine.module_paths)}, "
                             f"this {cls}'s block {theirs.index} runs {list(theirs.module_paths)}: the schedule "
                             "was made for another model")

    # ------------------------------------------------------------------ resize
    def resize(self, calls: int) -> "Schedule":
        """The same schedule for ``calls`` denoiser calls.

        A schedule whose rows are what its builder (registered with :func:`rebuildable`)
        makes from the stored arguments is rebuilt with them (a deepcache(3) schedule stays
        interval 3; explicit call lists are mapped proportionally,
        :func:`~.resize.mapped_calls`). Any other schedule - custom, learned, or a builder's
        schedule whose rows were edited since - has its rows mapped: it keeps the MAC share
        nearest its own and, for each kind of row (whole calls, and each pattern of partial
        rows), its density along the trajectory (halving merges pairs of adjacent segments;
        an early-dense schedule stays early-dense); whole calls are placed first, call 0
        among them (:func:`~.resize.resized_rows`). The forecast orders stay: a builder's
        through its arguments, one order per block as it is, per-cell orders from the old
        call at the same place in the run (:func:`.forecast.mapped`).
        """
        calls = check_calls(calls)
        if calls == self.calls:
            return self
        builder = self._builder()
        if builder is not None:
            params = dict(self.params)
            if params.get("compute") is not None:
                params.update(compute=mapped_calls(params["compute"], self.calls, calls), count=None)
            return builder(self.graph, calls, **params)
        blocks = self.forecast_blocks
        return Schedule(resized_rows(self.keep, calls, self.graph), self.graph, name=self.name,
                        params={**self.params, "resized_from": self.calls}, sampler=self.sampler,
                        forecast=blocks if blocks is not None else _forecast.mapped(self.forecast, self.keep, calls))

    def _builder(self) -> Callable[..., "Schedule"] | None:
        """The registered builder that makes exactly these rows from ``params``, else None.

        The name and arguments alone do not say it: rows edited after building (in Python
        or in the JSON) keep both, and rebuilding from them would drop the edits."""
        builder = _REBUILD.get(self.name)
        if builder is None or "resized_from" in self.params:
            return None
        try:
            rebuilt = builder(self.graph, self.calls, **self.params)
        except (TypeError, ValueError):  # arguments the builder no longer takes: the rows are the schedule
            return None
        return builder if torch.equal(rebuilt.keep, self.keep) and torch.equal(rebuilt.forecast, self.forecast) else None
