"""DiP-GO efficiency section (``dipgo``): wall-clock of hand-made schedules and of the
DeepCache package on the zoo models against the full model in the same run, beside the
MAC-ideal speedup. FULL adds DiT-XL/2, SD-1.5 and the quality part.

Efficiency: the denoiser loop only (model calls + DDIM updates, classifier-free guidance
batched: batch 2 per call), 12 calls, the median of the interleaved runs, every provider of a
model interleaved run by run with the full model:
  * the zoo models at batch 20 (40 per call with guidance);
  * DiT-XL/2 (random weights) at 16x16 latents: fora(3), fora(5), skip_steps(count=4);
  * SD-1.5 architecture (random weights) at 32x32 latents: deepcache(3, 0), deepcache(5, 0)
    and skip_steps(count=4), each also with the DeepCache package (DeepCacheSDHelper) on
    the same schedule where it can express it.
MAC-ideal = total MACs / kept MACs from the fine block graph at the benchmark's input
(attention activations not counted): ``Schedule.ideal_speedup``.

Quality: every builder on the zoo models at 50 DDIM calls, guidance 3: kept-MAC fraction,
class accuracy, digits-FD, PSNR against the full model's samples from the same noise.
"""
from __future__ import annotations

import os
import statistics
import time
import types

import diffusers
import torch

from shortcut_kernels import zoo
from shortcut_kernels.chain import Chain
from shortcut_kernels.dipgo import accelerate, deepcache, fora, full, skip_steps
from shortcut_kernels.models import build_model

CALLS = 12


def run(out_dir=None, full: bool = False) -> dict:
    """The section's JSON: the zoo rows (FULL: every model, and the quality rows)."""
    doc = {"calls": CALLS, "diffusers_cache_hooks": diffusers_cache_support()}
    if full:
        doc["rows"] = efficiency(quick=False)
        doc["quality"] = quality()
    else:
        doc["rows"] = efficiency(quick=True, models=("zoo",))
    return doc


# Threads: SHORTCUT_BENCH_THREADS for everything; otherwise the torch default for the large
# architectures and 1 thread for the tiny zoo models (on a loaded 2-core box OpenMP makes
# toy-sized ops ~10x slower than one thread).
THREADS = int(os.environ["SHORTCUT_BENCH_THREADS"]) if os.environ.get("SHORTCUT_BENCH_THREADS") else None
DEFAULT_THREADS = torch.get_num_threads()


def _threads(small: bool) -> int:
    n = THREADS or (1 if small else DEFAULT_THREADS)
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- denoiser loops


def _sd_scheduler():
    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class Loop:
    """One model, its inputs and a DDIM loop of `calls` denoiser calls with batched CFG."""

    def __init__(self, name, model, calls, batch, latent_hw, guidance=3.0):
        self.name, self.model, self.calls, self.batch = name, model, calls, batch
        self.kind = type(model).__name__
        g = torch.Generator().manual_seed(0)
        c = model.config
        self.x0 = torch.randn(batch, c.in_channels, latent_hw, latent_hw, generator=g)
        self.guidance = guidance
        if self.kind == "UNet2DConditionModel":
            dim = c.cross_attention_dim
            tokens = 1 if name.startswith("zoo") else 77
            self.ctx = torch.randn(2 * batch, tokens, dim, generator=g)
        else:
            self.labels = torch.cat([torch.arange(batch) % 10, torch.full((batch,), c.num_embeds_ada_norm)])
        self.scheduler = _sd_scheduler() if not name.startswith("zoo") else \
            diffusers.DDIMScheduler.from_config(zoo.info("digits-unet")["scheduler_config"])

    @property
    def sample_shape(self):
        return (2 * self.batch,) + tuple(self.x0.shape[1:])

    def call(self, x, t):
        if self.kind == "UNet2DConditionModel":
            return self.model(x, t, encoder_hidden_states=self.ctx, return_dict=False)[0]
        eps = self.model(hidden_states=x, timestep=t.expand(x.shape[0]), class_labels=self.labels,
                         return_dict=False)[0]
        return eps[:, : x.shape[1]]  # DiT-XL/2 predicts eps and variance

    @torch.no_grad()
    def run(self):
        self.scheduler.set_timesteps(self.calls)
        chain = Chain(self.scheduler, self.guidance)

        def call(i, x_in, t):
            ec, eu = self.call(torch.cat([x_in, x_in]), t.to(x_in.device)).chunk(2)  # conditional half first
            return eu, ec

        return chain.run(chain.first_latent(self.x0), call)


