"""DiP-GO's pruner network: one [reuse, keep] decision per (denoiser call, block).

    queries [calls*blocks, dim]  (learnable, one per decision)
      -> a small transformer encoder (self-attention lets decisions see each other)
      -> one batched MLP head, its own weights per (call, block)   dim -> hidden -> hidden -> 2
      -> logits [calls, blocks, 2] = [reuse, keep]

Straight-through hard gates (``hard - soft.detach() + soft``, Gumbel noise optional) give
exact 0/1 decisions in the forward pass and the softmax gradient in the backward pass.
The last layer starts at zero weights and bias [0, 1], so training starts from "keep
everything"; call 0 always computes (there is no cache yet).

Two fixes against the reference code: the T*N heads are one batched einsum instead of T*N
modules, and the encoder's attention output is used (the reference discards it).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import BlockGraph
from .postprocess import budget_rows, from_ranking, from_scores

__all__ = ["Pruner", "straight_through"]


def straight_through(logits: Tensor, gumbel_tau: float | None = None) -> Tensor:
    """Hard one-hot of ``logits[..., 2]`` in the forward pass, softmax gradient backward.

    ``gumbel_tau``: add Gumbel noise and use that temperature (None: no noise, as the
    published method). Returns the keep gate ``[...]`` (1 = compute, 0 = reuse).
    """
    if gumbel_tau is not None:
        return F.gumbel_softmax(logits, tau=gumbel_tau, hard=True)[..., 1]
    soft = logits.softmax(-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 1]


class _BatchedMLP(nn.Module):
    """``pairs`` independent MLPs evaluated as one einsum per layer."""

    def __init__(self, pairs: int, sizes: Sequence[int]):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init, per pair
            self.weights.append(nn.Parameter(torch.empty(pairs, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(pairs, fan_out).uniform_(-bound, bound)))

    def forward(self, x: Tensor) -> Tensor:  # x: [pairs, in]
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.einsum("pi,pio->po", x, w) + b
            if i < last:
                x = F.gelu(x)
        return x


class Pruner(nn.Module):
    """Learnable gates for a ``calls x blocks`` schedule.

    Args:
        calls: denoiser calls of one sampling run (steps for one-call-per-step samplers).
        blocks: prunable blocks (``len(block_graph(model, granularity))``).
        dim: width of the queries and the encoder (the paper: 512; the zoo models need far
            less).
        hidden: width of the per-(call, block) heads (the paper: 128).
        heads, layers: of the transformer encoder (the paper: one layer).
        block_names, model_class, granularity: what the pruner was built for; recorded in
            its state so that a pruner trained on one model refuses another
            (:meth:`check_compatible`).
    """

    def __init__(self, calls: int, blocks: int, *, dim: int = 128, hidden: int = 64, heads: int = 4,
                 layers: int = 1, block_names: Sequence[str] | None = None, model_class: str = "",
                 granularity: str = "", graph=None):
        super().__init__()
        if calls < 1 or blocks < 1:
            raise ValueError(f"calls and blocks must be >= 1, got calls={calls}, blocks={blocks}")
        if block_names is not None and len(block_names) != blocks:
            raise ValueError(f"block_names has {len(block_names)} names for {blocks} blocks")
        self.calls, self.blocks = int(calls), int(blocks)
        self.block_names = list(block_names) if block_names is not None else None
        self.model_class, self.granularity = model_class, granularity
        self.graph = graph  # the BlockGraph it was built for (kept in its state: schedules need it)
        self.queries = nn.Parameter(torch.randn(calls * blocks, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = _BatchedMLP(calls * blocks, [dim, hidden, hidden, 2])
        with torch.no_grad():  # start from "keep everything"
            self.head.weights[-1].zero_()
            self.head.biases[-1].copy_(torch.tensor([0.0, 1.0]).expand(calls * blocks, 2))

    @classmethod
    def for_graph(cls, graph, calls: int, **kw) -> "Pruner":
        """A pruner for the blocks of a :class:`~shortcut_kernels.models.BlockGraph`."""
        return cls(calls, len(graph), block_names=graph.names, model_class=graph.model_class,
                   granularity=graph.granularity, graph=graph, **kw)

    @classmethod
    def from_schedule(cls, schedule, margin: float = 1.0, **kw) -> "Pruner":
        """A pruner that starts from ``schedule`` instead of "keep everything": its keep logits
        are ``+margin`` where the schedule computes and ``-margin`` where it reuses, so a
        budgeted training run at the schedule's MACs starts exactly at the schedule and the
        gradient only has to find better swaps (a hand-made schedule as the starting point)."""
        p = cls.for_graph(schedule.graph, schedule.calls, **kw)
        keep = torch.as_tensor(schedule.keep, dtype=torch.float32).reshape(-1)
        with torch.no_grad():
            p.head.biases[-1][:, 0].zero_()
            p.head.biases[-1][:, 1].copy_(margin * (2 * keep - 1))
        return p

    def logits(self) -> Tensor:
        """``[calls, blocks, 2]`` logits [reuse, keep]."""
        h = self.encoder(self.queries.unsqueeze(0)).squeeze(0)
        return self.head(h).view(self.calls, self.blocks, 2)

    def keep_probs(self) -> Tensor:
        """``[calls, blocks]`` probability of computing; call 0 is 1."""
        p = self.logits().softmax(-1)[..., 1]
        return torch.cat([torch.ones_like(p[:1]), p[1:]], 0)

    def forward(self, gumbel_tau: float | None = None) -> Tensor:
        """``[calls, blocks]`` straight-through hard keep gates (call 0 always 1)."""
        g = straight_through(self.logits(), gumbel_tau)
        return torch.cat([torch.ones_like(g[:1]), g[1:]], 0)

    @torch.no_grad()
    def reuse_scores(self) -> Tensor:
        """``[calls, blocks]`` reuse probabilities, what DiP-GO's post-processing ranks."""
        return 1 - self.keep_probs()

    def to_schedule(self, target_macs: float, *, ranked: bool = False, **kw):
        """DiP-GO's post-processing of this pruner's reuse probabilities into a
        :class:`~shortcut_kernels.dipgo.Schedule` keeping ``target_macs`` of the MACs
        (:func:`~shortcut_kernels.dipgo.from_scores`; ``kw``: its threshold options), or with
        ``ranked`` by rank (:func:`~shortcut_kernels.dipgo.from_ranking`, the rule the
        budgeted training mode trains with; ``kw``: its ``slack``)."""
        if self.graph is None:
            raise ValueError("this pruner does not know its block graph: build it with Pruner.for_graph()")
        if ranked:
            return from_ranking(self.graph, self.reuse_scores(), target_macs, **kw)
        return from_scores(self.graph, self.reuse_scores(), target_macs, **kw)

    def budget_gates(self, target_macs: float, slack: float | None = None) -> Tensor:
        """``[calls, blocks]`` straight-through gates that meet a MAC budget: the forward value
        is the ranked keep-mask (:func:`~shortcut_kernels.dipgo.postprocess.budget_rows` of the
        reuse probabilities, ``slack`` its window), the gradient that of the keep probabilities."""
        if self.graph is None:
            raise ValueError("this pruner does not know its block graph: build it with Pruner.for_graph()")
        soft = self.keep_probs()
        hard = torch.tensor(budget_rows(self.graph, 1 - soft.detach(), target_macs, slack), dtype=soft.dtype)
        return hard - soft.detach() + soft

    # ---- identity ---------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"calls": self.calls, "blocks": self.blocks, "block_names": self.block_names,
                "model_class": self.model_class, "granularity": self.granularity,
                "graph": self.graph.to_dict() if self.graph is not None else None}

    def set_extra_state(self, state: dict) -> None:
        if (state["calls"], state["blocks"]) != (self.calls, self.blocks):
            raise ValueError(f"pruner state is for {state['calls']} calls x {state['blocks']} blocks, "
                             f"this pruner has {self.calls} x {self.blocks}")
        self.block_names, self.model_class = state["block_names"], state["model_class"]
        self.granularity = state["granularity"]
        if state.get("graph") is not None:
            self.graph = BlockGraph.from_dict(state["graph"])

    def check_compatible(self, graph, calls: int | None = None) -> None:
        """ValueError naming the mismatch when ``graph`` is not the model this pruner is for."""
        problems = []
        if self.model_class and graph.model_class != self.model_class:
            problems.append(f"model class {graph.model_class} != {self.model_class}")
        if self.granularity and graph.granularity != self.granularity:
            problems.append(f"granularity {graph.granularity!r} != {self.granularity!r}")
        if len(graph) != self.blocks:
            problems.append(f"{len(graph)} blocks != {self.blocks}")
        elif self.block_names is not None and list(graph.names) != self.block_names:
            diff = next(i for i, (a, b) in enumerate(zip(graph.names, self.block_names)) if a != b)
            problems.append(f"block {diff} is {graph.names[diff]!r}, the pruner's is {self.block_names[diff]!r}")
        if calls is not None and calls != self.calls:
            problems.append(f"{calls} calls != {self.calls}")
        if problems:
            raise ValueError("pruner does not match this model: " + "; ".join(problems))
