"""Tests for nice.py: exact invertibility, log-det against autograd, the prior's normalization, bpd units,
a real learning check on a 2-D toy set, end-to-end runs (in-process and CLI), checkpoints and errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import nice

TINY = dict(hidden=16, batch_size=32, fid_samples=0, eval_every=10, log_every=5, n_samples=16)


def bpd(loglik_nats, D):  # the units of the docstring: y = (x + u) / 256 on [0, 1)^D, 8-bit x
    return (-loglik_nats + D * math.log(256)) / (D * math.log(2))


def random_flow(D=6, K=3, prior="logistic"):
    torch.manual_seed(0)
    model = nice.NICE(nice.Config(n_couplings=K, hidden=16, prior=prior), D).double()
    with torch.no_grad():
        model.s.normal_()  # a non-trivial scaling layer
    return model


def identity_flow(D, prior="logistic", s=0.0):  # couplings that add 0: log p(x) = log p_H(exp(s) x) + sum(s)
    model = nice.NICE(nice.Config(n_couplings=2, hidden=8, prior=prior), D).double()
    with torch.no_grad():
        for c in model.couplings:
            c.m[-1].weight.zero_()
            c.m[-1].bias.zero_()
        model.s.fill_(s)
    return model


def test_every_layer_and_the_flow_invert_float64():
    model = random_flow()
    x = torch.randn(5, 6, dtype=torch.float64)
    for c in model.couplings:
        y = c(x)
        assert not torch.allclose(y, x)  # the layer does something...
        assert torch.allclose(c(y, reverse=True), x, atol=1e-8, rtol=0)  # ...and undoes it exactly
        assert torch.equal(y.reshape(5, 3, 2)[..., c.parity], x.reshape(5, 3, 2)[..., c.parity])  # I1 untouched
    z, _ = model.forward_flow(x)
    assert torch.allclose(model.inverse(z), x, atol=1e-8, rtol=0)
    zs = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(model.forward_flow(model.inverse(zs))[0], zs, atol=1e-8, rtol=0)


def test_logdet_equals_bruteforce_jacobian():
    model = random_flow()
    x = torch.randn(3, 6, dtype=torch.float64)
    _, logdet = model.forward_flow(x)
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda v: model.forward_flow(v[None])[0][0], x[i])
        assert torch.allclose(logdet[i], torch.linalg.slogdet(J)[1], atol=1e-8)
        Jc = torch.autograd.functional.jacobian(lambda v: model.couplings[0](v[None])[0], x[i])
        assert abs(torch.linalg.det(Jc).item() - 1) < 1e-10  # additive coupling: volume preserving


@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_prior_density_integrates_to_one(prior):
    model = identity_flow(2, prior)  # log p(z, 0) - log p(0, 0) / 2 = log p_H(z): the 1-D prior density
    z = torch.linspace(-60, 60, 200_001, dtype=torch.float64)
    points = torch.stack([z, torch.zeros_like(z)], 1)
    p = (model.log_prob(points) - model.log_prob(0 * points[:1]) / 2).exp()  # [N]
    assert abs(torch.trapezoid(p, z).item() - 1) < 1e-6
    var = torch.trapezoid(p * z ** 2, z).item()
    assert var == pytest.approx(math.pi ** 2 / 3 if prior == "logistic" else 1.0, rel=1e-5)


@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_log_prob_against_torch_distributions(prior):
    model = random_flow(prior=prior)
    x = torch.randn(4, 6, dtype=torch.float64)
    h = x
    for c in model.couplings:  # composed by hand, then the scaling layer
        h = c(h)
    z = h * model.s.exp()
    logistic = torch.distributions.TransformedDistribution(  # standard logistic = logit(U(0, 1))
        torch.distributions.Uniform(torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)),
        [torch.distributions.transforms.SigmoidTransform().inv])
    gaussian = torch.distributions.Normal(torch.zeros(6, dtype=torch.float64), 1.0)
    expected = (logistic if prior == "logistic" else gaussian).log_prob(z).sum(1) + model.s.sum()
    assert torch.allclose(model.log_prob(x), expected, atol=1e-10)


@pytest.mark.parametrize("prior,var", [("logistic", math.pi ** 2 / 3), ("gaussian", 1.0)])
def test_samples_follow_the_prior_and_the_scaling(prior, var):
    model = identity_flow(2, prior, s=math.log(2)).float()  # samples: the prior's draws times exp(-s) = 1/2
    g = torch.Generator().manual_seed(0)
    x = model.sample(200_000, g)
    assert x.var(0).tolist() == pytest.approx([0.25 * var] * 2, rel=0.03)
    same = [model.sample(5, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*same)  # the same generator seed gives the same samples


def test_bfloat16_autocast_keeps_the_flow_in_float32():
    model = random_flow().float()
    x = torch.randn(8, 6)
    full, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CUDA path's autocast, run on the CPU
        half, _ = model(x)
        z, _ = model.forward_flow(x)
    assert half.dtype == z.dtype == torch.float32 and abs(half.item() - full.item()) < 0.05


def test_bpd_units_and_the_paper_number():
    # the paper's MNIST log-likelihood 1980.50 nats on [0,1]^784 is 4.36 bits/dim in 8-bit units
    assert bpd(1980.50, 784) == pytest.approx(4.3555, abs=1e-4)
    # evaluate() against an independent density: identity couplings, s set, a product of scaled logistics
    cfg = nice.Config(dataset="mnist", seed=3)
    model = identity_flow(8).float()
    with torch.no_grad():
        model.s.copy_(torch.linspace(0.5, 3.0, 8))
    x = torch.randint(0, 256, (300, 2, 2, 2), dtype=torch.uint8)
    res = nice.evaluate(model, x, cfg)
    y = (x.float() + torch.rand(x.shape, generator=torch.Generator().manual_seed(cfg.seed + 1))) / 256
    scale = (-model.s.detach()).exp().double()
    dens = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)),
        [torch.distributions.transforms.SigmoidTransform().inv, torch.distributions.AffineTransform(0.0, scale)])
    nll = -dens.log_prob(y.reshape(300, 8).double()).sum(1).mean().item()
    assert res["test_loglik_nats"] == pytest.approx(-nll, rel=1e-5)
    assert res["test_bpd"] == pytest.approx((nll + 8 * math.log(256)) / (8 * math.log(2)), rel=1e-5)
    assert res["test_bpd"] == pytest.approx(bpd(res["test_loglik_nats"], 8))


def test_training_on_8gaussians_learns_a_density():
    x_train = nice.toy_data("8gaussians", 50_000, 0)
    x_test = nice.toy_data("8gaussians", 5_000, 1)
    cfg = nice.Config(dataset="8gaussians", hidden=32)
    torch.manual_seed(0)
    model = nice.NICE(cfg, 2)
    nll0 = nice.evaluate(model, x_test, cfg)["test_nll_nats"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        loss, _ = model(x_train[torch.randint(len(x_train), (512,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    nll = nice.evaluate(model, x_test, cfg)["test_nll_nats"]
    # the best single Gaussian (data mean and covariance) is an independent bar the flow must clear
    gauss = -torch.distributions.MultivariateNormal(x_train.mean(0), torch.cov(x_train.T)).log_prob(x_test).mean()
    assert nll < nll0 - 0.7 and nll < gauss.item() - 0.5, (nll0, nll, gauss.item())


def test_stats_are_detached_0dim_tensors():
    loss, stats = random_flow()(torch.randn(4, 6, dtype=torch.float64))
    assert loss.requires_grad and stats["nll_nats"].shape == () and not stats["nll_nats"].requires_grad


def test_train_in_process_on_mnist_files(data_dir, tmp_path):
    res = nice.train(nice.Config(dataset="mnist", data_dir=str(data_dir), out_dir=str(tmp_path), max_steps=20, **TINY))
    for f in ("ckpt.pt", "samples.png", "samples.npz", "loss.png", "log.txt", "results.json"):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "results.json").read_text())
    for k in ("test_bpd", "test_bpd_kind", "train_images_per_s", "steps", "wall_s", "device", "config",
              "test_loglik_nats"):
        assert k in saved, k
    assert saved["steps"] == 20 and saved["test_bpd_kind"] == "exact" and 0 < saved["test_bpd"] < 12
    assert saved["test_bpd"] == pytest.approx(bpd(saved["test_loglik_nats"], 784))
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (16, 1, 28, 28)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = nice.NICE(nice.Config(**ck["config"]), 784)
    model.load_state_dict(ck["model"])  # the checkpoint alone rebuilds the model
    assert ck["step"] == 20 and res["test_bpd"] == saved["test_bpd"]


def test_cli_fashion_then_resume_then_eval_only(cli, data_dir, tmp_path, capsys):
    args = ["--dataset", "fashion", "--data_dir", str(data_dir), "--out_dir", str(tmp_path), "--fid_samples", "0",
            "--hidden", "16", "--batch_size", "32", "--eval_every", "10", "--log_every", "5"]
    r = cli("nice.py", *args, "--max_steps", "10")
    assert r.returncode == 0, r.stderr
    final = r.stdout.strip().splitlines()[-1]
    assert final.startswith("FINAL nice fashion val_bpd=") and " test_bpd=" in final
    # resume and eval_only through parse_args, in-process (each subprocess costs seconds of importing torch)
    nice.train(nice.parse_args([*args, "--max_steps", "20", "--resume", "true"]))
    out = capsys.readouterr().out
    assert "loaded" in out and "at step 10" in out and "step 15/20" in out and "step 5/" not in out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 20
    # eval_only rebuilds the architecture from the checkpoint, whatever --hidden says now
    res = nice.train(nice.parse_args([*args[:-6], "--hidden", "999", "--eval_only", "true"]))
    assert res["steps"] == 20 and res["config"]["hidden"] == 16
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 20


def test_cli_toy_under_torchrun_writes_density(tmp_path):
    # the command line on a toy set, launched by torchrun as two gloo processes (DDP): only rank 0 prints and writes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "nice.py",
           "--dataset", "moons", "--out_dir", str(tmp_path), "--max_steps", "100", "--hidden", "16", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=os.path.dirname(nice.__file__), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "density.png").exists() and (tmp_path / "loss.png").exists()
    res = json.loads((tmp_path / "results.json").read_text())
    assert "test_bpd" not in res and math.isfinite(res["test_nll_nats"]) and res["steps"] == 100
    assert "test_nll_nats=" in r.stdout.strip().splitlines()[-1] and r.stdout.count("FINAL") == 1
    log = (tmp_path / "log.txt").read_text()
    assert "processes 2" in log and log.count("FINAL") == 1


def test_cli_errors_are_one_line(cli, tmp_path):
    r = cli("nice.py", "--dataset", "checkerboard", "--lr", "-1", "--out_dir", tmp_path)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "nice.py: error: --lr must be >= 0, got -1.0" in r.stderr


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="mnist", data_dir="/nonexistent"), "--data_dir"),
    (dict(dataset="moons", lr=-1.0), "--lr must be >= 0"),
    (dict(dataset="moons", resume=True), "no checkpoint"),
    (dict(dataset="moons", device="cuda:99"), "--device cuda:99 is not available"),
    (dict(dataset="moons", val_images=100_000), "--val_images 100000 must be < the 100000 examples"),
])
def test_bad_config_errors(kw, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        nice.train(nice.Config(out_dir=str(tmp_path), **kw))


def test_the_validation_split_is_a_fixed_draw_disjoint_from_training():
    x = torch.arange(1000)  # the indices of a training split
    train, val = nice.hold_out(x, nice.Config(val_images=100, seed=0))
    assert len(val) == 100 and len(train) == 900
    assert sorted(torch.cat([train, val]).tolist()) == list(range(1000))  # disjoint, and all of them
    again, val5 = nice.hold_out(x, nice.Config(val_images=100, seed=5))  # --seed does not move it
    assert torch.equal(val, val5) and torch.equal(train, again)
    assert not torch.equal(val, torch.arange(900, 1000))  # a draw, not the last images
    assert len(nice.hold_out(torch.arange(60_000), nice.Config())[1]) == 10_000  # MNIST: the paper's 10,000
    assert len(nice.hold_out(torch.arange(512), nice.Config())[1]) == 102  # a small split: a fifth
    assert len(nice.hold_out(x, nice.Config(val_images=0))[1]) == 0


def test_training_batches_never_contain_a_validation_point(tmp_path, monkeypatch):
    cfg = nice.Config(dataset="moons", out_dir=str(tmp_path), hidden=8, max_steps=20, eval_every=10,
                      log_every=10)
    seen = []
    real = nice.NICE.forward
    def recording(self, x):  # the training forward only: evaluation calls log_prob
        seen.append(x.detach().clone())
        return real(self, x)
    monkeypatch.setattr(nice.NICE, "forward", recording)
    res = nice.train(cfg)
    train, val = nice.hold_out(nice.load_split(nice.Config(dataset="moons", data_dir=""), train=True)[0], cfg)
    rows = {tuple(p) for p in torch.cat(seen).tolist()}
    assert len(seen) == 20 and len(rows) > 5000  # 20 batches of 512 points, almost all distinct
    assert not rows & {tuple(p) for p in val.tolist()}  # 10,000 points: 1,000 would be drawn otherwise
    assert rows <= {tuple(p) for p in train.tolist()}
    assert res["config"]["val_images"] == len(val) == 10_000 and math.isfinite(res["val_nll_nats"])


def test_the_reported_test_number_is_the_best_validation_model_and_resume_keeps_it(data_dir, tmp_path, monkeypatch):
    cfg = dict(dataset="mnist", data_dir=str(data_dir), out_dir=str(tmp_path), val_images=64, **TINY)
    first = nice.train(nice.Config(max_steps=30, **cfg))
    real = nice.NICE.forward
    def ascent(self, x):  # the resumed steps climb the NLL (once Adam's momentum has turned round)
        loss, stats = real(self, x)
        return -loss, stats
    monkeypatch.setattr(nice.NICE, "forward", ascent)
    res = nice.train(nice.Config(max_steps=60, resume=True, **{**cfg, "eval_every": 25}))
    saved = json.loads((tmp_path / "results.json").read_text())
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    curve = dict(ck["curves"]["test"])  # step -> validation bpd (loss.png's "test" curve, y label val_bpd)
    assert sorted(curve) == [10, 20, 30, 50, 60] and min(curve[50], curve[60]) > min(curve.values())
    assert saved["selected_step"] == first["selected_step"] == ck["best"]["step"]
    assert saved["selected_step"] == min(curve, key=curve.get) <= 30  # chosen before the resume
    assert saved["val_bpd"] == min(curve.values()) and saved["steps"] == 60 and ck["step"] == 60
    assert saved["test_bpd"] == res["test_bpd"] == first["test_bpd"]  # the same weights, kept by --resume
    model = nice.NICE(nice.Config(**ck["config"]), 784)
    x_test = nice.load_split(nice.Config(dataset="mnist", data_dir=str(data_dir)), train=False)[0]
    model.load_state_dict(ck["best"]["model"])
    assert nice.evaluate(model, x_test, nice.Config(**ck["config"]))["test_bpd"] == saved["test_bpd"]
    model.load_state_dict(ck["model"])  # the last weights: worse, and not the ones reported
    assert nice.evaluate(model, x_test, nice.Config(**ck["config"]))["test_bpd"] > saved["test_bpd"]


def test_the_learning_rate_follows_the_official_decay():
    cfg = nice.Config(dataset="mnist")
    lrs = [nice.learning_rate(cfg, t) for t in (0, 1, 1000, 4606, 4607, 10 ** 7)]
    assert lrs[0] == 1e-3 and lrs[1] == pytest.approx(1e-3 / 1.0005)  # pylearn2: lr0 / 1.0005^t
    assert lrs[2] == pytest.approx(1e-3 / 1.0005 ** 1000) and lrs[3] > 1e-4  # 1.0005^4607 > 10 > 1.0005^4606
    assert lrs[4] == lrs[5] == pytest.approx(1e-4)  # the official floor, min_lr 1e-4
    assert nice.learning_rate(nice.Config(dataset="mnist", lr_decay=0), 10 ** 5) == 1e-3  # 0: constant
    toy = nice.Config(dataset="moons")
    assert nice.learning_rate(toy, 0) == toy.lr  # toy sets: ours, a cosine decay to 0
    assert nice.learning_rate(toy, toy.max_steps) == pytest.approx(0)


def test_odd_dimension_is_an_error():
    with pytest.raises(RuntimeError):  # the even/odd partition needs an even D
        nice.NICE(nice.Config(n_couplings=1, hidden=4), 5)(torch.zeros(1, 5))


def test_checkpoint_errors_and_nan_keeps_last_good(tmp_path):
    cfg = dict(dataset="checkerboard", out_dir=str(tmp_path), hidden=8, batch_size=64, eval_every=10, log_every=1)
    nice.train(nice.Config(max_steps=10, **cfg))
    good = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="diverged at step .*; the last good ckpt.pt is kept"):
        nice.train(nice.Config(max_steps=30, resume=True, **{**cfg, "lr": 1e30}))
    assert (tmp_path / "ckpt.pt").read_bytes() == good  # never overwritten by a bad model
    with pytest.raises(SystemExit, match="checkpoint of checkerboard, not nice.py's of fashion"):
        nice.train(nice.Config(out_dir=str(tmp_path), eval_only=True))  # --dataset: the default, fashion
    res = nice.train(nice.Config(out_dir=str(tmp_path), dataset="checkerboard", eval_only=True))
    assert res["config"]["dataset"] == "checkerboard" and res["steps"] == 10 and math.isfinite(res["test_nll_nats"])
    # another architecture on the command line: the checkpoint's wins, and the log says so
    res = nice.train(nice.Config(max_steps=12, resume=True, **{**cfg, "hidden": 9}))
    assert res["config"]["hidden"] == 8 and res["steps"] == 12
    assert "its architecture: {" in (tmp_path / "log.txt").read_text()
    (tmp_path / "ckpt.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(SystemExit, match="is not a checkpoint these files wrote"):
        nice.train(nice.Config(max_steps=20, resume=True, **cfg))


def test_parse_args():
    cfg = nice.parse_args(["--dataset", "8gaussians", "--resume", "yes", "--lr=0.01", "--prior", "gaussian"])
    assert cfg.dataset == "8gaussians" and cfg.resume is True and cfg.lr == 0.01 and cfg.prior == "gaussian"
    with pytest.raises(SystemExit):
        nice.parse_args(["--dataset", "imagenet"])
    toy, img = nice.Config(dataset="moons"), nice.Config(dataset="mnist")  # 0: the dataset's default
    assert toy.hidden < img.hidden and img.hidden == 1000 and img.n_couplings == 4 and toy.n_couplings == 8
    assert nice.Config(dataset="moons", hidden=5).hidden == 5


def test_fid_end_to_end(data_dir, tmp_path):
    pytest.importorskip("metrics")
    res = nice.train(nice.Config(dataset="mnist", data_dir=str(data_dir), out_dir=str(tmp_path), max_steps=5,
                                 **{**TINY, "fid_samples": 64}))
    assert math.isfinite(res["fid"]) and 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1


def test_train_cifar10_files(data_dir, tmp_path, cifar_no_md5):
    res = nice.train(nice.Config(dataset="cifar10", data_dir=str(data_dir), out_dir=str(tmp_path), max_steps=5,
                                 **{**TINY, "n_samples": 4}))
    assert res["config"]["hidden"] == 16 and math.isfinite(res["test_bpd"]) and (tmp_path / "samples.png").exists()
    assert res["test_bpd"] == pytest.approx(bpd(res["test_loglik_nats"], 3 * 32 * 32))