def _deepcache_package(loop, interval, branch):
    """The DeepCache package's helper on the loop's UNet (shim for diffusers 0.42.1: it needs only
    ``pipe.unet``/``pipe.scheduler`` and a positional 0-d timestep; disable() leaves instance forwards)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=loop.model, scheduler=loop.scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()

    def undo():
        helper.disable()
        for m in loop.model.modules():
            m.__dict__.pop("forward", None)

    return undo


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def efficiency_case(loop, schedules, reps, package=()):
    """Interleaved timing: each rep runs full, then every schedule (ours, and the package where given)."""
    providers = ["full"] + [f"ours:{k}" for k in schedules] + [f"deepcache-package:{k}" for k in package]
    times = {p: [] for p in providers}
    outs = {}
    loop.run()  # warm-up (allocator, OpenMP)
    for _ in range(reps):
        for p in providers:
            kind, _, key = p.partition(":")
            if kind == "full":
                dt, out = _timed(loop.run)
            elif kind == "ours":
                with accelerate(loop.model, schedules[key], scheduler=loop.scheduler):
                    dt, out = _timed(loop.run)
            else:
                undo = _deepcache_package(loop, *package[key])
                try:
                    dt, out = _timed(loop.run)
                finally:
                    undo()
            times[p].append(dt)
            outs[p] = out
    med = {p: statistics.median(v) for p, v in times.items()}
    rows = []
    for key, s in schedules.items():
        ours = med[f"ours:{key}"]
        row = dict(model=loop.name, schedule=key, calls=loop.calls, batch_per_call=2 * loop.batch,
                   threads=torch.get_num_threads(), reps=reps,
                   macs_kept=s.macs_kept, mac_ideal=s.ideal_speedup, full_s=med["full"], ours_s=ours,
                   speedup=med["full"] / ours, fraction_of_ideal=(med["full"] / ours) / s.ideal_speedup,
                   # robust to a loaded machine: the least-disturbed runs, and the median of per-rep ratios
                   speedup_min=min(times["full"]) / min(times[f"ours:{key}"]),
                   speedup_paired_median=statistics.median(
                       f / o for f, o in zip(times["full"], times[f"ours:{key}"])),
                   times_full=times["full"], times_ours=times[f"ours:{key}"])
        if key in package:
            pk = med[f"deepcache-package:{key}"]
            diff = ((outs[f"ours:{key}"] - outs[f"deepcache-package:{key}"]).norm()
                    / outs[f"deepcache-package:{key}"].norm()).item()
            row.update(package_s=pk, package_speedup=med["full"] / pk, ours_over_package=ours / pk,
                       times_package=times[f"deepcache-package:{key}"], rel_diff_vs_package=diff)
        rows.append(row)
        line = (f"{loop.name:10s} {key:16s} kept {100 * s.macs_kept:5.1f}%  ideal {s.ideal_speedup:5.2f}x  "
                f"measured {row['speedup']:5.2f}x ({100 * row['fraction_of_ideal']:5.1f}% of ideal)  "
                f"full {med['full']:.3f}s ours {ours:.3f}s")
        if key in package:
            line += f"  package {row['package_s']:.3f}s (ours/package {row['ours_over_package']:.3f})"
        print(line, flush=True)
    return rows


def efficiency(quick=False, sink=None, models=("zoo", "dit-xl-2", "sd-1.5"), reps=None):
    """Zoo models first (fast), then DiT-XL/2, then SD-1.5; ``sink(rows)`` after each model.
    ``reps`` interleaved runs per provider (default 5, 2 when quick); the median is reported."""
    reps = reps or (2 if quick else 5)
    calls = CALLS
    rows = []

    def done(new):
        rows.extend(new)
        if sink is not None:
            sink(rows)

    # zoo models at batch 20
    _threads(small=True)
    if "zoo" not in models:
        m = None
    else:
        m = zoo.load("digits-unet").model.unet
    if m is not None:
        _zoo_efficiency(m, calls, reps, done)
    if quick:
        return rows
    if "dit-xl-2" in models:
        _dit_efficiency(calls, reps, done)
    if "sd-1.5" in models:
        _sd_efficiency(calls, reps, done)
    return rows


def _unet_schedules(unet, calls, shape):
    """The UNet rows of the efficiency section: DeepCache (3, 0), (5, 0), whole-call reuse."""
    return {"deepcache(3,0)": deepcache(unet, calls, 3, 0, sample_shape=shape),
            "deepcache(5,0)": deepcache(unet, calls, 5, 0, sample_shape=shape),
            "skip_steps(4)": skip_steps(unet, calls, count=4, granularity="fine", sample_shape=shape)}


def _transformer_schedules(dit, calls, shape):
    """The transformer rows: FORA 3 and 5, whole-call reuse."""
    return {"fora(3)": fora(dit, calls, 3, sample_shape=shape), "fora(5)": fora(dit, calls, 5, sample_shape=shape),
            "skip_steps(4)": skip_steps(dit, calls, count=4, granularity="fine", sample_shape=shape)}


PACKAGE_ROWS = {"deepcache(3,0)": (3, 0), "deepcache(5,0)": (5, 0)}  # the DeepCache package side by side


def _zoo_efficiency(m, calls, reps, done):
    loop = Loop("zoo-unet", m, calls, batch=20, latent_hw=16)
    done(efficiency_case(loop, _unet_schedules(m, calls, loop.sample_shape), reps, package=PACKAGE_ROWS))
    d = zoo.load("digits-dit").model.transformer
    loop = Loop("zoo-dit", d, calls, batch=20, latent_hw=16)
    done(efficiency_case(loop, _transformer_schedules(d, calls, loop.sample_shape), reps))


def _dit_efficiency(calls, reps, done):
    # DiT-XL/2 at 16x16 latents
    _threads(small=False)
    dit = build_model("dit-xl-2")
    loop = Loop("dit-xl-2", dit, calls, batch=1, latent_hw=16)
    done(efficiency_case(loop, _transformer_schedules(dit, calls, loop.sample_shape), reps))


def _sd_efficiency(calls, reps, done):
    # SD-1.5 architecture, 32x32 latents
    _threads(small=False)
    unet = build_model("sd-1.5")
    loop = Loop("sd-1.5", unet, calls, batch=1, latent_hw=32)
    done(efficiency_case(loop, _unet_schedules(unet, calls, loop.sample_shape), reps, package=PACKAGE_ROWS))


# ----------------------------------------------------------------------------- quality


def quality(quick=False, per_class=10, steps=50, seed=1234):
    per_class = 4 if quick else per_class
    _threads(small=True)
    labels = torch.arange(10).repeat_interleave(per_class)
    rows = []
    builders = {
        "digits-unet": lambda m: {
            "full": full(m, steps), "deepcache(3,0)": deepcache(m, steps, 3, 0),
            "deepcache(5,0)": deepcache(m, steps, 5, 0), "deepcache(3,5)": deepcache(m, steps, 3, 5),
            "deepcache(5,0,non-uniform)": deepcache(m, steps, 5, 0, uniform=False),
            "skip_steps(10,uniform)": skip_steps(m, steps, count=10),
            "skip_steps(10,power1.5)": skip_steps(m, steps, count=10, placement="power", exponent=1.5)},
        "digits-dit": lambda m: {
            "full": full(m, steps), "fora(3)": fora(m, steps, 3), "fora(5)": fora(m, steps, 5),
            "skip_steps(10,uniform)": skip_steps(m, steps, count=10),
            "skip_steps(10,power1.5)": skip_steps(m, steps, count=10, placement="power", exponent=1.5)},
    }
    for name, make in builders.items():
        z = zoo.load(name)
        model, cfg = z.model, z.scheduler_config
        sched = zoo.make_scheduler(cfg)
        ref = None
        for key, s in make(model).items():
            with accelerate(model, s, scheduler=sched):
                t0 = time.perf_counter()
                x = zoo.sample(model, sched, labels, steps=steps, guidance=3.0, seed=seed, progress=False)
                dt = time.perf_counter() - t0
            if ref is None:
                ref = x
            row = dict(model=name, schedule=key, calls=steps, macs_kept=s.macs_kept, ideal_speedup=s.ideal_speedup,
                       class_accuracy=zoo.metrics.class_accuracy(x, labels), digits_fd=zoo.metrics.digits_fd(x),
                       psnr_vs_full=zoo.metrics.psnr(x, ref), seconds=dt, n_samples=len(labels))
            rows.append(row)
            print(f"{name:11s} {key:26s} kept {100 * s.macs_kept:5.1f}%  acc {100 * row['class_accuracy']:5.1f}%  "
                  f"FD {row['digits_fd']:6.2f}  PSNR {row['psnr_vs_full']:6.2f} dB  ({dt:.1f}s)", flush=True)
    return rows


def diffusers_cache_support():
    """Whether diffusers' own cache hooks (enable_cache) exist on the denoiser classes we accelerate."""
    out = {}
    for cls in ("UNet2DConditionModel", "UNet2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel"):
        c = getattr(diffusers, cls)
        out[cls] = {"enable_cache": hasattr(c, "enable_cache"),
                    "CacheMixin": any(b.__name__ == "CacheMixin" for b in c.__mro__)}
    return out
