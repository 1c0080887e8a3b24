"""Latent optimisation for a reward through the sampler (SDO's first use case).

    result = optimize_latents(model_fn, scheduler, reward, x_T, OptimizeConfig(iters=30))
    result.latents      # optimised initial noise: pipe(latents=result.latents) gives result.x0
    result.history      # reward per iteration

Each iteration runs the chain from the current latent with one kept call (the config's
``chain.policy``; or a baseline: ``full``, ``draft:K``, ``alignprop``), evaluates the reward on
``x_0`` and steps on ``-reward + regularizer(latent)`` per sample: the default regulariser,
``0.01 * (||x|| - sqrt(d))^2``, keeps the latent near the shell where Gaussian noise lives, so
the sample stays a sample of the model and not an adversarial input of the reward.

The step is :class:`NormalizedAscent` by default, not Adam: Adam scales every element of the
latent to a step of the same size, including the many where the reward's gradient is faint,
which is a sign-gradient attack on the reward's classifier (its samples fool the reward and not
an independent judge). Each sample keeps the best latent it has had (``keep_best``): the reward
of every evaluated latent is exact, only its gradient takes the shortcut.

The result is always a consistent pair: ``result.x0`` is the sample of ``result.latents`` and
``result.reward`` its reward (the latent after the last step is evaluated once more). Samplers
that draw noise (DDPM, DDIM with eta > 0) draw the same noise in every iteration (from
``result.noise_seed``), so a latent's reward is a function of the latent and the best one is
reproducible: ``shortcut_sample(model_fn, scheduler, result.latents, "first",
generator=result.noise_generator(), warm_start=result.warm_start)`` gives ``result.x0``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..samplers import Plan
from .chain import WarmStart, shortcut_sample, warmup
from .config import OptimizeConfig
from .policy import Policy
from .rewards import RewardError, check_reward

__all__ = ["optimize_latents", "OptimizeResult", "NormalizedAscent", "RewardTarget", "gaussian_shell",
           "gaussian_prior", "latent_regularizer", "latent_optimizer", "clip_per_sample_"]


def gaussian_shell(x: Tensor, radius: float | Tensor | None = None) -> Tensor:
    """Per-sample ``(||x|| - radius)^2``; the default radius ``sqrt(d)`` is the shell where
    ``N(0, I)`` samples concentrate (``radius``: a float or one per sample ``[B]``)."""
    r = math.sqrt(x[0].numel()) if radius is None else radius
    return (x.flatten(1).norm(dim=1) - r) ** 2


def gaussian_prior(x: Tensor, block: int = 4, shuffles: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample penalty on the statistics i.i.d. ``N(0, 1)`` noise keeps near their expectation
    (the probability regularisation of Direct Noise Optimization, Tang et al. 2024). The shell
    only fixes the norm; a latent can keep it and still grow structure (smooth patches, stripes)
    that no Gaussian draw has, and the samples from it leave the model's distribution.

    The latent is cut into ``n`` rows of ``block`` values, in raster order (neighbours: spatial
    structure) and in ``shuffles`` random orders. For Gaussian noise ``n * ||mean of the rows||^2``
    is chi-squared with ``block`` degrees (mean ``k``, variance ``2k``) and ``n * ||C - I||_F^2``
    (``C`` the rows' second moment) has mean ``k(k+1)`` and variance about ``4k(k+1)``. Each
    statistic, standardised, is penalised beyond 3 standard deviations (squared hinge), so typical
    noise costs (almost) nothing."""
    k = int(block)
    flat = x.flatten(1)
    b, d = flat.shape
    n = d // k
    if k < 1 or n < 2:
        raise ValueError(f"block must be >= 1 and leave >= 2 rows of the latent's {d} values, got {block}")
    flat = flat[:, :n * k]
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    orders = [None] + [torch.randperm(n * k, generator=generator).to(x.device) for _ in range(shuffles)]
    total = x.new_zeros(b)
    for order in orders:
        rows = (flat if order is None else flat[:, order]).reshape(b, n, k)
        s_mean = n * rows.mean(1).pow(2).sum(1)
        s_cov = n * (rows.transpose(1, 2) @ rows / n - eye).pow(2).sum((1, 2))
        z_mean = (s_mean - k) / math.sqrt(2 * k)
        z_cov = (s_cov - k * (k + 1)) / (2 * math.sqrt(k * (k + 1)))
        total = total + torch.relu(z_mean - 3) ** 2 + torch.relu(z_cov - 3) ** 2
    return total / len(orders)


