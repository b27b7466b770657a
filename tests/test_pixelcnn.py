"""Tests of pixelcnn.py: causality of the masks by gradients, no blind spot in the gated stacks, the discretized
logistic mixture, exact bits/dim, the fast sampler against the naive loop, end-to-end runs, checkpoints, errors."""
import json
import math

import numpy as np
import pytest
import torch

import pixelcnn
from pixelcnn import Config, MaskedConv2d, Model

TINY = dict(hidden=8, n_layers=2, kernel=3, batch_size=8, max_steps=3, eval_every=100, log_every=1,
            n_samples=4, fid_samples=0, device="cpu")


@pytest.fixture
def float64():
    """The model computes in the default dtype: float64 here, so the maths tests can be exact."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def n_out(cfg):  # the head's parameters per channel
    return 3 * cfg.n_mix if cfg.output == "logistic_mix" else cfg.levels


def logits(m, x, y=None):  # the head's parameters [B, n_out * C, H, W] of the network input x in [-1, 1]
    return m.head(m.net(x, y))


def dependence(f, x, n_out):
    """dep[c, i, j] = bool [C, H, W]: which input values the outputs of channel c at pixel (i, j) depend on.
    f(x) -> [1, n_out * C, H, W] with parameter t of channel c at index t * C + c."""
    x = x.clone().requires_grad_(True)
    C, H, W = x.shape[1:]
    out = f(x).unflatten(1, (n_out, C))
    dep = torch.zeros(C, H, W, C, H, W, dtype=torch.bool)
    for c in range(C):
        for i in range(H):
            for j in range(W):
                (g,) = torch.autograd.grad(out[0, :, c, i, j].sum(), x, retain_graph=True)
                dep[c, i, j] = g[0] != 0
    return dep


def earlier(C, H, W, strict=True):
    """before[c, i, j] = bool [C, H, W]: input values that come before value (c, i, j) in raster, R -> G -> B order."""
    order = (torch.arange(H * W).view(1, H, W) * C + torch.arange(C).view(C, 1, 1)).flatten()
    before = order[None, :] < order[:, None] if strict else order[None, :] <= order[:, None]
    return before.view(C, H, W, C, H, W)


def tiny_model(arch, C, size=5, **kw):
    torch.manual_seed(0)
    cfg = Config(**{**dict(arch=arch, hidden=30, n_layers=6, kernel=3, levels=4), **kw})
    return Model(cfg, (C, size, size))


def naive_sample(m, n, generator):
    """The reference the fast sampler must match: the whole network on the whole image for every value, with the
    same uniform numbers u (drawn up front, in the same order) and the same inverse-CDF draws."""
    C, H, W = m.shape
    u = torch.rand(n, C, H, W, device=generator.device, generator=generator)
    y = torch.arange(n, device=u.device) % 10
    x = torch.full_like(u, -1.0)
    with torch.no_grad():
        for i in range(H):
            for j in range(W):
                for c in range(C):
                    logp = m.logp(logits(m, x, y))[:, :, c, i, j]  # [n, L]
                    x[:, c, i, j] = m.net_input(pixelcnn.pick(logp, u[:, c, i, j]))
    return ((x + 1) * 127.5).round().to(torch.uint8)


@pytest.mark.parametrize("kind", ["A", "B"])
@pytest.mark.parametrize("C", [1, 3])
def test_single_masked_conv_is_causal(kind, C, float64):
    """One k x k masked conv: type A sees strictly earlier values, type B also the same channel (group)."""
    torch.manual_seed(0)
    conv = MaskedConv2d(C, 2 * C, 3, (1, 1), kind, C)
    dep = dependence(conv, torch.randn(1, C, 4, 4), 2)
    allowed = earlier(C, 4, 4, strict=kind == "A")
    assert not (dep & ~allowed).any(), "depends on a later value"
    # and nothing inside the kernel's window that may be seen is cut: the centre pixel's channels
    for c in range(C):
        seen = dep[c, 2, 2, :, 2, 2]
        assert seen.tolist() == [(ci < c) if kind == "A" else (ci <= c) for ci in range(C)]
        assert dep[c, 2, 2, :, 1, 1:].all() and dep[c, 2, 2, :, 2, 1].all()  # 3 pixels above, 1 to the left


@pytest.mark.parametrize("arch,kernel", [("gated", 3), ("pixelcnn", 3), ("gated", 4), ("pixelcnn", 4)])
@pytest.mark.parametrize("C", [1, 3])
def test_network_is_causal(arch, kernel, C, float64):
    """The parameters of value (c, i, j) do not depend on (c, i, j) itself or on any later value (an even kernel
    is causal too: its padding follows from its centre)."""
    m = tiny_model(arch, C, kernel=kernel)
    dep = dependence(lambda x: logits(m, x), torch.randn(1, C, 5, 5), n_out(m.cfg))
    assert not (dep & ~earlier(C, 5, 5)).any()


@pytest.mark.parametrize("C", [1, 3])
def test_gated_has_no_blind_spot_but_pixelcnn_has(C, float64):
    """With enough layers to cover a 5x5 image, every earlier value influences the gated output; the original
    PixelCNN misses some up-right pixels (its blind spot), which shows this check can fail."""
    before = earlier(C, 5, 5)
    m = tiny_model("gated", C)
    dep = dependence(lambda x: logits(m, x), torch.randn(1, C, 5, 5), n_out(m.cfg))
    assert (dep == before).all()
    m = tiny_model("pixelcnn", C, n_layers=2)
    dep = dependence(lambda x: logits(m, x), torch.randn(1, C, 5, 5), n_out(m.cfg))
    assert (before & ~dep).any()


@pytest.mark.parametrize("arch,C", [("gated", 1), ("gated", 3), ("pixelcnn", 3)])
def test_likelihood_sums_to_one_over_all_images(arch, C, float64):
    """p(x) over every 2x2 image with 2 levels per channel (2^(4C) images) sums to 1: an exact likelihood."""
    m = tiny_model(arch, C, size=2, hidden=6, n_layers=2, levels=2)
    D = C * 4
    bits = (torch.arange(2 ** D)[:, None] >> torch.arange(D)) & 1  # every binary image, [2^D, D]
    x = (bits * 128).to(torch.uint8).view(-1, C, 2, 2)  # 0 -> level 0, 128 -> level 1
    with torch.no_grad():
        bpd = torch.cat([m(xb[None], None)[0].view(1) for xb in x[:4]])  # forward's bits/dim of single images
        q = m.quantize(x)
        logp = m.logp(logits(m, m.net_input(q)), q).flatten(1).sum(1)  # nats per image
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(bpd, -logp[:4] / (D * math.log(2)), atol=1e-5)


def test_logistic_mixture_sums_to_one_and_matches_cdf_differences(float64):
    torch.manual_seed(0)
    B, K = 6, 3
    params = torch.cat([torch.randn(B, K), torch.rand(B, K) * 3 - 1.5, torch.rand(B, K) * 8 - 6], 1)
    params[0, 2 * K:] = -7.0  # the sharpest scale the clamp allows
    v = torch.arange(256).expand(B, -1)
    p = pixelcnn.logistic_mix_logp(params[:, :, None].expand(-1, -1, 256), v).exp()  # [B, 256]
    # bins whose mass underflows 1e-5 use PixelCNN++'s density-at-the-centre approximation: errors < 2e-5
    assert torch.allclose(p.sum(1), torch.ones(B), atol=2e-5)
    # independently: sum_k pi_k (sigmoid((hi - mu)/s) - sigmoid((lo - mu)/s)), edges -inf and +inf
    pi, mu, s = params[:, :K].softmax(1), params[:, K:2 * K], params[:, 2 * K:].clamp(min=-7).exp()
    edges = torch.cat([torch.tensor([-math.inf]), torch.arange(255) / 127.5 - 1 + 1 / 255, torch.tensor([math.inf])])
    cdf = torch.sigmoid((edges.view(1, 1, -1) - mu[:, :, None]) / s[:, :, None])  # [B, K, 257]
    ref = (pi[:, :, None] * (cdf[:, :, 1:] - cdf[:, :, :-1])).sum(1)
    assert torch.allclose(p, ref, rtol=1e-6, atol=2e-5) and ref.max() > 0.5


@pytest.mark.parametrize("C,levels", [(1, 4), (1, 256), (3, 16)])
def test_uniform_model_gives_log2_levels_bits_per_dim(C, levels):
    """Zero output layer -> uniform over the levels -> exactly log2(levels) bits/dim, whatever the image."""
    cfg = Config(hidden=6, n_layers=1, kernel=3, levels=levels)
    m = Model(cfg, (C, 6, 6))
    last = m.head[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    x = torch.randint(0, 256, (3, C, 6, 6), dtype=torch.uint8)
    loss, stats = m(x, None)
    assert loss.item() == pytest.approx(math.log2(levels), rel=1e-6)
    # the training stats: 0-dim tensors, detached (read with .item() at log steps only)
    assert stats["bpd"].dim() == 0 and not stats["bpd"].requires_grad and loss.requires_grad


@pytest.mark.parametrize("output,levels", [("softmax", 8), ("logistic_mix", 256)])
def test_logp_of_every_value_matches_logp_of_one(output, levels, float64):
    """What the sampler draws from (log p of every value, [B, L, C, H, W]) is the training likelihood."""
    torch.manual_seed(0)
    m = Model(Config(output=output, levels=levels, n_mix=2, hidden=6, n_layers=1, kernel=3), (3, 4, 4))
    out, q = torch.randn(2, n_out(m.cfg) * 3, 4, 4), torch.randint(0, levels, (2, 3, 4, 4))
    every = m.logp(out)
    assert every.shape == (2, levels, 3, 4, 4)
    assert torch.allclose(every.gather(1, q[:, None]).squeeze(1), m.logp(out, q), atol=1e-12)
    assert torch.allclose(every.exp().sum(1), torch.ones(2, 3, 4, 4), atol=1e-4)


def test_quantization_levels():
    m = Model(Config(hidden=2, n_layers=1, kernel=3, levels=4), (1, 8, 8))
    q = m.quantize(torch.arange(256, dtype=torch.uint8))
    assert torch.bincount(q).tolist() == [64, 64, 64, 64] and q[63] == 0 and q[64] == 1
    # the samples show level q as round(255 q / (L - 1)): a uniform model draws every level
    torch.nn.init.zeros_(m.head[-1].weight)
    torch.nn.init.zeros_(m.head[-1].bias)
    imgs = m.sample(2, torch.Generator().manual_seed(0))
    assert imgs.dtype == torch.uint8 and sorted(imgs.unique().tolist()) == [0, 85, 170, 255]


def test_pick_is_inverse_cdf():
    logp = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(1000, -1)
    u = (torch.arange(1000) + 0.5) / 1000
    assert torch.bincount(pixelcnn.pick(logp, u)).tolist() == [100, 200, 300, 400]
    assert pixelcnn.pick(logp[:1], torch.tensor([1 - 2 ** -24])).item() == 3  # never past L - 1


@pytest.mark.parametrize("arch,n_layers", [("gated", 2), ("pixelcnn", 1)])
def test_cropped_rows_give_the_same_features(arch, n_layers, float64):
    """What the fast sampler computes for row i (only the `reach` rows above it) equals the full network."""
    torch.manual_seed(0)
    m = Model(Config(arch=arch, hidden=6, n_layers=n_layers, kernel=3, levels=4), (3, 8, 6))
    assert m.net.reach < 7  # the crop really drops rows
    x = torch.randn(2, 3, 8, 6)
    full = m.net(x, None)
    for i in range(8):
        lo = max(0, i - m.net.reach)
        if arch == "gated":
            pres = [p[:, :, -1:] for p in m.net.vertical(x[:, :, lo:i + 1], None)]
            row = m.net.horizontal(x[:, :, i:i + 1], pres, None)[:, :, 0]
        else:
            row = m.net(x[:, :, lo:i + 1], None)[:, :, -1]
        assert torch.allclose(row, full[:, :, i], atol=1e-12)


@pytest.mark.parametrize("kw,C", [(dict(arch="gated", levels=4), 1), (dict(arch="gated", output="logistic_mix", n_mix=2), 3),
                                  (dict(arch="pixelcnn", levels=8), 1), (dict(arch="gated", levels=4, conditional=True), 1),
                                  (dict(arch="pixelcnn", levels=4), 3)])
def test_fast_sampler_equals_naive(kw, C, float64):
    torch.manual_seed(0)
    cfg = Config(**{**dict(hidden=6, n_layers=2 if kw["arch"] == "gated" else 1, kernel=3), **kw})
    m = Model(cfg, (C, 7, 5))
    assert m.net.reach < 6
    fast = m.sample(2, torch.Generator().manual_seed(1))
    assert torch.equal(fast, naive_sample(m, 2, torch.Generator().manual_seed(1)))
    assert set(fast.unique().tolist()) <= {round(255 * q / (cfg.levels - 1)) for q in range(cfg.levels)}
    assert not torch.equal(fast, m.sample(2, torch.Generator().manual_seed(2)))  # the noise matters


def check_outputs(out_dir, res, n_images, shape):
    for name in ("ckpt.pt", "samples.png", "loss.png", "log.txt", "results.json", "samples.npz"):
        assert (out_dir / name).exists(), name
    saved = json.loads((out_dir / "results.json").read_text())
    for key in ("test_bpd", "test_bpd_kind", "train_images_per_s", "sample_images_per_s", "steps", "wall_s", "device", "config"):
        assert key in saved and key in res, key
    assert all(math.isfinite(saved[k]) for k in ("test_bpd", "train_images_per_s", "sample_images_per_s", "wall_s"))
    imgs = np.load(out_dir / "samples.npz")["images"]
    assert imgs.dtype == np.uint8 and imgs.shape == (n_images, *shape)
    return saved


def test_train_in_process_learns(data_dir, tmp_path):
    cfg = Config(**{**TINY, "max_steps": 25, "lr": 1e-2}, dataset="mnist", data_dir=str(data_dir),
                 out_dir=str(tmp_path), levels=4)
    res = pixelcnn.train(cfg)
    saved = check_outputs(tmp_path, res, 4, (1, 28, 28))
    assert saved["steps"] == 25 and saved["test_bpd_kind"] == "exact, quantized to 4 levels"
    assert saved["test_bpd"] < 1.3  # uniform is log2(4) = 2 bits/dim; the synthetic images are mostly dark
    assert set(np.unique(np.load(tmp_path / "samples.npz")["images"])) <= {0, 85, 170, 255}


def test_cli_conditional(cli, data_dir, tmp_path):
    args = [f"--{k}={v}" for k, v in TINY.items()]
    r = cli("pixelcnn.py", *args, "--dataset", "fashion", "--data_dir", data_dir, "--out_dir", tmp_path,
            "--levels", "8", "--conditional", "yes", "--n_samples", "10", "--n_layers", "1", "--hidden", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("FINAL pixelcnn fashion test_bpd=")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["conditional"] is True and saved["steps"] == 3
    assert saved["test_bpd_kind"] == "exact, quantized to 8 levels, conditional on the true class"
    assert np.load(tmp_path / "samples.npz")["images"].shape == (10, 1, 28, 28)  # one column per class


def test_rgb_logistic_mix(data_dir, tmp_path, cifar_no_md5, monkeypatch):
    import torchvision.datasets.cifar  # CIFAR10._load_meta checks batches.meta's md5 with this function too
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    cfg = Config(**{**TINY, "hidden": 6, "n_layers": 1, "n_samples": 1, "max_steps": 2}, dataset="cifar10",
                 data_dir=str(data_dir), out_dir=str(tmp_path), output="logistic_mix", n_mix=2)
    res = pixelcnn.train(cfg)
    saved = check_outputs(tmp_path, res, 1, (3, 32, 32))
    assert saved["test_bpd_kind"] == "exact" and 0 < saved["test_bpd"] < 10


def test_resume_eval_only_and_nan(data_dir, tmp_path, monkeypatch):
    base = dict(TINY, dataset="mnist", data_dir=str(data_dir), out_dir=str(tmp_path), levels=4, n_samples=1)
    pixelcnn.train(Config(**{**base, "max_steps": 2}))
    res = pixelcnn.train(Config(**{**base, "max_steps": 4, "resume": True}))
    log = (tmp_path / "log.txt").read_text()
    assert res["steps"] == 4 and "at step 2" in log and "step 3/4" in log and "step 1/4" not in log
    again = pixelcnn.train(Config(**{**base, "eval_only": True, "hidden": 99}))  # the checkpoint's model wins
    assert again["steps"] == 4 and again["test_bpd"] == pytest.approx(res["test_bpd"], rel=1e-6)
    assert again["config"]["hidden"] == 8
    more = pixelcnn.train(Config(**{**base, "max_steps": 6, "resume": True, "hidden": 16}))  # so on --resume
    assert more["steps"] == 6 and more["config"]["hidden"] == 8
    assert "its architecture: {" in (tmp_path / "log.txt").read_text()
    nan = lambda self, x, y=None: (torch.tensor(float("nan"), requires_grad=True), {})
    monkeypatch.setattr(Model, "forward", nan)
    with pytest.raises(SystemExit, match="training loss diverged at step 7 \\(nan\\); the last good ckpt.pt is kept"):
        pixelcnn.train(Config(**{**base, "max_steps": 8, "resume": True}))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("kw,match", [
    (dict(output="logistic_mix", levels=4), "256 for --output logistic_mix; got 4"),
    (dict(levels=1), r"--levels must be in 2\.\.256"), (dict(levels=257), r"--levels must be in 2\.\.256"),
    (dict(dataset="cifar10", hidden=8), "multiple of 3"), (dict(dtype="bfloat16"), "bfloat16"),
    (dict(arch="lstm"), "unknown arch"), (dict(log_every=0), "--log_every must be >= 1, got 0"),
    (dict(n_samples=0), "--n_samples must be >= 1"), (dict(lr=-1.0), "--lr must be >= 0")])
def test_bad_config(kw, match, tmp_path):
    with pytest.raises(SystemExit, match="pixelcnn.py: error: .*" + match):
        pixelcnn.train(Config(**{**TINY, "out_dir": str(tmp_path), **kw}))


def test_bad_files(tmp_path, data_dir):
    with pytest.raises(SystemExit, match="no checkpoint"):
        pixelcnn.train(Config(**TINY, out_dir=str(tmp_path), eval_only=True))
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="is not a checkpoint these files wrote"):
        pixelcnn.train(Config(**TINY, out_dir=str(tmp_path), resume=True))
    with pytest.raises(SystemExit, match="no mnist in --data_dir"):
        pixelcnn.train(Config(**TINY, dataset="mnist", data_dir=str(tmp_path / "nothing"), out_dir=str(tmp_path / "o")))


def test_command_line_error_is_one_line(tmp_path):
    """Through parse_args as the command line does (the cli fixture costs a slow interpreter start)."""
    with pytest.raises(SystemExit) as e:
        pixelcnn.train(pixelcnn.parse_args(["--output", "logistic_mix", "--levels", "4", "--out_dir", str(tmp_path),
                                            "--device", "cpu"]))
    assert str(e.value) == "pixelcnn.py: error: --levels must be in 2..256, and 256 for --output logistic_mix; got 4"


def test_parse_args():
    cfg = pixelcnn.parse_args(["--levels", "4", "--conditional", "yes", "--arch=pixelcnn", "--lr", "3e-4"])
    assert (cfg.levels, cfg.conditional, cfg.arch, cfg.lr, cfg.output) == (4, True, "pixelcnn", 3e-4, "softmax")


def test_metrics_end_to_end(data_dir, tmp_path):
    pytest.importorskip("metrics")
    res = pixelcnn.train(Config(**{**TINY, "fid_samples": 20, "n_layers": 1, "hidden": 4}, dataset="mnist",
                                data_dir=str(data_dir), out_dir=str(tmp_path), levels=4))
    assert all(math.isfinite(res[k]) for k in ("fid", "precision", "recall"))
    assert np.load(tmp_path / "samples.npz")["images"].shape == (20, 1, 28, 28)


def test_binarize_draws_bernoulli_of_the_intensity():
    x = torch.tensor([0, 64, 128, 255], dtype=torch.uint8).repeat(20000, 1)
    b = pixelcnn.binarize(x, torch.Generator().manual_seed(0))
    assert b.dtype == torch.uint8 and set(b.unique().tolist()) <= {0, 255}
    assert torch.allclose(b.float().mean(0) / 255, x[0] / 255, atol=0.01)  # P(white) = pixel / 255
    assert not torch.equal(b, pixelcnn.binarize(x, torch.Generator().manual_seed(1)))  # fresh draws


def test_cli_binarize(cli, data_dir, tmp_path):
    args = [f"--{k}={v}" for k, v in TINY.items()]
    r = cli("pixelcnn.py", *args, "--dataset", "mnist", "--data_dir", data_dir, "--out_dir", tmp_path,
            "--binarize", "--n_layers", "1", "--hidden", "4", "--test_images", "7")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["levels"] == 2 and saved["config"]["binarize"] is True
    assert saved["test_images"] == 7
    assert saved["test_bpd_kind"] == "exact, binarized (the test split once, seed 0), the first 7 test images"
    assert saved["test_nats"] == pytest.approx(saved["test_bpd"] * 784 * math.log(2))
    assert 0 < saved["test_bpd"] < 2  # a uniform 2-level model has 1 bit/dim; the images are mostly black
    assert set(np.unique(np.load(tmp_path / "samples.npz")["images"])) <= {0, 255}


def test_binarized_test_split_is_fixed(data_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pixelcnn, "evaluate", lambda model, x, y, cfg: seen.append(x.clone()) or {"test_bpd": 1.0})
    base = dict(TINY, dataset="mnist", data_dir=str(data_dir), binarize=True)
    pixelcnn.train(Config(**base, out_dir=str(tmp_path / "a"), seed=0))
    pixelcnn.train(Config(**base, out_dir=str(tmp_path / "b"), seed=5))
    assert torch.equal(seen[0], seen[1]) and set(seen[0].unique().tolist()) <= {0, 255}


def test_evaluation_uses_the_ema_weights_which_survive_resume(data_dir, tmp_path, monkeypatch):
    base = dict(TINY, dataset="mnist", data_dir=str(data_dir), levels=4, lr=1e-2, ema=0.9, n_samples=1,
                eval_every=2, test_images=16)
    del base["max_steps"]
    res = pixelcnn.train(Config(**base, out_dir=str(tmp_path / "a"), max_steps=4))
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    cfg = Config(**base, out_dir=str(tmp_path / "a"))
    x, y = pixelcnn.load_split(pixelcnn.Config(dataset="mnist", data_dir=str(data_dir)), train=False)
    scores = {}
    for key in ("ema", "model"):
        model = Model(cfg, (1, 28, 28))
        model.load_state_dict(ckpt[key])
        scores[key] = pixelcnn.evaluate(model, x, y, cfg)["test_bpd"]
    assert res["test_bpd"] == pytest.approx(scores["ema"], rel=1e-6)
    assert abs(scores["ema"] - scores["model"]) > 1e-4  # the average is not the last weights
    evaluate, calls = pixelcnn.evaluate, []
    def killed_at_the_second_evaluation(*args):  # step 4: ckpt.pt still holds step 2
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args)
    monkeypatch.setattr(pixelcnn, "evaluate", killed_at_the_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        pixelcnn.train(Config(**base, out_dir=str(tmp_path / "b"), max_steps=4))
    monkeypatch.setattr(pixelcnn, "evaluate", evaluate)
    pixelcnn.train(Config(**base, out_dir=str(tmp_path / "b"), max_steps=4, resume=True))
    resumed = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["ema"]
    assert all(torch.allclose(resumed[k], ckpt["ema"][k], atol=1e-6) for k in resumed)


def test_ema_zero_evaluates_the_last_weights(data_dir, tmp_path):
    pixelcnn.train(Config(**TINY, dataset="mnist", data_dir=str(data_dir), out_dir=str(tmp_path), levels=4, ema=0.0))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
