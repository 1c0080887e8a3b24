"""The embedded digits zoo: data, loading, sampling with several schedulers, metrics."""
import json
import math
import shutil

import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.zoo import metrics

DIFFUSION = ["digits-unet", "digits-dit"]


class _Lazy(dict):
    def __missing__(self, name):
        self[name] = zoo.load(name)
        return self[name]


@pytest.fixture(scope="module")
def loaded():
    """Zoo models, each loaded once per module, on first use."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return _Lazy()


# ---------------------------------------------------------------- data

def test_digits_split_fixed_disjoint_stratified():
    xtr, ytr = zoo.load_digits("train")
    xte, yte = zoo.load_digits("test")
    assert xtr.shape == (1437, 1, 16, 16) and xte.shape == (360, 1, 16, 16)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert float(xtr.min()) == -1.0 and float(xtr.max()) == 1.0
    # stratified: every class has 35..37 test images
    counts = torch.bincount(yte, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    # disjoint and complete: train + test rows are exactly the full data set
    xall, _ = zoo.load_digits("all")
    assert xall.shape[0] == 1797
    key = lambda x: {tuple(r.tolist()) for r in x.flatten(1)}  # noqa: E731
    assert key(xtr) | key(xte) <= key(xall)
    # fixed: a second call returns the same split
    assert torch.equal(zoo.load_digits("test")[0], xte)
    with pytest.raises(ValueError, match="split"):
        zoo.load_digits("validation")


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("name", zoo.NAMES)
def test_load(name, loaded):
    (model, sched_cfg), info = loaded[name], loaded[name].info
    assert info["name"] == name
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == info["num_parameters"]
    # weights are a few MB
    assert zoo.weights_path(name).stat().st_size < 12e6
    if name == "digits-classifier":
        assert sched_cfg is None
        return
    from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel

    plain = UNet2DConditionModel if name == "digits-unet" else DiTTransformer2DModel
    assert type(model.backbone) is plain  # the adapters see the plain diffusers class
    assert isinstance(zoo.make_scheduler(sched_cfg), DDIMScheduler)
    assert sched_cfg["beta_schedule"] == "squaredcos_cap_v2"
    x = torch.randn(3, 1, 16, 16)
    eps = model(x, torch.tensor([10, 500, 990]), torch.tensor([0, 5, zoo.NULL_LABEL]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    # the label conditions the output
    e0 = model(x[:1], 500, torch.tensor([3]))
    e1 = model(x[:1], 500, torch.tensor([8]))
    assert (e0 - e1).abs().max() > 1e-3


def test_bad_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        zoo.load("digits-vae")
    msg = str(err.value)
    assert "digits-vae" in msg and all(n in msg for n in zoo.NAMES)
    with pytest.raises(ValueError, match="digits-unet"):
        zoo.load(None)


def test_missing_weights_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "digits-unet.safetensors")):
        zoo.load("digits-unet", weights_dir=tmp_path)
    # weights present but the JSON missing: also named
    shutil.copy(zoo.weights_path("digits-classifier"), tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "digits-classifier.json")):
        zoo.load("digits-classifier", weights_dir=tmp_path)


def test_mismatched_weights_raise(tmp_path):
    shutil.copy(zoo.weights_path("digits-classifier"), tmp_path / "digits-dit.safetensors")
    shutil.copy(zoo.WEIGHTS_DIR / "digits-dit.json", tmp_path)
    with pytest.raises(RuntimeError, match="do not match"):
        zoo.load("digits-dit", weights_dir=tmp_path)


def test_json_records_training():
    for name in zoo.NAMES:
        meta = json.loads((zoo.WEIGHTS_DIR / f"{name}.json").read_text())
        assert meta["training"]["seed"] == 0 and meta["training"]["iters"] > 0
        if name != "digits-classifier":
            assert meta["scheduler_config"]["clip_sample"] is False  # see models.SCHEDULER_CONFIG


# ---------------------------------------------------------------- classifier

def test_classifier_test_accuracy(loaded):
    x, y = zoo.load_digits("test")
    assert metrics.class_accuracy(x, y, loaded["digits-classifier"].model) >= 0.97


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("name", DIFFUSION)
def test_sample_recognisable(name, loaded):
    """Two samples per digit, 20 DDIM steps, guidance 3: nearly all recognised."""
    model, cfg = loaded[name]
    labels = torch.arange(10).repeat(2)
    x = zoo.sample(model, zoo.make_scheduler(cfg), labels, steps=20, guidance=3.0, seed=1, progress=False)
    assert x.shape == (20, 1, 16, 16) and torch.isfinite(x).all()
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert metrics.class_accuracy(x, labels) >= 0.8


@pytest.mark.parametrize("name", DIFFUSION)
def test_sample_deterministic_and_batch_independent(name, loaded):
    model, cfg = loaded[name]
    labels = [1, 7, 4, 10]
    a = zoo.sample(model, zoo.make_scheduler(cfg), labels, steps=4, seed=5, batch_size=4, progress=False)
    b = zoo.sample(model, zoo.make_scheduler(cfg), labels, steps=4, seed=5, batch_size=3, progress=False)
    c = zoo.sample(model, zoo.make_scheduler(cfg), labels, steps=4, seed=6, batch_size=4, progress=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (a - c).abs().max() > 0.1
    # explicit noise = the seed's noise
    d = zoo.sample(model, zoo.make_scheduler(cfg), labels, steps=4, noise=zoo.initial_noise(4, seed=5),
                   progress=False)
    torch.testing.assert_close(a, d, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                 "PNDMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler",
                                 "UniPCMultistepScheduler", "LMSDiscreteScheduler"])
def test_sample_any_scheduler(cls, loaded):
    model, cfg = loaded["digits-unet"]
    sched = zoo.make_scheduler(cfg, cls)
    assert type(sched).__name__ == cls
    labels = torch.arange(10)
    x = zoo.sample(model, sched, labels, steps=10, guidance=3.0, seed=0, progress=False)
    assert x.shape == (10, 1, 16, 16) and torch.isfinite(x).all()
    # recognisable even at 10 steps (sigma-space samplers too: see SCHEDULER_CONFIG)
    assert metrics.class_accuracy(x, labels) >= 0.8


def test_sample_bad_inputs(loaded):
    model, cfg = loaded["digits-unet"]
    sched = zoo.make_scheduler(cfg)
    with pytest.raises(ValueError, match="labels"):
        zoo.sample(model, sched, [0, 11], steps=2, progress=False)
    with pytest.raises(ValueError, match="steps"):
        zoo.sample(model, sched, [0], steps=0, progress=False)
    with pytest.raises(ValueError, match="noise"):
        zoo.sample(model, sched, [0, 1], steps=2, noise=torch.randn(3, 1, 16, 16), progress=False)
    with pytest.raises(ValueError, match="no scheduler class"):
        zoo.make_scheduler(cfg, "NoSuchScheduler")


# ---------------------------------------------------------------- metrics

def test_fd_of_a_set_against_itself_is_zero():
    x, _ = zoo.load_digits("test")
    assert metrics.digits_fd(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.digits_fd(x) == pytest.approx(0.0, abs=1e-6)  # default reference: the test split


def test_fd_orders_real_above_noise():
    xtr, _ = zoo.load_digits("train")
    real = metrics.digits_fd(xtr)
    noise = metrics.digits_fd(torch.rand(360, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real < 5.0 and noise > 10 * real


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    shift = torch.randn(8, generator=g, dtype=torch.float64)
    # same covariance, shifted mean: exactly |shift|^2
    assert metrics.frechet_distance(f, f + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-8)
    # scaled by 2 around the same mean: tr(S + 4S - 2*2S) = tr(S)
    mu = f.mean(0)
    f2 = mu + 2 * (f - mu)
    tr = float(torch.cov(f.T).trace())
    assert metrics.frechet_distance(f, f2) == pytest.approx(tr, rel=1e-6)
    # symmetric
    h = torch.randn(300, 8, generator=g, dtype=torch.float64)
    assert metrics.frechet_distance(f, h) == pytest.approx(metrics.frechet_distance(h, f), rel=1e-6)
    with pytest.raises(ValueError):
        metrics.frechet_distance(f, f[:, :4])
    with pytest.raises(ValueError):
        metrics.frechet_distance(f[:1], f)


def test_psnr_known_values():
    a = torch.zeros(4, 1, 16, 16)
    assert metrics.psnr(a, a) == math.inf
    b = a + 0.1  # mse 0.01, range 2: 10 log10(4 / 0.01)
    assert metrics.psnr(b, a) == pytest.approx(10 * math.log10(400), rel=1e-6)
    c = a.clone()
    c[1:] += 0.2
    per = metrics.psnr(c, a, per_image=True)
    assert per.shape == (4,) and per[0] == math.inf
    torch.testing.assert_close(per[1:], torch.full((3,), 10 * math.log10(4 / 0.04)))
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(a, a[:2])


def test_class_accuracy_checks_labels():
    x, y = zoo.load_digits("test")
    assert metrics.class_accuracy(x, y) >= 0.97
    assert metrics.class_accuracy(x, (y + 1) % 10) <= 0.03
    assert metrics.class_accuracy(x[y == 3], 3) >= 0.97
    with pytest.raises(ValueError, match="labels"):
        metrics.class_accuracy(x, y[:5])
    with pytest.raises(ValueError, match="16, 16"):
        metrics.class_accuracy(torch.zeros(2, 1, 8, 8), [0, 1])


# ---------------------------------------------------------------- training script

@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


MEASURED = {"wall_seconds", "torch", "final_loss_ema", "test_accuracy"}  # outcomes, not inputs


def test_train_script_is_deterministic_and_writes_the_record(tmp_path, restore_threads):
    """A few iterations of the real recipe through the script's command line: loadable by
    ``zoo.load``, bit-identical weights and the same record on rerun, and the record has
    exactly the fields of the shipped one."""
    from safetensors.torch import load_file

    from shortcut_kernels.zoo import train

    note = "a short run in the tests"
    for out in ("a", "b"):
        train.main(["digits-unet", "--iters", "3", "--out", str(tmp_path / out), "--no-progress", "--note", note])
    sa, sb = (load_file(str(tmp_path / out / "digits-unet.safetensors")) for out in ("a", "b"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    model, cfg = zoo.load("digits-unet", weights_dir=tmp_path / "a")
    record = zoo.info("digits-unet", weights_dir=tmp_path / "a")
    rerun = zoo.info("digits-unet", weights_dir=tmp_path / "b")
    assert record["training"].pop("wall_seconds") > 0 and rerun["training"].pop("wall_seconds") > 0
    assert record == rerun
    training = record["training"]
    assert training["iters"] == 3 and "stop_at" not in training and training["note"] == note
    assert training["threads"] == 1 and cfg == zoo.models.SCHEDULER_CONFIG
    shipped = zoo.info("digits-unet")
    assert set(training) | {"wall_seconds", "stop_at"} == set(shipped["training"])
    assert {k: v for k, v in record.items() if k != "training"} == \
        {k: v for k, v in shipped.items() if k not in ("training", "metrics")}
    # 3 iterations moved the weights away from the shipped ones
    shipped_weights = zoo.load("digits-unet").model.state_dict()
    assert any(not torch.equal(v, shipped_weights[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="digits-unet"):
        train.train("digits-gan", out=tmp_path)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_shipped_records_are_what_the_script_writes(name):
    """Every input field of a shipped training record is the recipe's (the command that
    reproduces it is `python -m shortcut_kernels.zoo.train NAME`, plus `--note` when the
    record has one); the other fields are measured outcomes."""
    from shortcut_kernels.zoo import train

    kind, recipe = train.RECIPES[name]
    record = zoo.info(name)
    assert record["kind"] == kind
    inputs = {k: v for k, v in record["training"].items() if k not in MEASURED | {"note"}}
    assert inputs == recipe


def test_classifier_training_reproduces_the_shipped_weights(tmp_path, restore_threads):
    """The whole classifier recipe (2,000 iterations, ~1 min on 2 cores), as
    `python -m shortcut_kernels.zoo.train digits-classifier` runs it, gives the shipped
    classifier: bit for bit on the machine that trained it, and elsewhere, where the CPU's
    kernels sum in another order and 2,000 steps carry that apart (an AVX-512/AMX Xeon: weights
    up to 0.14 apart), the same classifier: the same predictions on the held-out digits and
    the same test accuracy."""
    from safetensors.torch import load_file

    from shortcut_kernels.zoo import train

    train.main(["digits-classifier", "--out", str(tmp_path), "--no-progress"])
    got, shipped = load_file(str(tmp_path / "digits-classifier.safetensors")), \
        load_file(str(zoo.weights_path("digits-classifier")))
    assert got.keys() == shipped.keys()
    worst = max((got[k].double() - shipped[k].double()).abs().max().item() for k in got)
    if worst > 1e-4:  # another summation order: the function must still be the same
        xte, _ = zoo.load_digits("test")
        with torch.no_grad():
            ours = zoo.load("digits-classifier", weights_dir=tmp_path).model(xte).argmax(1)
            theirs = zoo.load("digits-classifier").model(xte).argmax(1)
        agree = (ours == theirs).double().mean().item()
        assert agree >= 0.99, f"weights differ by up to {worst:.3g} and predictions agree on {agree:.1%}"
    record, shipped_record = zoo.info("digits-classifier", weights_dir=tmp_path), zoo.info("digits-classifier")
    for key in ("wall_seconds", "torch"):
        record["training"].pop(key), shipped_record["training"].pop(key)
    assert record["training"] == shipped_record["training"]


def test_memorisation_check_tells_copies_from_new_digits():
    xtr, _ = zoo.load_digits("train")
    xte, _ = zoo.load_digits("test")
    copies = metrics.memorisation(xtr[:200])
    held_out = metrics.memorisation(xte)
    assert copies["nn_train_distance_median"] == 0.0 and copies["fraction_closer_than_held_out_p5"] == 1.0
    assert held_out["nn_distance_ratio"] == pytest.approx(1.0)
    noise = metrics.memorisation(torch.rand(50, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["nn_distance_ratio"] > 2


def test_documented_load_form_unpacks():
    model, scheduler_config = zoo.load("digits-unet")
    assert scheduler_config == zoo.info("digits-unet")["scheduler_config"]
    loaded = zoo.load("digits-classifier")
    assert loaded.scheduler_config is None and loaded.info["kind"] == "classifier"
    assert loaded.model is loaded[0]