def clip_per_sample_(grad: Tensor, max_norm: float) -> Tensor:
    """Scale each sample's gradient down to norm ``max_norm`` at most (in place)."""
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad.mul_((max_norm / norms).clamp(max=1.0).view(-1, *([1] * (grad.dim() - 1))))


class NormalizedAscent(torch.optim.Optimizer):
    """Per-sample normalised gradient steps with heavy-ball momentum, for latents ``[B, ...]``.

    Each sample's gradient (a slice along dim 0) is scaled to the norm ``sqrt(d)`` of unit
    Gaussian noise of its size, so ``lr`` is the step as a fraction of the noise's norm, the
    same for every sample whatever the scale of its reward; then ``buf = momentum * buf + g``
    and ``x -= lr * buf`` (it minimises, as every torch optimiser). Within a sample the step
    follows the gradient's direction: the directions the reward is most sensitive to move
    most, unlike Adam's per-element scaling (docs/sdo.md compares the two).
    """

    def __init__(self, params, lr: float = 0.2, momentum: float = 0.5):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"lr must be > 0 and momentum in [0, 1), got lr={lr}, momentum={momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = torch.enable_grad()(closure)() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.flatten(1)
                g = g * (math.sqrt(g.shape[1]) / g.norm(dim=1, keepdim=True).clamp_min(1e-30))
                state = self.state[p]
                buf = state.get("momentum_buffer")
                buf = g.clone() if buf is None else buf.mul_(group["momentum"]).add_(g)
                state["momentum_buffer"] = buf
                p.add_(buf.view_as(p), alpha=-group["lr"])
        return loss


@dataclass
class OptimizeResult:
    latents: Tensor                 # optimised latent (x_T, or the warm-start latent)
    x0: Tensor | None               # the sample of ``latents`` (keep_best: each sample's best)
    history: list = field(default_factory=list)  # per iteration: reward mean/per sample, seconds
    stopped_early: bool = False
    warm_start: WarmStart | None = None
    reward: Tensor | None = None    # the reward of ``x0`` per sample
    noise_seed: int | None = None   # the chains' noise (DDPM, DDIM eta > 0): the same every iteration

    @property
    def rewards(self) -> list[float]:
        return [h["reward_mean"] for h in self.history]

    def noise_generator(self) -> torch.Generator | None:
        """A generator that draws the run's chain noise again (None when the sampler draws
        none): ``shortcut_sample(model_fn, scheduler, result.latents, "first", generator=
        result.noise_generator(), warm_start=result.warm_start)`` gives ``result.x0``. Give a
        policy that draws nothing from the generator (``first``, ``fixed:k``, ``full``)."""
        return None if self.noise_seed is None else torch.Generator().manual_seed(self.noise_seed)


@dataclass(frozen=True)
class RewardTarget:
    """A stopping rule: stop once a ``fraction`` of the samples has reward >= ``value``.

    freeze: a sample whose latent reaches ``value`` keeps that latent (no further steps for it).
        Use it to stop at the reward real data gets: pushed past it, the samples leave the
        real data's features (docs/sdo.md). Alone, with a plain classifier reward, freezing
        leaves more samples that only the reward accepts.
    """

    value: float
    fraction: float = 1.0
    freeze: bool = False

    def reached(self, reward: Tensor) -> Tensor:
        return reward >= self.value

    def done(self, reward: Tensor) -> bool:
        return float(self.reached(reward).float().mean()) >= self.fraction


def latent_regularizer(shell: float = 0.01, prior: float = 0.0):
    """``regularizer(latent, generator) -> [B]``: ``shell * gaussian_shell + prior *
    gaussian_prior`` (None when both weights are 0)."""
    if not shell and not prior:
        return None

    def regularizer(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        penalty = shell * gaussian_shell(x)
        return penalty + prior * gaussian_prior(x, generator=generator) if prior else penalty
    return regularizer


def latent_optimizer(name: str = "normalized", lr: float | None = None, momentum: float = 0.5,
                     betas: tuple[float, float] = (0.9, 0.9)) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """``optimizer(params)`` for ``optimize_latents``: ``normalized`` (:class:`NormalizedAscent`,
    lr 0.2 by default) or ``adam`` (lr 0.25 by default)."""
    if name == "normalized":
        return lambda params: NormalizedAscent(params, lr=0.2 if lr is None else lr, momentum=momentum)
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=0.25 if lr is None else lr, betas=betas)
    raise ValueError(f"optimizer must be 'normalized' or 'adam', got {name!r}")


