"""Which denoiser calls keep their autograd graph.

SDO policies keep exactly one call per sample:
  ``first``       the first call of the (re-run) chain: the published code;
  ``fixed:k``     call k (an index into ``scheduler.timesteps``; negative counts from the end;
                  ``shortcut_sample`` refuses a call the final sample does not depend on);
  ``random``      one call drawn uniformly per run (from ``generator``);
  ``per-sample``  one uniform call per sample of the batch (each sample its own);
  ``random:importance`` / ``per-sample:importance``
                  the same draws with call k drawn with probability p_k proportional to
                  |dx_0/d eps_k| (``Plan.importance``: the one call-dependent scalar the shortcut
                  gradient carries, and the reason early calls' gradients are up to ~100x the late
                  ones'), the kept call's gradient multiplied by 1/(n p_k): the same expected
                  gradient as the uniform draw, with far less variance between runs;
  a list/tensor of ints: the kept call of each sample, given (``explicit``; optional per-sample
  gradient ``weights``).
Baselines keep several calls (same API, for like-with-like comparisons):
  ``full``        every call (per-call activation checkpointing): the exact gradient;
  ``draft:K``     the last K calls (DRaFT-K);
  ``alignprop``   the last K calls, K uniform in 1..n per run (AlignProp's random truncation).
In every policy the sampler updates stay differentiable, so the gradient also reaches the
initial latent through the linear chain (DRaFT and AlignProp proper stop it there; for weight
gradients the two are the same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Policy", "parse_policy", "SDO_POLICIES", "BASELINES"]

SDO_POLICIES = ("first", "fixed:k", "random", "per-sample", "random:importance", "per-sample:importance")
BASELINES = ("full", "draft:K", "alignprop")


@dataclass(frozen=True)
class Policy:
    kind: str  # first | fixed | random | per-sample | explicit | full | draft | alignprop
    arg: int | None = None
    calls: tuple[int, ...] | None = None  # explicit: the kept call of each sample
    importance: bool = False  # random / per-sample: calls drawn from Plan.importance, gradients reweighted
    weights: tuple[float, ...] | None = None  # explicit: each sample's kept-gradient multiplier

    def __post_init__(self):
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"policy: gradient weights must be finite, got {list(self.weights)}")

    @property
    def one_call(self) -> bool:
        """Exactly one kept call per sample: the SDO shortcut (memory-light path possible)."""
        return self.kind in ("first", "fixed", "random", "per-sample", "explicit")

    def __str__(self) -> str:
        if self.kind == "explicit":
            return f"explicit{list(self.calls)}"
        if self.importance:
            return f"{self.kind}:importance"
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"

    def kept_calls(self, start: int, n: int, batch: int, generator: torch.Generator | None,
                   probs: torch.Tensor | None = None) -> torch.Tensor:
        """Kept call per sample ``[B]`` (one-call policies) or the kept set as a sorted 1-d tensor
        (baselines), for a chain running calls ``start..n-1``. Importance policies draw call k
        with probability ``probs[k]`` (``Plan.importance(start)``)."""
        calls = n - start
        if calls < 1:
            raise ValueError(f"no calls to run: start={start} with {n} calls")
        if self.importance:
            if probs is None or probs.numel() != n:
                raise ValueError(f"policy '{self}' needs the chain's call probabilities (Plan.importance)")
            draws = 1 if self.kind == "random" else batch
            ks = torch.multinomial(probs.double(), draws, replacement=True, generator=generator)
            return ks.expand(batch).clone() if self.kind == "random" else ks
        if self.kind == "first":
            return torch.full((batch,), start, dtype=torch.long)
        if self.kind == "fixed":
            k = self.arg + n if self.arg < 0 else self.arg
            if not start <= k < n:
                raise ValueError(f"policy 'fixed:{self.arg}': kept call out of range; the chain runs calls "
                                 f"{start}..{n - 1}")
            return torch.full((batch,), k, dtype=torch.long)
        if self.kind == "random":
            k = start + int(torch.randint(calls, (), generator=generator))
            return torch.full((batch,), k, dtype=torch.long)
        if self.kind == "per-sample":
            return start + torch.randint(calls, (batch,), generator=generator)
        if self.kind == "explicit":
            ks = torch.tensor(self.calls, dtype=torch.long)
            if ks.numel() != batch:
                raise ValueError(f"policy: {ks.numel()} kept calls given for a batch of {batch}")
            if self.weights is not None and len(self.weights) != batch:
                raise ValueError(f"policy: {len(self.weights)} gradient weights given for a batch of {batch}")
            if bool(((ks < start) | (ks >= n)).any()):
                raise ValueError(f"policy: kept call out of range {start}..{n - 1}: {ks.tolist()}")
            return ks
        if self.kind == "full":
            return torch.arange(start, n)
        if self.kind == "draft":
            if not 1 <= self.arg <= calls:
                raise ValueError(f"policy 'draft:{self.arg}': K must lie in 1..{calls} (the calls run)")
            return torch.arange(n - self.arg, n)
        # alignprop
        k = 1 + int(torch.randint(calls, (), generator=generator))
        return torch.arange(n - k, n)

    def grad_weights(self, kept: torch.Tensor, start: int, probs: torch.Tensor | None) -> torch.Tensor | None:
        """Each sample's multiplier on its kept call's gradient ``[B]`` (float64), or None (1):
        1/((n - start) p_k) for importance draws, so that their expectation is the uniform one's."""
        if self.kind == "explicit" and self.weights is not None:
            return torch.tensor(self.weights, dtype=torch.float64)
        if not self.importance:
            return None
        return 1.0 / ((probs.numel() - start) * probs.double()[kept])

    @staticmethod
    def given(kept: torch.Tensor, weights: torch.Tensor | None = None) -> "Policy":
        """The explicit policy of these kept calls (and gradient weights): a run's draw, handed
        on (``finetune`` draws the global batch's calls once and gives each rank its slice)."""
        return Policy("explicit", calls=tuple(int(k) for k in kept.tolist()),
                      weights=None if weights is None else tuple(float(w) for w in weights.tolist()))


def parse_policy(policy) -> Policy:
    """A Policy from its name (see the module docstring) or a Policy."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (torch.Tensor, list, tuple)):  # one kept call per sample, given
        calls = torch.as_tensor(policy).flatten()
        if calls.is_floating_point() or calls.numel() == 0:
            raise ValueError("policy given as calls must be a non-empty list/tensor of ints (one per sample)")
        return Policy("explicit", calls=tuple(int(c) for c in calls.tolist()))
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a string such as 'first' or 'fixed:3', got {type(policy).__name__}")
    name, _, arg = policy.strip().lower().partition(":")
    if name in ("random", "per-sample") and arg:
        if arg != "importance":
            raise ValueError(f"policy {policy!r}: {name!r} takes no argument or ':importance'")
        return Policy(name, importance=True)
    if name in ("first", "random", "per-sample", "full", "alignprop"):
        if arg:
            raise ValueError(f"policy {policy!r}: {name!r} takes no argument")
        return Policy(name)
    if name in ("fixed", "draft"):
        try:
            value = int(arg)
        except ValueError:
            raise ValueError(f"policy {policy!r}: expected '{name}:<int>'") from None
        return Policy(name, value)
    raise ValueError(f"unknown policy {policy!r}; valid: {', '.join(SDO_POLICIES + BASELINES)}")
