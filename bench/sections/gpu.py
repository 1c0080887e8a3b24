"""GPU section (runs only where torch.cuda.is_available()): the real architectures from the
bundled configs with random weights, 50 DDIM calls with batched classifier-free guidance.

- schedules: SD-1.5, SDXL and DiT-XL/2 in fp16, the full model against `deepcache` / `fora`
  and `skip_steps` schedules, wall-clock beside the MAC-ideal speedup; the `DeepCache`
  package's own helper on the same UNet and noise where it is installed (its output is
  compared with ours).
- sdo: the cost of one gradient of a reward on the final latent w.r.t. the initial noise,
  SD-1.5 in bf16, batch 1, 512x512: `full` (every call checkpointed) against the memory-light
  shortcut, plain and with its no-grad chain through a `deepcache` schedule; seconds and peak
  GPU memory per iteration. The reward is linear in the latent: a VAE decode and a reward
  model would add the same cost to every method.
- compile: torch.compile of the full model and of a schedule (one graph per keep-pattern),
  only when the time left allows it; with FULL also Inductor's CUDA-graph mode
  (reduce-overhead).

The op roofline (GB/s against a copy of the same bytes in the same run) is the ops section,
which keeps the copy rows on a GPU. SHORTCUT_BENCH_DEADLINE (Unix time) makes the parts that
would not finish by then record a note instead of running: a GPU lease is short. Without FULL
the section also stops starting parts BUDGET_S after it began (the GPU suite's 10 minutes). Each part's
rows are written to gpu.partial.json as soon as they exist. SHORTCUT_GPU_PARTS (a comma list
of PART_SECONDS' names, e.g. ``compile,cuda-graphs``) runs those parts only, in that order: a
lease can go first to what has never run. On a CPU it returns a note.
"""
from __future__ import annotations

import json
import os
import statistics
import time
import traceback

import torch
from tqdm import tqdm

from .sdo import PLAIN_FULL

CALLS = 50
GUIDANCE = 7.5
# name: (latent side, timed runs of each variant)
MODELS = {"sd-1.5": (64, 3), "sdxl": (128, 2), "dit-xl-2": (32, 3)}
# the seconds each part needs on an H200 (estimates, with margin), in the order they run
PART_SECONDS = {"sdo": 60, "sd-1.5": 40, "dit-xl-2": 30, "sdxl": 80, "compile": 240, "cuda-graphs": 300}
# `make bench` (not FULL): no part starts later than this after the section began, so that the
# GPU suite stays within its 10 minutes with the op roofline (the parts above take 450 s on an H200)
BUDGET_S = 500
SDO_CHAINS = ((3, 0), (5, 0))


def seconds_left(deadline: float | None = None) -> float:
    """Seconds to the earlier of SHORTCUT_BENCH_DEADLINE and ``deadline`` (Unix times)."""
    env = os.environ.get("SHORTCUT_BENCH_DEADLINE")
    ends = ([float(env)] if env else []) + ([deadline] if deadline is not None else [])
    return min(ends) - time.time() if ends else float("inf")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _is_unet(model) -> bool:
    return type(getattr(model, "_orig_mod", model)).__name__.startswith("UNet")  # compiled too


def _scheduler():
    import diffusers

    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def conditioning(model, batch: int, generator, device, dtype) -> dict:
    """Random conditioning of one CFG-batched call (``2 * batch`` rows: uncond | cond)."""
    c = model.config
    if not _is_unet(model):  # DiT: class labels, the null class first
        null, label = c.num_embeds_ada_norm, 7
        return {"class_labels": torch.tensor([null] * batch + [label] * batch, device=device)}
    rows = 2 * batch
    cond = {"encoder_hidden_states": torch.randn(rows, 77, c.cross_attention_dim, generator=generator,
                                                 device=device, dtype=dtype)}
    if c.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and the size/crop ids
        text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        side = 8 * c.sample_size
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, text_dim, generator=generator, device=device, dtype=dtype),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * rows, device=device, dtype=dtype)}
    return cond


def call(model, xx, t, cond):
    """One denoiser call on the CFG-batched latent; returns eps (DiT's variance half dropped)."""
    if _is_unet(model):  # t positional: the DeepCache package reads it from args[1]
        return model(xx, t, **cond, return_dict=False)[0]
    return model(hidden_states=xx, timestep=t.expand(xx.shape[0]), **cond, return_dict=False)[0][:, : xx.shape[1]]