def optimize_latents(
    model_fn: Callable,
    scheduler,
    reward: Callable,
    x_T: Tensor,
    config: OptimizeConfig | None = None,
    *,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    regularizer: Callable[[Tensor, torch.Generator | None], Tensor] | None = latent_regularizer(),
    stop: RewardTarget | None = None,
    progress: bool = True,
    callback: Callable[[dict], bool | None] | None = None,
) -> OptimizeResult:
    """Optimise ``x_T`` (unit Gaussian noise ``[B, ...]``, never modified in place) so that the
    sample maximises ``reward(x0) -> [B]``.

    config: :class:`~shortcut_kernels.sdo.config.OptimizeConfig` (iterations, learning-rate
        decay, keep-best, projection, warm-up calls, clipping, seed, time budget) with the
        chains' :class:`~shortcut_kernels.sdo.config.ChainConfig` (policy, guidance, ...).
    optimizer: ``optimizer([latent]) -> torch.optim.Optimizer`` (default
        ``latent_optimizer()``: :class:`NormalizedAscent` at lr 0.2; ``latent_optimizer("adam")``
        or any factory such as ``lambda p: torch.optim.SGD(p, lr=0.1)``).
    regularizer: ``regularizer(latent, generator) -> [B]``, added to ``-reward`` (default
        ``latent_regularizer()``: ``0.01 * gaussian_shell``; its ``prior`` weight adds
        ``gaussian_prior``, which keeps the latent's statistics typical of Gaussian noise);
        None: no regulariser. It judges the latent as unit noise: with ``warmup_calls`` it
        gets the latent divided by its starting scale (starting norm / sqrt(d), per sample),
        as the warm-started latent's norm is about ``sigma * sqrt(d)``, not ``sqrt(d)``.
    stop: a :class:`RewardTarget` (stop once enough samples reach a reward, optionally
        freezing those that do).
    callback: called with each iteration's record; returning True stops.
    Returns an :class:`OptimizeResult`: ``latents`` with their sample ``x0`` and its ``reward``
    (keep_best: each sample's best evaluated latent; else the latent after the last step,
    evaluated once more), and ``noise_generator()`` to sample them again.
    Raises ``RewardError`` (a ValueError; ``.result`` holds the state so far) when the reward
    returns the wrong shape or non-finite values; the latent is not updated with them.
    """
    cfg = config or OptimizeConfig()
    chain = cfg.chain
    if not callable(reward):
        raise TypeError(f"reward must be callable x0 -> [B], got {type(reward).__name__}")
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point():
        raise TypeError("x_T must be a floating-point tensor [B, ...]")
    plan = Plan(scheduler, chain.eta)
    gen = torch.Generator().manual_seed(int(cfg.seed)) if cfg.seed is not None else None
    warm = None
    latent = x_T.detach().clone()
    if cfg.warmup_calls:
        warm = warmup(model_fn, scheduler, latent, cfg.warmup_calls, chain, generator=gen, plan=plan)
        latent = warm.x.detach().clone()
    norms0 = latent.flatten(1).norm(dim=1).view(-1, *([1] * (latent.dim() - 1)))
    # the regulariser judges unit noise: a warm start's latent (sigma-scaled, the image in it) in
    # units of its starting scale, so that the shell sits where the latent starts
    unit = norms0 / math.sqrt(latent[0].numel()) if warm is not None else None
    first_call = 0 if warm is None else warm.index
    probs = plan.importance(first_call) if chain.policy.importance else None
    latent.requires_grad_(True)
    opt = (optimizer or latent_optimizer())([latent])
    lr = [group["lr"] for group in opt.param_groups]
    scaler = chain.loss_scaler(latent.device)
    result = OptimizeResult(latent.detach(), None, [], False, warm, noise_seed=_noise_seed(plan, gen))
    best = None  # (reward, latent, x0) per sample
    stepped = False  # the latent moved since it was last evaluated
    start = time.perf_counter()
    bar = tqdm(range(cfg.iters), desc=f"optimize_latents ({chain.policy})", disable=not progress)
    for it in bar:
        # the same policy draws each iteration would freeze a random policy: draw anew (the
        # chain's generator draws only its noise, the same each iteration)
        run_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=gen))) if gen else None
        policy = _iteration_policy(chain.policy, first_call, plan, latent.shape[0], run_gen, probs)
        x0 = shortcut_sample(model_fn, scheduler, latent, chain.with_policy(policy),
                             generator=result.noise_generator(), warm_start=warm, plan=plan)
        r = _checked_reward(reward, x0, result)
        loss = -r.sum()
        if regularizer is not None:
            loss = loss + regularizer(latent if unit is None else latent / unit, run_gen).sum()
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if cfg.grad_clip is not None:
            clip_per_sample_(latent.grad, cfg.grad_clip)
        rd = r.detach()
        best = _record(result, best, cfg.keep_best, latent.detach().clone(), x0.detach(), rd)
        stepped = False
        entry = {"iter": it, "reward_mean": float(rd.mean()), "reward": rd.cpu().tolist(),
                 "seconds": time.perf_counter() - start}
        if stop is not None:
            entry["fraction_reached"] = float(stop.reached(rd).float().mean())
        result.history.append(entry)
        asked_to_stop = bool(callback(entry)) if callback else False
        bar.set_postfix(reward=f"{entry['reward_mean']:.3f}")
        if stop is not None and stop.done(rd):  # the evaluated latent already reaches the target: keep it
            result.stopped_early = True
            break
        for group, lr0 in zip(opt.param_groups, lr):  # cosine from lr to decay_to * lr
            group["lr"] = lr0 * (cfg.decay_to + (1 - cfg.decay_to) * 0.5 * (1 + math.cos(math.pi * it / cfg.iters)))
        frozen = stop.reached(rd) if (stop is not None and stop.freeze) else None
        before = latent.detach().clone() if frozen is not None and bool(frozen.any()) else None
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if cfg.project:
            with torch.no_grad():
                latent.mul_(norms0 / latent.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(norms0))
        if before is not None:
            with torch.no_grad():
                latent[frozen] = before[frozen]
        stepped = True
        if asked_to_stop or (cfg.time_budget is not None and time.perf_counter() - start >= cfg.time_budget):
            result.stopped_early = True
            break
    bar.close()
    if stepped:  # the latent after the last step: its own sample, so that the result is one pair
        final = latent.detach().clone()
        with torch.no_grad():
            x0 = shortcut_sample(model_fn, scheduler, final, chain.with_policy("first"),
                                 generator=result.noise_generator(), warm_start=warm, plan=plan)
            _record(result, best, cfg.keep_best, final, x0, _checked_reward(reward, x0, result))
    return result


