"""DiP-GO schedules: which block computes at which denoiser call.

A :class:`Schedule` is a ``[calls, blocks]`` keep-mask over the block graph of one model
(:func:`shortcut_kernels.models.block_graph`, ``coarse`` or ``fine``): ``keep[t, b]``
says whether block ``b`` computes at denoiser call ``t`` or reuses the output it last
computed (DiP-GO's backup connection). One row per denoiser *call*, not per sampler
step: Heun and other multi-call samplers count each call; classifier-free guidance
batched into one call is one call.

Every schedule is cascade-normalised (a block none of whose consumers needs its output
is reused too, :meth:`BlockGraph.cascade`) and call 0 computes everything (there is
nothing cached yet). Each (call, block) then has one of three *modes*:

* :data:`COMPUTE` - the block runs (and its output is cached if a later call reuses it);
* :data:`READ`    - the block's cached output (transformer blocks: cached residual) is read;
* :data:`DEAD`    - nothing that runs needs the block: it costs nothing at all.

Builders (all take a model, pipeline, zoo model or :class:`BlockGraph` and the number of
denoiser calls):

* :func:`full` - every block at every call (bit-identical to the untouched model);
* :func:`deepcache` - DeepCache (UNets): full calls every ``interval`` calls (or at
  non-uniform, centre-dense positions), retrieval calls keep the shallow path above a
  skip branch, numbered as the ``DeepCache`` package does (``branch``: block ``b // 3``,
  layer ``b % 3``) or by skip index (``skip=``);
* :func:`skip_steps` - whole-call reuse at the calls that do not compute (the shipped
  DiP-GO 0.8 schedule is of this kind): explicit calls, or a count placed uniformly or
  early-dense (power law);
* :func:`fora` - FORA-style (transformers): every block reused between full calls;
* :func:`from_scores` - DiP-GO's post-processing of learned reuse probabilities into a
  schedule at a kept-MAC target (threshold descent with the cascade).

Schedules save to / load from JSON (:meth:`Schedule.save`, :meth:`Schedule.load`) and
are checked against the model they are applied to (:meth:`Schedule.validate`).
:meth:`Schedule.resize` maps one to another number of calls. Stable API (used by
``shortcut_kernels.sdo``): ``Schedule``, its properties ``keep``, ``calls``, ``graph``,
``modes``, ``macs_kept``, ``ideal_speedup``, and the builders above.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..models import BlockGraph, block_graph, denoiser
from ..models.adapters import model_kind

COMPUTE, READ, DEAD = 0, 1, 2
"""Modes of a block at one call (see the module docstring)."""
MODE_NAMES = ("compute", "read", "dead")

FORMAT = "shortcut_kernels.dipgo.schedule"
VERSION = 1

__all__ = ["Schedule", "full", "deepcache", "skip_steps", "fora", "from_scores", "from_ranking", "budget_rows",
           "graph_of", "COMPUTE", "READ", "DEAD"]


# ----------------------------------------------------------------------------- graphs


def _zoo_text_tokens(obj) -> int | None:
    # the zoo UNet conditions on one class token (see shortcut_kernels.zoo.models.DigitsUNet)
    return 1 if hasattr(obj, "condition") and getattr(obj, "kind", None) == "unet" else None


def graph_of(model_or_graph: Any, granularity: str = "coarse", sample_shape=None, *,
             text_tokens: int | None = None, group_size: int = 4) -> BlockGraph:
    """The block graph a builder works on: a :class:`BlockGraph` as it is, or the graph of
    a model / pipeline / zoo model at ``granularity`` (MACs at ``sample_shape``, default
    the native size, batch 1)."""
    if isinstance(model_or_graph, BlockGraph):
        return model_or_graph
    if text_tokens is None:
        text_tokens = _zoo_text_tokens(model_or_graph)
    return block_graph(model_or_graph, granularity, sample_shape, text_tokens=text_tokens, group_size=group_size)


def _check_calls(calls) -> int:
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be a positive int (denoiser calls per sampling run), got {calls!r}")
    return calls


# ----------------------------------------------------------------------------- Schedule


class Schedule:
    """A ``[calls, blocks]`` keep-mask over a block graph, cascade-normalised.

    Args:
        keep: ``[calls, blocks]`` bools (tensor or nested lists): True = compute.
        graph: the block graph the columns refer to (also carries the MACs).
        name, params: the builder and its arguments (kept in the JSON; :meth:`resize`
            rebuilds from them).
        sampler, steps: optional metadata (scheduler class name, sampler steps).
    """

    def __init__(self, keep, graph: BlockGraph, *, name: str = "custom", params: dict | None = None,
                 sampler: str | None = None, steps: int | None = None):
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
        self.name = name
        self.params = dict(params or {})
        self.sampler = sampler
        self.steps = steps
        self._modes = None

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
                and self.graph.names == other.graph.names and self.model_class == other.model_class)

    def __repr__(self) -> str:
        return (f"Schedule({self.name}, {self.model_class} {self.granularity}, {self.calls} calls x "
                f"{len(self.graph)} blocks, {100 * self.macs_kept:.1f}% MACs kept, "
                f"ideal speedup {self.ideal_speedup:.2f}x)")

    @property
    def modes(self) -> list[tuple[int, ...]]:
        """Per call, per block: :data:`COMPUTE`, :data:`READ` or :data:`DEAD`."""
        if self._modes is None:
            out = []
            for row in self.keep.tolist():
                live = self.graph.live(row)
                out.append(tuple(COMPUTE if k else (READ if lv else DEAD) for k, lv in zip(row, live)))
            self._modes = out
        return self._modes

    @property
    def cached_blocks(self) -> list[int]:
        """Blocks whose output some call reads from the cache."""
        return sorted({b for row in self.modes for b, m in enumerate(row) if m == READ})

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
        return int(round(sum(self.graph.blocks[b].output_numel() for b in self.cached_blocks) * scale)) * size

    # ------------------------------------------------------------------ display
    def summary(self, sample_shape=None, dtype: torch.dtype = torch.float32, max_blocks: int = 60) -> str:
        """MACs kept, ideal speedup, cache memory and a calls x blocks map
        (``#`` compute, ``o`` read from cache, ``.`` not needed)."""
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
            "map (rows = calls, columns = blocks; # compute, o cached, . not needed):",
        ]
        sym = "#o."
        n = len(self.graph)
        cols = range(min(n, max_blocks))
        for t, row in enumerate(self.modes):
            lines.append(f"{t:>4} " + "".join(sym[row[b]] for b in cols) + (" ..." if n > max_blocks else ""))
        lines.append("blocks: " + ", ".join(f"{i}={nm}" for i, nm in enumerate(self.graph.names)))
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Save the calls x blocks map as a PNG (compute / read from cache / not needed)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        data = torch.tensor(self.modes).numpy()
        fig_w = min(2 + 0.25 * len(self.graph), 20)
        fig_h = min(2 + 0.12 * self.calls, 14)
        fig, ax = plt.subplots(figsize=(fig_w, fig_h))
        ax.imshow(data, aspect="auto", interpolation="nearest", vmin=0, vmax=2,
                  cmap=ListedColormap(["#2b6cb0", "#f6ad55", "#edf2f7"]))
        ax.set_xticks(range(len(self.graph)))
        ax.set_xticklabels(self.graph.names, rotation=90, fontsize=6)
        ax.set_ylabel("denoiser call")
        ax.set_title(title or f"{self.name}: {100 * self.macs_kept:.1f}% MACs kept, "
                              f"ideal {self.ideal_speedup:.2f}x (blue compute, orange cached)", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "params": self.params,
            "model_class": self.model_class, "granularity": self.granularity, "calls": self.calls,
            "sampler": self.sampler, "steps": self.steps, "block_names": self.block_names,
            "macs_kept": self.macs_kept, "ideal_speedup": self.ideal_speedup,
            "keep": ["".join("1" if x else "0" for x in row) for row in self.keep.tolist()],
            "graph": self.graph.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a schedule (expected \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise ValueError(f"schedule format version {d.get('version')!r} is not supported (expected {VERSION})")
        try:
            graph = BlockGraph.from_dict(d["graph"])
            rows = d["keep"]
            keep = [[c == "1" for c in row] for row in rows]
            if any(set(row) - {"0", "1"} for row in rows):
                raise ValueError("keep rows must be strings of 0/1")
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed schedule: {e!r}") from e
        if d.get("block_names") is not None and list(d["block_names"]) != graph.names:
            raise ValueError("malformed schedule: block_names disagree with the stored graph")
        if d.get("calls") is not None and int(d["calls"]) != len(keep):
            raise ValueError(f"malformed schedule: calls={d['calls']} but {len(keep)} keep rows")
        return cls(keep, graph, name=d.get("name", "custom"), params=d.get("params"), sampler=d.get("sampler"),
                   steps=d.get("steps"))

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
        (class, granularity's block names) or ``calls`` denoiser calls."""
        m = denoiser(model)
        cls = type(m).__name__
        if cls != self.model_class:
            raise ValueError(f"schedule was built for a {self.model_class}, not for this {cls}")
        model_kind(m)
        g = block_graph(m, self.granularity, text_tokens=_zoo_text_tokens(model),
                        group_size=_group_size(self.graph))
        if g.names != self.block_names:
            diff = next((i for i, (a, b) in enumerate(zip(g.names, self.block_names)) if a != b),
                        min(len(g.names), len(self.block_names)))
            raise ValueError(
                f"schedule's blocks do not match this {cls}: it has {len(self.block_names)} "
                f"{self.granularity} blocks, the model {len(g.names)}; first difference at block {diff}: "
                f"schedule {self.block_names[diff] if diff < len(self.block_names) else None!r}, "
                f"model {g.names[diff] if diff < len(g.names) else None!r}")
        if [b.consumers for b in g] != [b.consumers for b in self.graph]:
            raise ValueError(f"schedule's block topology does not match this {cls} (same names, other wiring)")
        if calls is not None and calls != self.calls:
            raise ValueError(f"schedule has {self.calls} denoiser calls but the run makes {calls}; "
                             f"use schedule.resize({calls})")

    @classmethod
    def from_pruner(cls, pruner, target_macs: float, **kw) -> "Schedule":
        """A learned schedule: a trained :class:`~shortcut_kernels.dipgo.pruner.Pruner`'s reuse
        probabilities through DiP-GO's post-processing (:func:`from_scores`) at ``target_macs``."""
        return pruner.to_schedule(target_macs, **kw)

    # ------------------------------------------------------------------ resize
    def resize(self, calls: int) -> "Schedule":
        """The same schedule for ``calls`` denoiser calls.

        Schedules made by a builder are rebuilt with the same arguments (a deepcache(3)
        schedule stays interval 3). Other schedules keep the MAC share nearest theirs and, for
        each kind of row (whole calls, and each pattern of partial rows), their density along
        the trajectory (halving merges pairs of adjacent segments; an early-dense schedule
        stays early-dense); whole calls are placed first, call 0 among them.
        """
        calls = _check_calls(calls)
        if calls == self.calls:
            return self
        builder = _BUILDERS.get(self.name)
        if builder is not None and self.name not in ("from_scores", "from_ranking"):
            params = dict(self.params)
            if self.name == "skip_steps" and params.get("compute") is not None:
                # explicit calls: map them proportionally
                old = params.pop("compute")
                new = sorted({min(calls - 1, round(t * (calls - 1) / max(1, self.calls - 1))) for t in old} | {0})
                params["compute"] = new
                params["count"] = None
            return builder(self.graph, calls, **params)
        return Schedule(_resized_rows(self.keep, calls, self.graph), self.graph, name=self.name,
                        params={**self.params, "resized_from": self.calls}, sampler=self.sampler)


def _requantile(computed: list[int], old: int, new: int, pin_first: bool = True, n: int | None = None) -> list[int]:
    """``n`` calls of ``new`` (default: ``len(computed) * new / old``, rounded half up) with the
    same density along the trajectory. Each computed call starts a segment that lasts until
    the next one (the last until the end); the new calls sit at the ``j / n`` quantiles of that
    segment density, then scale to the new length. Halving merges pairs of adjacent segments,
    doubling splits each in two, a uniform schedule stays uniform and an early-dense one
    early-dense. ``pin_first``: the first call is call 0 (whole calls)."""
    if n is None:
        n = math.floor(len(computed) * new / old + 0.5)
    n = max(1, min(new, n))
    ends = list(computed) + [old]
    pos = []
    for j in range(n):
        x = j * len(computed) / n
        k = int(x)
        pos.append(round((ends[k] + (x - k) * (ends[k + 1] - ends[k])) * new / old))
    out = []
    for p in pos:  # strictly increasing, then pulled back inside 0..new-1
        out.append(max(p, out[-1] + 1) if out else (0 if pin_first else min(p, new - 1)))
    for i in range(n - 1, -1, -1):
        out[i] = min(out[i], new - n + i)
    return out


def _resized_rows(keep: torch.Tensor, calls: int, graph: BlockGraph) -> torch.Tensor:
    """``keep`` for ``calls`` calls with the MAC share nearest the old one and, for each kind of
    row (whole calls, each pattern of partial rows), the same density (:func:`_requantile`).
    Counts: the combination whose MACs come nearest the old share (:func:`_nearest_counts`).
    Whole calls are placed first, call 0 among them; a row that lands on a taken call moves to
    the nearest free one."""
    old, n = keep.shape
    kinds: dict[tuple, list[int]] = {}
    for c in range(old):
        if bool(keep[c].any()):
            kinds.setdefault(tuple(keep[c].tolist()), []).append(c)
    whole = tuple([True] * n)
    cost = {k: sum(m for m, on in zip(graph.block_macs, k) if on) for k in kinds}
    target = sum(cost[k] * len(v) for k, v in kinds.items()) / old * calls  # MACs of the new rows
    count = _nearest_counts({k: len(v) * calls / old for k, v in kinds.items()}, cost, target, calls, whole)
    out = torch.zeros(calls, n, dtype=torch.bool)
    taken: set[int] = set()
    for kind in sorted(kinds, key=lambda k: (k != whole, -len(kinds[k]))):
        if not count[kind]:
            continue
        for p in _requantile(kinds[kind], old, calls, pin_first=kind == whole, n=count[kind]):
            free = [q for q in range(calls) if q not in taken]
            if not free:
                break
            q = min(free, key=lambda q: (abs(q - p), q))
            out[q] = torch.tensor(kind)
            taken.add(q)
    out[0] = True
    return out


def _nearest_counts(exact: dict, cost: dict, target: float, calls: int, whole: tuple) -> dict:
    """Row counts per kind (whole calls at least one, at most ``calls`` rows in all) whose MACs
    come nearest ``target``; then the counts nearest ``exact`` (each kind's share of the new
    calls); then more whole calls. Each count is ``exact`` rounded down or up, or one further
    (up to 6 kinds): rounding each kind on its own can miss. 9 whole calls and 3 partial rows
    of 0.28 of a call, halved: 4 + 2 or 5 + 1 are 0.36 of a call off the 4.92 the share asks
    for, 5 + 0 and 4 + 3 only 0.08; of those two, the whole calls win the tie (a partial row
    reads caches from further away once calls are fewer). Beyond 12 kinds with a fraction, the
    rest are rounded greedily."""
    lo = {k: 1 if k == whole else 0 for k in exact}
    spread = 1 if len(exact) <= 6 else 0
    options = {k: list(range(max(lo[k], math.floor(x) - spread), math.ceil(x) + spread + 1)) for k, x in exact.items()}
    open_kinds = sorted((k for k in exact if len(options[k]) > 1), key=lambda k: -cost[k])
    count = {k: options[k][0] for k in exact}
    spent0 = sum(cost[k] * count[k] for k in exact if k not in open_kinds[:12])
    for k in open_kinds[12:]:  # greedy on the tail: one more row where it brings the MACs nearer
        for _ in options[k][1:]:
            if abs(spent0 + cost[k] - target) >= abs(spent0 - target):
                break
            count[k] += 1
            spent0 += cost[k]
    unit = max(cost.values())
    best = None
    for pick in itertools.product(*(options[k] for k in open_kinds[:12])):
        trial = {**count, **dict(zip(open_kinds, pick))}
        if sum(trial.values()) > calls:
            continue
        spent = spent0 + sum(cost[k] * c for k, c in zip(open_kinds, pick))
        key = (round(abs(spent - target) / unit, 6), round(sum(abs(trial[k] - exact[k]) for k in exact), 6),
               -trial[whole])
        if best is None or key < best[0]:
            best = (key, trial)
    return best[1] if best else count


def _group_size(graph: BlockGraph) -> int:
    if graph.granularity == "coarse" and graph.blocks and graph.blocks[0].kind == "transformer_group":
        return len(graph.blocks[0].module_paths)
    return 4


# ----------------------------------------------------------------------------- builders


def full(model, calls: int, *, granularity: str = "coarse", sample_shape=None) -> Schedule:
    """Every block computes at every call: identical to the untouched model."""
    g = graph_of(model, granularity, sample_shape)
    calls = _check_calls(calls)
    return Schedule(torch.ones(calls, len(g), dtype=torch.bool), g, name="full", params={})


def _full_calls_uniform(calls: int, interval: int) -> list[int]:
    return list(range(0, calls, interval))


def _full_calls_centered(calls: int, n: int, center: int, power: float) -> list[int]:
    """``n`` full calls, dense around ``center`` and spreading out by a power law (DeepCache's
    non-uniform variant): positions ``center + sign(x)|x|^p`` for ``x`` evenly spaced in
    ``[-center^(1/p), (calls - center)^(1/p)]``; ``p`` is lowered until ``n`` are distinct."""
    if n >= calls:
        return list(range(calls))
    p = power
    while p > 1.0:
        lo, hi = -(center ** (1.0 / p)), (calls - center) ** (1.0 / p)
        xs = [lo + (hi - lo) * i / n for i in range(n + 1)]
        pos = sorted({0} | {int(center + math.copysign(abs(x) ** p, x)) for x in xs[1:-1]})
        pos = [q for q in pos if 0 <= q < calls]
        if len(pos) == n:
            return pos
        p -= 0.02
    return sorted(set(round(i * (calls - 1) / max(1, n - 1)) for i in range(n)))  # fall back to uniform


def deepcache(model, calls: int, interval: int = 3, branch: int | None = 0, *, skip: int | None = None,
              uniform: bool = True, center: int = 15, power: float = 1.4, sample_shape=None) -> Schedule:
    """DeepCache (UNets, fine graph): full calls every ``interval`` calls; at the others only
    the shallow path above the cache branch runs.

    Args:
        interval: ``N`` - one full call every ``N`` calls (uniform), or
            ``ceil(calls / N)`` full calls placed non-uniformly (``uniform=False``).
        branch: the ``DeepCache`` package's ``cache_branch_id`` (block ``branch // 3``,
            layer ``branch % 3``, whatever the UNet's layers per block).
        skip: instead of ``branch``: the skip index (keep skips ``0..skip`` fresh).
        uniform, center, power: the package pipelines' non-uniform variant - full calls
            dense around call ``center``, spread by a power law of exponent ``power``.
    """
    g = graph_of(model, "fine", sample_shape)
    calls = _check_calls(calls)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be a positive int, got {interval!r}")
    try:
        model_kind_name = g.blocks[0].deepcache
    except IndexError:  # pragma: no cover
        model_kind_name = None
    if model_kind_name is None:
        raise ValueError(f"deepcache() needs a UNet (its skip branches); {g.model_class} has none: "
                         "use fora() or skip_steps()")
    if skip is not None:
        if branch not in (None, 0):
            raise ValueError("give branch= (package numbering) or skip= (skip index), not both")
        retrieval = g.skip_keep(skip)
        branch = None
    else:
        if branch is None:
            raise ValueError("give branch= or skip=")
        retrieval = g.deepcache_keep(branch)
    if uniform:
        full_calls = _full_calls_uniform(calls, interval)
    else:
        full_calls = _full_calls_centered(calls, math.ceil(calls / interval), min(center, calls - 1), power)
    keep = torch.tensor([retrieval] * calls, dtype=torch.bool)
    keep[full_calls] = True
    return Schedule(keep, g, name="deepcache", params=dict(interval=interval, branch=branch, skip=skip,
                                                           uniform=uniform, center=center, power=power))


def _placement(calls: int, count: int, placement: str, exponent: float) -> list[int]:
    if placement == "uniform":
        pos = [math.floor(i * calls / count) for i in range(count)]
    elif placement in ("power", "early"):
        pos = [math.floor(calls * (i / count) ** exponent) for i in range(count)]
    else:
        raise ValueError(f"placement must be 'uniform' or 'power', got {placement!r}")
    out = []
    for p in pos:  # strictly increasing, within range
        p = max(p, out[-1] + 1) if out else 0
        out.append(p)
    if out[-1] >= calls:  # pragma: no cover - count <= calls guarantees room
        raise ValueError("cannot place that many calls")
    return out


def skip_steps(model, calls: int, compute: Iterable[int] | None = None, *, count: int | None = None,
               placement: str = "uniform", exponent: float = 1.5, granularity: str = "coarse",
               sample_shape=None) -> Schedule:
    """Whole-call reuse: the model runs only at the ``compute`` calls; every other call
    reuses everything (UNets: the last output, through the cascade; transformers: each
    block's cached residual on the current input).

    Give the calls explicitly (``compute=[0, 13, 19, ...]``, call 0 added if missing) or a
    ``count`` placed ``"uniform"``-ly or early-dense by a ``"power"`` law
    (``floor(calls * (i / count) ** exponent)``; exponent 1.5 beat uniform by 2.5 dB PSNR
    at 10 of 50 calls on the zoo UNet).
    """
    g = graph_of(model, granularity, sample_shape)
    calls = _check_calls(calls)
    if (compute is None) == (count is None):
        raise ValueError("give either compute= (explicit calls) or count= (how many calls compute)")
    if compute is not None:
        comp = sorted({int(t) for t in compute} | {0})
        bad = [t for t in comp if not 0 <= t < calls]
        if bad:
            raise ValueError(f"compute calls {bad} out of range 0..{calls - 1}")
        params = dict(compute=comp, count=None, placement=placement, exponent=exponent, granularity=granularity)
    else:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= calls:
            raise ValueError(f"count must be an int in 1..{calls}, got {count!r}")
        comp = _placement(calls, count, placement, exponent)
        params = dict(compute=None, count=count, placement=placement, exponent=exponent, granularity=granularity)
    keep = torch.zeros(calls, len(g), dtype=torch.bool)
    keep[comp] = True
    params.pop("granularity")
    return Schedule(keep, g, name="skip_steps", params=params)


def fora(model, calls: int, interval: int = 3, *, granularity: str = "fine", sample_shape=None) -> Schedule:
    """FORA-style reuse for transformers (DiT, PixArt): full calls every ``interval``
    calls, every transformer block reused (its cached residual) in between."""
    g = graph_of(model, granularity, sample_shape)
    calls = _check_calls(calls)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be a positive int, got {interval!r}")
    if not all(b.residual for b in g):
        raise ValueError(f"fora() reuses transformer blocks; {g.model_class} is a UNet: use deepcache() or "
                         "skip_steps()")
    keep = torch.zeros(calls, len(g), dtype=torch.bool)
    keep[_full_calls_uniform(calls, interval)] = True
    return Schedule(keep, g, name="fora", params=dict(interval=interval))


def from_scores(model, scores, target_macs: float, *, threshold: float = 0.95, step: float = 0.05,
                slack: float | None = None, granularity: str | None = None, sample_shape=None) -> Schedule:
    """DiP-GO's post-processing: reuse probabilities -> a schedule at a MAC budget.

    Args:
        scores: ``[calls, blocks]`` reuse probabilities in [0, 1] (e.g. the pruner's
            softmax for "reuse").
        target_macs: the fraction of the full model's MACs to keep (DiP-GO's prune
            ratio 0.8 is ``target_macs=0.2``).
        threshold, step: start at ``threshold``; walking the blocks from the output side,
            reuse every (call > 0, block) whose probability exceeds it (with its cascade)
            until the target is met; if it is not met, lower the threshold by ``step``.
        slack: if given, a reuse that would take the kept MACs below ``target_macs * (1 - slack)``
            is passed over (the walk goes on to the next candidate), so the schedule lands
            within ``slack`` of the target whenever some small enough reuse is left. Without
            it the last reuse may overshoot by a whole cascade (an outer block of a UNet takes
            its inner blocks with it), which breaks equal-MAC comparisons.
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    if granularity is None:
        granularity = "coarse"
    g = graph_of(model, granularity, sample_shape)
    if s.ndim != 2 or s.shape[1] != len(g) or s.shape[0] < 1:
        raise ValueError(f"scores must be [calls, {len(g)}], got {tuple(s.shape)}")
    if not bool(((s >= 0) & (s <= 1)).all()):
        raise ValueError("scores must be probabilities in [0, 1]")
    if not 0 < target_macs <= 1:
        raise ValueError(f"target_macs must be a fraction in (0, 1], got {target_macs}")
    if slack is not None and not 0 <= slack < 1:
        raise ValueError(f"slack must be a fraction in [0, 1), got {slack}")
    calls = s.shape[0]
    total = calls * g.total_macs
    floor = -1.0 if slack is None else target_macs * (1 - slack) - 1e-12
    rows = [[True] * len(g) for _ in range(calls)]
    row_macs = [g.total_macs] * calls
    spent = sum(row_macs)
    thr = threshold
    order = list(reversed(range(len(g))))  # output side first
    while spent / total > target_macs + 1e-12:
        for b in order:
            for t in range(1, calls):
                if spent / total <= target_macs + 1e-12:
                    break
                if rows[t][b] and s[t, b] > thr:
                    before = rows[t][:], row_macs[t]
                    delta = _reuse(g, rows, row_macs, t, b)
                    if (spent + delta) / total < floor:
                        rows[t], row_macs[t] = before  # overshoots the window: try a smaller one
                        continue
                    spent += delta
        if thr <= 0:
            break
        thr = round(thr - step, 10)
    return Schedule(rows, g, name="from_scores",
                    params=dict(target_macs=target_macs, threshold=threshold, step=step, slack=slack,
                                final_threshold=max(thr, 0.0)))


def _reuse(graph: BlockGraph, rows: list[list[bool]], row_macs: list[int], t: int, b: int) -> int:
    """Reuse block ``b`` at call ``t`` with its cascade, in place; returns the MACs this changes."""
    rows[t][b] = False
    rows[t] = graph.cascade(rows[t])
    new = graph.overhead_macs + sum(m for m, k in zip(graph.block_macs, rows[t]) if k)
    delta, row_macs[t] = new - row_macs[t], new
    return delta


def budget_rows(graph: BlockGraph, scores, target_macs: float) -> list[list[bool]]:
    """Keep rows meeting a MAC budget by rank: reuse the (call > 0, block) pairs in decreasing
    order of ``scores`` (ties: the output side first, then earlier calls), each with its
    cascade, until at most ``target_macs`` of the MACs are kept (or nothing is left to reuse).
    Unlike :func:`from_scores` no threshold is involved, so the budget is met to within one
    block; the budgeted training mode (:mod:`.train`) uses the same rule at every iteration."""
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    calls, n = s.shape
    total = calls * graph.total_macs
    rows = [[True] * n for _ in range(calls)]
    row_macs = [graph.total_macs] * calls
    spent = sum(row_macs)
    # candidates in the tie order, then a stable sort by decreasing score
    cand = [(t, b) for b in reversed(range(n)) for t in range(1, calls)]
    order = sorted(range(len(cand)), key=lambda i: -float(s[cand[i]]))
    for i in order:
        if spent / total <= target_macs + 1e-12:
            break
        t, b = cand[i]
        if not rows[t][b]:
            continue  # already reused by a cascade
        spent += _reuse(graph, rows, row_macs, t, b)
    return rows


def from_ranking(model, scores, target_macs: float, *, granularity: str | None = None,
                 sample_shape=None) -> Schedule:
    """A schedule at a MAC budget from ``[calls, blocks]`` reuse scores by rank
    (:func:`budget_rows`): the post-processing that matches the budgeted training mode."""
    g = graph_of(model, granularity or "coarse", sample_shape)
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.ndim != 2 or s.shape[1] != len(g) or s.shape[0] < 1:
        raise ValueError(f"scores must be [calls, {len(g)}], got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores must be finite")
    if not 0 < target_macs <= 1:
        raise ValueError(f"target_macs must be a fraction in (0, 1], got {target_macs}")
    return Schedule(budget_rows(g, s, target_macs), g, name="from_ranking", params=dict(target_macs=target_macs))


_BUILDERS = {"full": full, "deepcache": deepcache, "skip_steps": skip_steps, "fora": fora}

