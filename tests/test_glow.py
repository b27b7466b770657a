"""Tests of glow.py: every layer and the whole model against independent computations in float64, then
training, checkpoints and errors end to end on the synthetic data of conftest.py (CPU, tiny models)."""
import json
import math

import numpy as np
import pytest
import torch

import glow

D64 = torch.float64
VARIANTS = [("invconv", "affine", "sigmoid"), ("invconv", "additive", "exp"),
            ("shuffle", "affine", "exp"), ("reverse", "affine", "sigmoid")]


def tiny_cfg(**kw):
    kw = {"dataset": "mnist", "L": 2, "K": 2, "hidden": 8, "fid_samples": 0, "n_samples": 4, **kw}
    return glow.Config(**kw)


def perturb(module, scale=0.1, seed=0):
    """Move every parameter off its (identity-making) initial value, so no layer is trivially the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def jacobian_logdet(f, x):
    """log|det df/dx| by brute force for one input x [1, ...]; f returns a tensor or a list of tensors."""
    def flat(v):
        out = f(v.view(x.shape))
        return torch.cat([t.flatten() for t in (out if isinstance(out, list) else [out])])
    J = torch.autograd.functional.jacobian(flat, x.flatten())
    return torch.linalg.slogdet(J)[1]


def tiny_model(variant=VARIANTS[0], shape=(1, 4, 4), L=2, seed=0, scale=0.1):
    perm, coupling, scale_fn = variant
    torch.manual_seed(seed)
    model = glow.Glow(tiny_cfg(L=L, permutation=perm, coupling=coupling, scale_fn=scale_fn), shape).to(D64)
    model.data_init(torch.randint(0, 256, (16, *shape), dtype=torch.uint8))
    assert all(m.initialized for m in model.modules() if isinstance(m, glow.ActNorm))
    return perturb(model, scale)


# ----------------------------------------------------------------------------- layers

@pytest.mark.parametrize("name", ["actnorm", "invconv_lu", "shuffle", "reverse",
                                  "affine_sigmoid", "affine_sigmoid_official", "affine_exp", "additive"])
def test_layer_inverts_and_logdet_matches_jacobian(name):
    torch.manual_seed(0)
    C = 4
    cfg = glow.Config(hidden=8)
    layer = {"actnorm": lambda: glow.ActNorm(C), "invconv_lu": lambda: glow.InvConv1x1(C),
             "shuffle": lambda: glow.InvConv1x1(C, "shuffle"),
             "reverse": lambda: glow.InvConv1x1(C, "reverse"),
             "affine_sigmoid": lambda: glow.Coupling(C, cfg),  # bounded: s in (0.5, 1)
             "affine_sigmoid_official": lambda: glow.Coupling(C, glow.Config(hidden=8, scale_min=0.0)),
             "affine_exp": lambda: glow.Coupling(C, glow.Config(hidden=8, scale_fn="exp")),
             "additive": lambda: glow.Coupling(C, glow.Config(hidden=8, coupling="additive"))}[name]()
    layer = perturb(layer.to(D64))
    x = torch.randn(3, C, 3, 3, dtype=D64)
    y, logdet = layer(x)
    assert logdet.shape == ((3,) if isinstance(layer, glow.Coupling) else ())  # else the same for all
    logdet = logdet.expand(3)
    assert (layer.inverse(y) - x).abs().max() < 1e-8
    for i in range(3):  # per sample, against the brute-force Jacobian
        assert torch.allclose(logdet[i], jacobian_logdet(lambda v: layer(v)[0], x[i:i + 1]), atol=1e-8)


def test_bounded_sigmoid_scale_caps_the_inverse_gain():
    """The T=1 overflow: the inverse x_b = y_b / s - t of the official sigmoid(h + 2) scale has no bound on 1 / s, so a
    coupling network that outputs h ~ -1000 (as a trained one did on inputs unlike the data) sends x_b to inf. With
    s = s_min + (1 - s_min) sigmoid(h + 2) the gain is at most 1 / s_min, and forward(inverse(y)) is still y."""
    torch.manual_seed(0)
    y = 3 * torch.randn(4, 4, 3, 3)
    for scale_min in (0.5, 0.0):
        layer = perturb(glow.Coupling(4, glow.Config(hidden=8, scale_min=scale_min)))
        with torch.no_grad():
            layer.nn[-1].bias[1::2] = -1000.0  # the scale half of h (channels interleave t, h as the official code)
        t, logs = layer.shift_logscale(y.chunk(2, 1)[0])
        xb = layer.inverse(y).chunk(2, 1)[1]
        if scale_min == 0:  # the official parametrization overflows: the bug the bound fixes
            assert logs.min() < -500 and not xb.isfinite().all()
            continue
        assert logs.min() >= math.log(scale_min) - 1e-6 and xb.isfinite().all()
        assert ((xb + t).abs() <= y.chunk(2, 1)[1].abs() / scale_min + 1e-5).all()
        assert torch.allclose(layer(layer.inverse(y))[0], y, atol=1e-5)


def stroke_images(n, size=8, seed=1):
    """n uint8 [n, 1, size, size] images, each one horizontal white stroke on black (sharp, like digits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    rows, starts = torch.randint(0, size, (n,), generator=g), torch.randint(0, size // 2, (n,), generator=g)
    lengths = torch.randint(2, size // 2 + 1, (n,), generator=g)
    for i in range(n):
        x[i, 0, rows[i], starts[i]:starts[i] + lengths[i]] = 255
    return x


def test_short_real_learning_run_gives_finite_samples_at_temperature_one():
    """60 Adam steps on stroke images, then 1000 samples at T=1. With the default bounded scale every sample is
    finite; the same run with the official unbounded sigmoid(h + 2) (--scale_min 0) overflows, which shows that
    this setting reproduces the bug (on MNIST after 600 steps: 82% of T=1 samples were inf/NaN)."""
    x = stroke_images(2048)
    nonfinite = {}
    for scale_min in (0.5, 0.0):
        torch.manual_seed(0)
        model = glow.Glow(glow.Config(L=2, K=4, hidden=16, scale_min=scale_min), (1, 8, 8))
        model.data_init(x[:256])
        opt, g = torch.optim.Adam(model.parameters(), lr=3e-3), torch.Generator().manual_seed(2)
        first = None
        for step in range(60):
            for group in opt.param_groups:
                group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
            loss, _ = model(glow.dequantize(x[torch.randint(len(x), (64,), generator=g)], g))
            first = first or loss.item()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            opt.step()
        assert loss.item() < first - 1.0, (first, loss.item())  # it learned
        y = model.sample(1000, 1.0, torch.Generator().manual_seed(0))
        nonfinite[scale_min] = (~y.isfinite()).flatten(1).any(1).float().mean().item()
    assert nonfinite[0.5] == 0.0 and nonfinite[0.0] > 0.0, nonfinite


def test_squeeze_is_the_2x2_patch_reshape_and_inverts():
    """Glow squeezes with F.pixel_unshuffle(x, 2) and unsqueezes with F.pixel_shuffle(x, 2)."""
    x = torch.randn(2, 3, 6, 4, dtype=D64)
    s = glow.F.pixel_unshuffle(x, 2)
    assert s.shape == (2, 12, 3, 2)
    for c in range(3):  # channel 4c + 2i + j holds pixel (i, j) of every 2x2 patch of input channel c
        for i in range(2):
            for j in range(2):
                assert torch.equal(s[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    assert torch.equal(glow.F.pixel_shuffle(s, 2), x)


def test_actnorm_data_init_gives_zero_mean_unit_variance():
    torch.manual_seed(0)
    norm = glow.ActNorm(5).to(D64)
    x = 3 + 2 * torch.randn(64, 5, 6, 6, dtype=D64) * torch.arange(1, 6, dtype=D64).view(1, 5, 1, 1)
    assert not norm.initialized
    glow.ActNorm.init_mode = True  # as Glow.data_init does
    y, logdet = norm(x)
    glow.ActNorm.init_mode = False
    assert norm.initialized and "initialized" in norm.state_dict()
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(5, dtype=D64), atol=1e-10)
    assert torch.allclose(y.var((0, 2, 3), correction=0), torch.ones(5, dtype=D64), atol=1e-8)
    assert torch.allclose(logdet, -0.5 * 36 * torch.log(x.var((0, 2, 3), correction=0)).sum().expand(64))
    assert torch.allclose(norm(x)[0], y)  # outside init mode, the same affine map: nothing re-initialized


def test_lu_weight_is_P_L_U_plus_diag_s_and_logdet_is_slogdet():
    torch.manual_seed(0)
    conv = perturb(glow.InvConv1x1(6).to(D64), scale=0.3)
    L = torch.tril(conv.LU, -1) + torch.eye(6, dtype=D64)  # unit lower triangular
    U = torch.triu(conv.LU, 1)  # strictly upper; the diagonal lives in s
    s = conv.sign_s * conv.log_s.exp()
    W, logdet = conv.weight()
    assert torch.allclose(W, conv.P @ L @ (U + torch.diag(s)), atol=1e-12)
    assert torch.allclose(logdet, torch.linalg.slogdet(W)[1], atol=1e-10)
    x = torch.randn(2, 6, 3, 5, dtype=D64)  # eq. (9): h * w * log|det W| per sample
    assert torch.allclose(conv(x)[1], 15 * torch.linalg.slogdet(W)[1].expand(2))
    assert torch.allclose(conv(x)[0], torch.einsum("oc,bchw->bohw", W, x))


def test_fresh_invconv_is_a_rotation():
    conv = glow.InvConv1x1(8)
    W, logdet = conv.weight()
    assert torch.allclose(W @ W.T, torch.eye(8), atol=1e-5) and abs(logdet) < 1e-5


# ----------------------------------------------------------------------------- whole model

@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_model_inverts_and_total_logdet_matches_jacobian(variant):
    model = tiny_model(variant)
    y = glow.dequantize(torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)).to(D64)
    eps, logdet = model.forward_flow(y)
    assert [e.shape[1:] for e in eps] == [(2, 2, 2), (8, 1, 1)]  # 1x4x4 -> 4x2x2 (split 2) -> 8x1x1
    assert (model.inverse(eps) - y).abs().max() < 1e-8
    for i in range(3):  # log-det per sample: each against the brute-force Jacobian of y -> all eps
        assert torch.allclose(logdet[i], jacobian_logdet(lambda v: model.forward_flow(v)[0], y[i:i + 1]), atol=1e-8)


def test_bpd_is_the_documented_formula_on_an_independent_density():
    """A fresh Glow with exp scales is a rotation (ActNorm not yet initialized, zero-init couplings and priors,
    orthogonal W; the default sigmoid(h + 2) would start as a 0.88 scaling instead):
    p(y) = N(y; 0, I) exactly, so bpd = (-log N(y; 0, I) + D log 2^n) / (D log 2), per sample."""
    torch.manual_seed(0)
    for n_bits in (8,):
        model = glow.Glow(tiny_cfg(scale_fn="exp"), (1, 28, 28)).to(D64)
        x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
        y = glow.dequantize(x, torch.Generator().manual_seed(1)).to(D64)
        assert y.min() >= -0.5 and y.max() < 0.5
        assert torch.equal(torch.floor((y + 0.5) * 2 ** n_bits), torch.div(x, 2 ** (8 - n_bits), rounding_mode="floor").to(D64))
        log_n = (-0.5 * y ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        D = 784
        want = (-log_n + D * math.log(2 ** n_bits)) / (D * math.log(2))
        assert torch.allclose(model.bpd(y), want, atol=1e-7)
        loss, stats = model(y)  # the model takes the dequantized images
        assert math.isclose(stats["bpd"], want.mean().item(), abs_tol=1e-7)  # W is orthogonal to float32 precision


def test_logdet_is_per_sample_not_batch_averaged():
    model = tiny_model()
    y = glow.dequantize(torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)).to(D64)
    together = model.bpd(y)
    alone = torch.cat([model.bpd(y[i:i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-10) and together.std() > 1e-3


def test_reloaded_checkpoint_gives_identical_outputs_without_reinitializing_actnorm(tmp_path):
    a = tiny_model(shape=(1, 28, 28))
    torch.save(a.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(123)  # a different fresh init, which loading must overwrite
    b = glow.Glow(tiny_cfg(), (1, 28, 28)).to(D64)
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert all(m.initialized for m in b.modules() if isinstance(m, glow.ActNorm))  # the flags came along
    other = torch.randint(100, 256, (16, 1, 28, 28), dtype=torch.uint8)  # very different statistics
    b.data_init(other)  # must change nothing
    y = glow.dequantize(other).to(D64)
    assert torch.equal(a.bpd(y), b.bpd(y))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(glow.to_uint8(a.sample(4, 0.7, g1)), glow.to_uint8(b.sample(4, 0.7, g2)))


def test_samples_are_binned_images_and_temperature_zero_is_deterministic():
    model = tiny_model(shape=(1, 28, 28), scale=0.01).float()
    y = model.sample(6, 1.0, torch.Generator().manual_seed(0))
    assert y.shape == (6, 1, 28, 28) and y.isfinite().all()
    x = glow.to_uint8(y)
    assert x.dtype == torch.uint8 and torch.equal(x, ((y + 0.5) * 256).floor().clamp(0, 255).to(torch.uint8))
    assert torch.equal(glow.to_uint8(glow.dequantize(x)), x)  # the bin round trip
    y0 = model.sample(2, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(y0[0], y0[1])


def test_bfloat16_autocast_keeps_the_flow_in_float32():
    model = tiny_model(shape=(1, 28, 28)).float()
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    y = glow.dequantize(x, torch.Generator().manual_seed(0))
    full, _ = model(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CUDA path's autocast, run on the CPU
        half, _ = model(y)
    assert half.dtype == torch.float32 and abs(half.item() - full.item()) < 0.05


def test_cifar_shape_uses_three_levels(data_dir, tmp_path, cifar_no_md5):
    res = glow.train(run_cfg(data_dir, tmp_path, dataset="cifar10", L=0, K=1, max_steps=1))
    cfg = glow.Config(**res["config"])
    assert cfg.L == 3 and res["config"]["L"] == 3  # L = 0: auto
    model = perturb(glow.Glow(cfg, (3, 32, 32)).to(D64))
    y = glow.dequantize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).to(D64)
    eps, _ = model.forward_flow(y)
    assert [tuple(e.shape[1:]) for e in eps] == [(6, 16, 16), (12, 8, 8), (48, 4, 4)]
    assert sum(e[0].numel() for e in eps) == 3 * 32 * 32
    assert (model.inverse(eps) - y).abs().max() < 1e-8


# ----------------------------------------------------------------------------- end to end

def run_cfg(data_dir, out_dir, **kw):
    kw = {"data_dir": str(data_dir), "out_dir": str(out_dir), "max_steps": 6, "batch_size": 16, "eval_every": 3,
          "log_every": 2, "warmup_steps": 2, "device": "cpu", **kw}
    return tiny_cfg(**kw)


def test_train_in_process_writes_everything_and_checkpoint_round_trips(data_dir, tmp_path):
    res = glow.train(run_cfg(data_dir, tmp_path, dataset="fashion"))
    for f in ("ckpt.pt", "samples.png", "samples_temps.png", "loss.png", "log.txt", "results.json", "samples.npz"):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "results.json").read_text())
    for k in ("test_bpd", "train_images_per_s", "sample_images_per_s", "wall_s"):
        assert math.isfinite(saved[k]), k
    assert saved["test_bpd_kind"] == "exact (dequantized density, 1 noise draw)" and saved["steps"] == 6 and saved["device"] == "cpu"
    assert "FINAL glow fashion test_bpd=" in (tmp_path / "log.txt").read_text().splitlines()[-1]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    cfg = glow.Config(**ckpt["config"])  # the checkpoint alone rebuilds the model
    model = glow.Glow(cfg, (1, 28, 28))
    model.load_state_dict(ckpt["ema"])  # the Polyak average is what train() evaluates
    x_test, _ = glow.load_split(glow.Config(dataset="fashion", data_dir=str(data_dir)), train=False)
    assert glow.evaluate(model, x_test, cfg)["test_bpd"] == pytest.approx(res["test_bpd"], abs=1e-6)
    again = glow.train(run_cfg(data_dir, tmp_path, dataset="fashion", eval_only=True))
    assert again["test_bpd"] == pytest.approx(res["test_bpd"], abs=1e-6) and again["steps"] == 6


def test_short_run_learns(data_dir, tmp_path):
    cfg = run_cfg(data_dir, tmp_path, max_steps=40, eval_every=100, lr=3e-3, warmup_steps=5)
    torch.manual_seed(cfg.seed)  # the same init as train() makes, evaluated before any step
    model = glow.Glow(cfg, (1, 28, 28))
    x_train, _ = glow.load_split(glow.Config(dataset="mnist", data_dir=str(data_dir)), train=True)
    x_test, _ = glow.load_split(glow.Config(dataset="mnist", data_dir=str(data_dir)), train=False)
    model.data_init(x_train[:256])
    before = glow.evaluate(model, x_test, cfg)["test_bpd"]
    after = glow.train(cfg)["test_bpd"]
    assert after < before - 0.5, (before, after)


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(data_dir, tmp_path):
    straight = glow.train(run_cfg(data_dir, tmp_path / "a", max_steps=6))
    glow.train(run_cfg(data_dir, tmp_path / "b", max_steps=3))
    resumed = glow.train(run_cfg(data_dir, tmp_path / "b", max_steps=6, resume=True))
    assert "loaded" in (tmp_path / "b" / "log.txt").read_text() and resumed["steps"] == 6
    assert resumed["test_bpd"] == pytest.approx(straight["test_bpd"], abs=1e-5)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["ema"].keys() == a["model"].keys()  # the average is saved, and resumed from
    for k in a["ema"]:  # the same Polyak average as the uninterrupted run's
        assert torch.allclose(b["ema"][k], a["ema"][k], rtol=0, atol=1e-6), k
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])  # a real average


def initial_weights(cfg, data_dir):
    """The weights train(cfg) starts from: its seed, then ActNorm's data-dependent init on the first 256 images."""
    torch.manual_seed(cfg.seed)
    model = glow.Glow(cfg, (1, 28, 28))
    model.data_init(glow.load_split(glow.Config(dataset=cfg.dataset, data_dir=str(data_dir)), train=True)[0][:256])
    return model


def test_polyak_average_is_what_is_evaluated_and_follows_the_decay(data_dir, tmp_path):
    """One step from w0 to w1 with --ema 0.999: the decay is min(0.999, (1 + 0) / (10 + 0)) = 0.1, so the average
    is 0.1 w0 + 0.9 w1 (a decay of 0.999 from the first step would leave it at w0). test_bpd (and --eval_only) score
    the average, not the last weights."""
    cfg = run_cfg(data_dir, tmp_path, max_steps=1, ema=0.999, lr=1e-2, warmup_steps=1)
    w0 = initial_weights(cfg, data_dir).state_dict()
    res = glow.train(cfg)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    w1, avg = ckpt["model"], ckpt["ema"]
    moved = 0
    for k, v in w0.items():
        if v.dtype == torch.bool:  # ActNorm's initialized flags: set in both
            assert avg[k] and w1[k], k
            continue
        assert torch.allclose(avg[k], 0.1 * v + 0.9 * w1[k], rtol=0, atol=1e-6), k
        moved += not torch.equal(w1[k], v)
    assert moved > 10  # the step changed the weights, so the average is not trivially w0 = w1
    x_test, _ = glow.load_split(glow.Config(dataset="mnist", data_dir=str(data_dir)), train=False)
    score, models = {}, {}
    for name in ("ema", "model"):
        models[name] = glow.Glow(glow.Config(**ckpt["config"]), (1, 28, 28))
        models[name].load_state_dict(ckpt[name])
        score[name] = glow.evaluate(models[name], x_test, cfg)["test_bpd"]
    assert res["test_bpd"] == pytest.approx(score["ema"], abs=1e-6) and ckpt["curves"]["test"][-1][1] == res["test_bpd"]
    assert abs(score["model"] - score["ema"]) > 1e-3, score  # evaluating the last weights would fail the line above
    saved = torch.from_numpy(np.load(tmp_path / "samples.npz")["images"])  # sample_metrics's noise, seed + 2
    drawn = {k: glow.to_uint8(m.sample(4, 1.0, torch.Generator().manual_seed(cfg.seed + 2))) for k, m in models.items()}
    assert torch.equal(saved, drawn["ema"]) and not torch.equal(saved, drawn["model"])  # sampled from the average
    again = glow.train(run_cfg(data_dir, tmp_path, eval_only=True))
    assert again["test_bpd"] == pytest.approx(score["ema"], abs=1e-6)
    assert "bits/dim (exact, ema)" in (tmp_path / "log.txt").read_text()


def test_ema_zero_is_the_last_weights(data_dir, tmp_path):
    res = glow.train(run_cfg(data_dir, tmp_path, max_steps=3, ema=0.0))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert res["config"]["ema"] == 0.0 and ckpt["step"] == 3
    assert all(torch.equal(ckpt["ema"][k], v) for k, v in ckpt["model"].items())


def test_cli_end_to_end(data_dir, tmp_path, cli):
    r = cli("glow.py", "--dataset", "fashion", "--data_dir", data_dir, "--out_dir", tmp_path, "--K", 1, "--hidden", 8,
            "--max_steps", 4, "--batch_size", 8, "--eval_every", 2, "--log_every", 2, "--fid_samples", 0,
            "--n_samples", 4, "--compile", "false", "--permutation", "shuffle")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("FINAL glow fashion test_bpd=")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["permutation"] == "shuffle" and res["config"]["L"] == 2 and math.isfinite(res["test_bpd"])
    assert cli("glow.py", "-h").stdout.count("Kingma & Dhariwal") == 1


def test_metrics_end_to_end(data_dir, tmp_path):
    pytest.importorskip("metrics")
    res = glow.train(run_cfg(data_dir, tmp_path, max_steps=2, fid_samples=32))
    assert math.isfinite(res["fid"]) and 0 <= res["precision"] <= 1 and res["config"]["fid_temperature"] == 1.0
    assert 0 <= res["samples_nonfinite_frac"] <= 1 and res["sample_images_per_s"] > 0
    assert len(np.load(tmp_path / "samples.npz")["images"]) == 32


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, msg", [
    ({"dataset": "mnist", "L": 3}, "--L 3 cannot halve 28x28 images 3 times"),
    ({"permutation": "random"}, "unknown permutation 'random'"),
    ({"coupling": "spline"}, "unknown coupling 'spline'"),
    ({"scale_fn": "softplus"}, "unknown scale_fn 'softplus'"),
    ({"dtype": "bfloat16"}, "--dtype bfloat16 is autocast on CUDA"),
    ({"device": "gpu0"}, "--device gpu0 is not available here"),
    ({"eval_every": 0}, "--eval_every must be >= 1, got 0"),
    ({"scale_min": -0.5}, "--scale_min must be >= 0, got -0.5"),
    ({"fid_samples": -5}, "--fid_samples must be >= 0, got -5"),
])
def test_bad_config_is_one_line_error(data_dir, tmp_path, kw, msg):
    with pytest.raises(SystemExit, match=r"^glow.py: error: " + msg) as e:
        glow.train(run_cfg(data_dir, tmp_path, **kw))
    assert "\n" not in str(e.value)


def test_command_line_parses_bools_and_numbers_and_rejects_bad_values(capsys):
    cfg = glow.parse_args(["--resume", "no", "--compile=0", "--K", "3", "--temperature", "0.5"])
    assert cfg.resume is False and cfg.compile is False and cfg.K == 3 and cfg.temperature == 0.5
    for bad in (["--permutation", "random"], ["--K", "2.5"], ["--compile", "maybe"]):
        with pytest.raises(SystemExit):
            glow.parse_args(bad)
    err = capsys.readouterr().err
    assert "invalid choice: 'random'" in err and "invalid int value: '2.5'" in err
    assert "invalid boolean value: 'maybe'" in err


def test_missing_data_names_data_dir(tmp_path, monkeypatch):
    import torchvision
    def offline(self):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    with pytest.raises(SystemExit, match=r"^glow.py: error: no fashion in --data_dir .*nothing"):
        glow.train(glow.Config(data_dir=str(tmp_path / "nothing"), out_dir=str(tmp_path / "out"), fid_samples=0))


def test_bad_checkpoints_are_one_line_errors(data_dir, tmp_path):
    glow.train(run_cfg(data_dir, tmp_path, max_steps=2))
    res = glow.train(run_cfg(data_dir, tmp_path, max_steps=4, K=3, resume=True))  # the checkpoint's K wins
    assert res["config"]["K"] == 2 and res["steps"] == 4
    assert "its architecture: {" in (tmp_path / "log.txt").read_text()
    torch.save({"script": "vae.py", "config": {"dataset": "mnist"}}, tmp_path / "ckpt.pt")  # another script's
    with pytest.raises(SystemExit, match=r"is vae.py's checkpoint of mnist, not glow.py's"):
        glow.train(run_cfg(data_dir, tmp_path, max_steps=6, resume=True))
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="is not a checkpoint these files wrote"):
        glow.train(run_cfg(data_dir, tmp_path, eval_only=True))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        glow.train(run_cfg(data_dir, tmp_path / "empty", resume=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    glow.train(run_cfg(data_dir, tmp_path, max_steps=2))
    good = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    monkeypatch.setattr(glow.Glow, "bpd", lambda self, y: self.forward_flow(y)[1] * float("nan"))
    with pytest.raises(SystemExit, match="training loss diverged at step 4 \\(nan\\); the last good ckpt.pt is kept"):
        glow.train(run_cfg(data_dir, tmp_path, max_steps=6, eval_every=100, resume=True))
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert kept["step"] == 2 and all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())