def _noise_seed(plan: Plan, gen: torch.Generator | None) -> int | None:
    """The seed of the chains' noise, or None for a sampler that draws none. Every iteration
    draws the same noise: a latent's reward is then a function of the latent alone, and the
    best latent's reward is reproducible."""
    if not plan.needs_noise:
        return None
    return int(torch.randint(0, 2**62, (), generator=gen))


def _iteration_policy(policy: Policy, first_call: int, plan: Plan, batch: int, run_gen, probs) -> Policy:
    """One iteration's policy with its random draws made here from ``run_gen``, so that the
    chain's own generator draws nothing but the noise: the kept calls of ``random`` /
    ``per-sample`` (and their importance weights), alignprop's truncation."""
    if policy.kind in ("random", "per-sample"):
        kept = policy.kept_calls(first_call, plan.n, batch, run_gen, probs)
        return Policy.given(kept, policy.grad_weights(kept, first_call, probs))
    if policy.kind == "alignprop":
        return Policy("draft", int(policy.kept_calls(first_call, plan.n, batch, run_gen).numel()))
    return policy


def _checked_reward(reward: Callable, x0: Tensor, result: OptimizeResult) -> Tensor:
    try:
        return check_reward(reward(x0), x0.shape[0])
    except RewardError as err:
        err.result = result  # the state before this evaluation; the latent is untouched
        raise


def _record(result: OptimizeResult, best, keep_best: bool, latent: Tensor, x0: Tensor, reward: Tensor):
    """Put an evaluated (latent, sample, reward) in ``result`` (keep_best: per sample, the best
    so far) and return the best-so-far state."""
    if keep_best:
        best = _keep_better(best, reward, latent, x0)
        latent, x0, reward = best[1], best[2], best[0]
    result.latents, result.x0, result.reward = latent.clone(), x0.clone(), reward.clone()
    return best


def _keep_better(best, reward: Tensor, latent: Tensor, x0: Tensor):
    """Per sample, the (reward, latent, x0) with the higher reward: ``best`` updated in place."""
    if best is None:
        return reward.clone(), latent.clone(), x0.clone()
    better = reward > best[0]
    best[0][better], best[1][better], best[2][better] = reward[better], latent[better], x0[better]
    return best