def denoise(model, scheduler, x_T, cond, calls: int = CALLS):
    """One sampling run: CFG batched (uncond | cond halves), DDIM updates (the library's chain)."""
    from shortcut_kernels.chain import Chain

    scheduler.set_timesteps(calls, device=x_T.device)
    chain = Chain(scheduler, GUIDANCE)
    return chain.run(chain.first_latent(x_T),
                     lambda i, x_in, t: call(model, torch.cat([x_in, x_in]), t.to(x_in.device), cond).chunk(2))


def schedules(name: str, calls: int, shape, overrides=None) -> dict:
    """Built on a meta-device copy: the block graph and MACs need no weights."""
    from shortcut_kernels.dipgo import deepcache, fora, skip_steps
    from shortcut_kernels.models import build_model

    meta = build_model(name, device="meta", overrides=overrides)
    if _is_unet(meta):
        rows = {f"deepcache({n},0)": deepcache(meta, calls, n, 0, sample_shape=shape) for n in (3, 5)}
    else:
        rows = {f"fora({n})": fora(meta, calls, n, sample_shape=shape) for n in (3, 5)}
    rows["skip_steps(10,power1.5)"] = skip_steps(meta, calls, count=min(10, calls // 2), placement="power",
                                                 exponent=1.5, granularity="fine", sample_shape=shape)
    return rows


def _sampling_setup(name: str, latent: int, dtype, dev, overrides):
    """The model with random weights, one sample's noise and the CFG-batched conditioning."""
    from shortcut_kernels.models import build_model

    model = build_model(name, dtype=dtype, device=dev, overrides=overrides).eval()
    c = model.config
    g = torch.Generator(device=dev).manual_seed(0)
    x_T = torch.randn(1, c.in_channels, latent, latent, generator=g, device=dev, dtype=dtype)
    return model, x_T, conditioning(model, 1, g, dev, dtype)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def model_rows(name: str, latent: int, reps: int, dtype=torch.float16, device="cuda", overrides=None,
               calls: int = CALLS) -> list[dict]:
    """Full model vs. each schedule (and the DeepCache package's helper for UNets), interleaved
    runs on the same noise; medians."""
    from shortcut_kernels.dipgo import accelerate
    from shortcut_kernels.models.deepcache import package_helper

    dev = torch.device(device)
    model, x_T, cond = _sampling_setup(name, latent, dtype, dev, overrides)
    c = model.config
    scheds = schedules(name, calls, (2, c.in_channels, latent, latent), overrides)
    scheduler = _scheduler()
    run = lambda: denoise(model, scheduler, x_T, cond, calls)  # noqa: E731
    package = {}
    if _is_unet(model):
        try:
            import DeepCache  # noqa: F401
            package = {key: tuple(int(v) for v in key[len("deepcache("):-1].split(","))
                       for key in scheds if key.startswith("deepcache(")}
        except ImportError:
            package = {}
    variants = {"full": None, **{k: ("ours", s) for k, s in scheds.items()},
                **{f"{k} DeepCache package": ("package", p) for k, p in package.items()}}
    times = {k: [] for k in variants}
    outputs = {}
    with torch.no_grad():
        keys = list(variants)
        for rep in tqdm(range(reps + 1), desc=f"gpu {name}"):  # rep 0 warms up every variant
            for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:  # a new order each rep: no order bias
                how = variants[key]
                if how is None:
                    ctx, undo = None, None
                elif how[0] == "ours":
                    ctx, undo = accelerate(model, how[1], scheduler=scheduler, check_finite=False), None
                else:
                    ctx, undo = None, package_helper(model, scheduler, *how[1])
                try:
                    if ctx is not None:
                        ctx.__enter__()
                    sec = _timed(lambda: outputs.__setitem__(key, run()), dev)
                finally:
                    if ctx is not None:
                        ctx.__exit__(None, None, None)
                    if undo is not None:
                        undo()
                if rep:
                    times[key].append(sec)
    full = statistics.median(times["full"])
    rows = []
    for key, how in variants.items():
        if how is None:
            continue
        sched_key = key.removesuffix(" DeepCache package")
        s = scheds[sched_key]
        ours = statistics.median(times[key])
        row = {"model": name, "schedule": sched_key, "by": "DeepCache package" if how[0] == "package" else "ours",
               "dtype": str(dtype).replace("torch.", ""), "calls": calls, "latent": latent, "reps": reps,
               "macs_kept": s.macs_kept, "mac_ideal": s.ideal_speedup, "full_s": full, "ours_s": ours,
               "speedup": full / ours, "finite": bool(torch.isfinite(outputs[key]).all())}
        if how[0] == "package":  # the same schedule: the outputs should agree
            row["rel_diff_to_ours"] = _rel(outputs[key], outputs[sched_key])
        rows.append(row)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _peak_mib(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def sdo_rows(name: str = "sd-1.5", latent: int = 64, rounds: int = 2, dtype=torch.bfloat16, device="cuda",
             overrides=None, calls: int = CALLS) -> dict:
    """Seconds and peak memory of one SDO gradient w.r.t. x_T (batch 1, CFG) per method."""
    from shortcut_kernels import sdo
    from shortcut_kernels.dipgo import deepcache
    from shortcut_kernels.models import build_model

    dev = torch.device(device)
    model = build_model(name, dtype=dtype, device=dev, overrides=overrides).eval().requires_grad_(False)
    c = model.config
    g = torch.Generator(device=dev).manual_seed(1)
    embeds = conditioning(model, 1, g, dev, dtype)["encoder_hidden_states"]
    fn = sdo.TextConditional(model, embeds[1:], embeds[:1])
    scheduler = _scheduler()
    scheduler.set_timesteps(calls)
    x_T = torch.randn(1, c.in_channels, latent, latent, generator=g, device=dev)
    weight = torch.randn(x_T.shape, generator=g, device=dev) / x_T.numel() ** 0.5
    meta = build_model(name, device="meta", overrides=overrides)
    shape = (2, c.in_channels, latent, latent)
    chains = {f"deepcache({n},{b})": deepcache(meta, calls, n, b, sample_shape=shape) for n, b in SDO_CHAINS}
    # exact backprop checkpointed, and keeping every activation where that fits in memory (faster)
    methods = {"full": ("full", None), PLAIN_FULL: ("full", None), "sdo": ("random", None),
               **{f"sdo+{k}": ("random", s) for k, s in chains.items()}}
    autocast = dtype if dtype in (torch.bfloat16, torch.float16) else None
    times = {m: [] for m in methods}
    peaks = {m: [] for m in methods}
    grads = {}
    base = _peak_mib(dev)

    def iteration(method: str, r: int):
        policy, chain = methods[method]
        x = x_T.clone().requires_grad_(True)
        config = sdo.ChainConfig(policy=policy, guidance=GUIDANCE, autocast=autocast, chain_schedule=chain,
                                 checkpoint=method != PLAIN_FULL)
        x0 = sdo.shortcut_sample(fn, scheduler, x, config, params=[], generator=torch.Generator().manual_seed(r))
        (x0 * weight).sum().backward()
        grads[method] = x.grad

    too_big = set()
    for r in tqdm(range(rounds + 1), desc=f"gpu sdo {name}"):  # round 0 warms up
        for m in methods:
            if m in too_big:
                continue
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                sec = _timed(lambda: iteration(m, r), dev)
            except torch.cuda.OutOfMemoryError:
                if m != PLAIN_FULL:
                    raise
                too_big.add(m)  # every activation of every call does not fit: reported, not timed
                grads.pop(m, None)
                torch.cuda.empty_cache()
                continue
            if r:
                times[m].append(sec)
                peak = _peak_mib(dev)
                peaks[m].append(None if peak is None else peak - base)
    full = statistics.median(times["full"])
    rows = []
    for m, (policy, chain) in methods.items():
        if m in too_big:
            rows.append({"method": m, "policy": policy, "fits_in_memory": False})
            continue
        sec = statistics.median(times[m])
        rows.append({"method": m, "policy": policy, "chain_macs_kept": 1.0 if chain is None else chain.macs_kept,
                     "seconds": sec, "full_over_this": full / sec,
                     "peak_mib_over_weights": None if peaks[m][0] is None else max(peaks[m]),
                     "grad_finite": bool(torch.isfinite(grads[m]).all())})
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "dtype": str(dtype).replace("torch.", ""), "batch": 1, "latent": latent, "calls": calls,
            "guidance": GUIDANCE, "rounds": rounds, "weights_mib": base, "rows": rows}


def compile_rows(name: str = "sd-1.5", latent: int = 64, reps: int = 3, dtype=torch.float16, device="cuda",
                 overrides=None, calls: int = CALLS, backend: str = "inductor", mode: str | None = None) -> list[dict]:
    """torch.compile of the full model and of deepcache(5,0) (handle.compile(): one graph per
    keep-pattern); first run (with the compiles) and the median of the runs after it.
    ``mode="reduce-overhead"``: Inductor with CUDA graphs."""
    options = {"backend": backend, **({"mode": mode} if mode else {})}
    tag = f"compile[{mode}]" if mode else "compile"
    from shortcut_kernels.dipgo import accelerate

    dev = torch.device(device)
    model, x_T, cond = _sampling_setup(name, latent, dtype, dev, overrides)
    c = model.config
    s = schedules(name, calls, (2, c.in_channels, latent, latent), overrides)["deepcache(5,0)"]
    scheduler = _scheduler()
    rows = []
    with torch.no_grad():
        eager = statistics.median(_timed(lambda: denoise(model, scheduler, x_T, cond, calls), dev)
                                  for _ in range(reps))
        torch._dynamo.reset()
        compiled = torch.compile(model, **options)
        first = _timed(lambda: denoise(compiled, scheduler, x_T, cond, calls), dev)
        steady = statistics.median(_timed(lambda: denoise(compiled, scheduler, x_T, cond, calls), dev)
                                   for _ in range(reps))
        rows.append({"model": name, "variant": f"{tag}(full)", "macs_kept": 1.0, "first_run_s": first,
                     "seconds": steady, "eager_full_s": eager, "speedup_over_eager_full": eager / steady})
        del compiled
        torch._dynamo.reset()
        with accelerate(model, s, scheduler=scheduler, check_finite=False) as handle:
            handle.compile(**options)
            first = _timed(lambda: denoise(model, scheduler, x_T, cond, calls), dev)
            steady = statistics.median(_timed(lambda: denoise(model, scheduler, x_T, cond, calls), dev)
                                       for _ in range(reps))
        rows.append({"model": name, "variant": f"{tag}(deepcache(5,0))", "macs_kept": s.macs_kept,
                     "first_run_s": first, "seconds": steady, "eager_full_s": eager,
                     "speedup_over_eager_full": eager / steady})
    torch._dynamo.reset()
    for r in rows:
        r["speedup_over_compiled_full"] = rows[0]["seconds"] / r["seconds"]
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(out_dir, full: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device visible (torch.cuda.is_available() is False): the GPU suite "
                           "(SD-1.5, SDXL and DiT-XL/2 in fp16, SDO on SD-1.5 in bf16, op roofline) did not run"}
    doc = {"device": torch.cuda.get_device_name(), "rows": [], "sdo": None, "compile": [], "notes": []}
    partial = out_dir / "gpu.partial.json"
    budget_end = None if full else time.time() + BUDGET_S

    def part(key: str, fn):
        left = seconds_left(budget_end)
        if left < PART_SECONDS[key]:
            doc["notes"].append(f"{key}: not run, {left:.0f} s left before the deadline (SHORTCUT_BENCH_DEADLINE or "
                                f"the section's {BUDGET_S} s; it needs about {PART_SECONDS[key]} s)")
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - the other parts still run; the error is reported
            doc["notes"].append(f"{key}: failed\n{traceback.format_exc()}")
            print(doc["notes"][-1], flush=True)
        doc.setdefault("part_seconds", {})[key] = time.perf_counter() - t0
        partial.write_text(json.dumps(doc, indent=1, default=str))

    parts = {
        "sdo": lambda: doc.__setitem__("sdo", sdo_rows()),
        **{name: (lambda name=name: doc["rows"].extend(model_rows(name, *MODELS[name]))) for name in MODELS},
        "compile": lambda: doc["compile"].extend(compile_rows()),
        "cuda-graphs": lambda: doc["compile"].extend(compile_rows(mode="reduce-overhead")),
    }
    for key in selected_parts(full):
        part(key, parts[key])
    return doc


def selected_parts(full: bool) -> list[str]:
    """The parts to run, in order: SHORTCUT_GPU_PARTS when set, else every part (CUDA graphs,
    Inductor's reduce-overhead mode, only with FULL: they have not run on a GPU yet)."""
    chosen = os.environ.get("SHORTCUT_GPU_PARTS", "").strip()
    if not chosen:
        return [k for k in PART_SECONDS if full or k != "cuda-graphs"]
    keys = [k.strip() for k in chosen.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PART_SECONDS]
    if unknown:
        raise ValueError(f"SHORTCUT_GPU_PARTS: unknown part(s) {unknown}; the parts: {', '.join(PART_SECONDS)}")
    return keys
