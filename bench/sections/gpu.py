"""GPU section (runs only where torch.cuda.is_available()): the real architectures with random
weights in fp16, full model vs. hand-made cache schedules, 50 DDIM calls with batched
classifier-free guidance, wall-clock against the MAC-ideal speedup. (The op roofline - GB/s
against a copy of the same bytes in the same run - is the ops section, which keeps the copy
rows on a GPU.) Not runnable on the CPU machine: on a CPU it returns a note, which the report
prints.
"""
from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

CALLS = 50
REPS = 3
GUIDANCE = 7.5
# name: (latent side, the schedules compared with the full model)
MODELS = {"sd-1.5": 64, "dit-xl-2": 32}


def _schedules(name: str, shape) -> dict:
    """Built on a meta-device copy: the block graph and MACs need no weights."""
    from shortcut_kernels.dipgo import deepcache, fora, skip_steps
    from shortcut_kernels.models import build_model

    meta = build_model(name, device="meta")
    if name.startswith("sd"):
        rows = {"deepcache(3,0)": deepcache(meta, CALLS, 3, 0, sample_shape=shape),
                "deepcache(5,0)": deepcache(meta, CALLS, 5, 0, sample_shape=shape)}
    else:
        rows = {"fora(3)": fora(meta, CALLS, 3, sample_shape=shape), "fora(5)": fora(meta, CALLS, 5, sample_shape=shape)}
    rows["skip_steps(10,power1.5)"] = skip_steps(meta, CALLS, count=10, placement="power", exponent=1.5,
                                                 granularity="fine", sample_shape=shape)
    return rows


def _denoise(model, scheduler, x_T, cond):
    """One sampling run: CFG batched (uncond | cond halves), DDIM updates."""
    scheduler.set_timesteps(CALLS, device=x_T.device)
    x = x_T.clone()
    n = x.shape[0]
    for t in scheduler.timesteps:
        xx = torch.cat([x, x])
        if "context" in cond:  # UNet: text context
            e = model(xx, t, encoder_hidden_states=cond["context"], return_dict=False)[0]
        else:  # DiT: class labels; it predicts eps and variance
            e = model(hidden_states=xx, timestep=t.expand(2 * n), class_labels=cond["labels"],
                      return_dict=False)[0][:, : x.shape[1]]
        eu, ec = e.chunk(2)
        x = scheduler.step(eu + GUIDANCE * (ec - eu), t, x).prev_sample
    return x


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def model_rows(name: str, latent: int, dtype=torch.float16) -> list[dict]:
    import diffusers

    from shortcut_kernels.dipgo import accelerate
    from shortcut_kernels.models import build_model

    dev = torch.device("cuda")
    model = build_model(name, dtype=dtype, device=dev).eval()
    c = model.config
    g = torch.Generator(device=dev).manual_seed(0)
    x_T = torch.randn(1, c.in_channels, latent, latent, generator=g, device=dev, dtype=dtype)
    if name.startswith("sd"):
        cond = {"context": torch.randn(2, 77, c.cross_attention_dim, generator=g, device=dev, dtype=dtype)}
    else:
        cond = {"labels": torch.tensor([c.num_embeds_ada_norm, 7], device=dev)}
    schedules = _schedules(name, (2, c.in_channels, latent, latent))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    run_full = lambda: _denoise(model, scheduler, x_T, cond)  # noqa: E731
    times = {"full": []}
    with torch.no_grad():
        run_full()  # warm-up: cuDNN/cuBLAS choices, allocator
        for _ in tqdm(range(REPS), desc=f"gpu {name}"):
            times["full"].append(_timed(run_full))
            for key, s in schedules.items():
                with accelerate(model, s, scheduler=scheduler, check_finite=False):  # no NaN check: no syncs
                    if key not in times:
                        run_full()  # warm-up of this schedule's shapes
                        times[key] = []
                    times[key].append(_timed(run_full))
    full = statistics.median(times["full"])
    rows = []
    for key, s in schedules.items():
        ours = statistics.median(times[key])
        rows.append({"model": name, "schedule": key, "dtype": str(dtype).replace("torch.", ""), "calls": CALLS,
                     "latent": latent, "reps": REPS, "macs_kept": s.macs_kept, "mac_ideal": s.ideal_speedup,
                     "full_s": full, "ours_s": ours, "speedup": full / ours})
    del model
    torch.cuda.empty_cache()
    return rows


def run(out_dir, full: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device visible (torch.cuda.is_available() is False): the GPU suite "
                           "(SD-1.5 and DiT-XL/2 in fp16, op roofline) did not run"}
    rows = []
    for name, latent in MODELS.items():
        rows += model_rows(name, latent)
    return {"device": torch.cuda.get_device_name(), "rows": rows}
