import dataclasses
import json
import math
import os

import pytest
import torch

import vae


def tiny(data_dir, tmp_path, **kw):
    base = dict(dataset="mnist", data_dir=str(data_dir), out_dir=str(tmp_path / "run"), hidden=8, latent_dim=4,
                batch_size=16, max_steps=6, log_every=2, eval_every=4, iwae_k=4, iwae_images=16,
                fid_samples=0, device="cpu", n_samples=16)
    return vae.Config(**{**base, **kw})


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(vae.gaussian_kl(mu, logvar), mc, atol=0.03)


def test_reparameterization_gradients_reach_mu_and_logvar(data_dir, tmp_path):
    model = vae.VAE(tiny(data_dir, tmp_path), 1, 28)
    loss, _ = model(torch.rand(4, 1, 28, 28))
    loss.backward()
    head = model.encoder[-1]  # the layer that outputs [mu, logvar]
    latent = model.cfg.latent_dim
    assert head.weight.grad[:latent].abs().sum() > 0 and head.weight.grad[latent:].abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.3, -4.0), (-0.9, 0.0), (1.0, -6.0)])
def test_discretized_logistic_sums_to_one(mean, log_scale):
    x = torch.arange(256, dtype=torch.float64) / 255
    logp = vae.discretized_logistic_logp(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert torch.logsumexp(logp, 0).exp().item() == pytest.approx(1.0, abs=2e-3)
    assert (logp <= 1e-9).all()


def test_discretized_logistic_matches_direct_cdf_difference():
    """Independent computation: P(bin) = CDF(upper edge) - CDF(lower edge), edge bins take the tails."""
    mean, s = torch.tensor(0.2, dtype=torch.float64), 0.15
    k = torch.arange(256, dtype=torch.float64)
    centre = 2 * k / 255 - 1
    upper = torch.where(k == 255, torch.tensor(math.inf), centre + 1 / 255)
    lower = torch.where(k == 0, torch.tensor(-math.inf), centre - 1 / 255)
    p = torch.sigmoid((upper - mean) / s) - torch.sigmoid((lower - mean) / s)
    logp = vae.discretized_logistic_logp(k / 255, mean.expand(256), torch.full((256,), math.log(s), dtype=torch.float64))
    assert torch.allclose(logp.exp(), p, atol=1e-8)


def test_iwae_k1_equals_single_sample_elbo_and_is_tighter(data_dir, tmp_path):
    torch.manual_seed(0)
    cfg = tiny(data_dir, tmp_path, likelihood="gaussian_learned_sigma")
    model = vae.VAE(cfg, 1, 28).double()
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    eps = torch.randn(1, 6, cfg.latent_dim, dtype=torch.float64)
    # independent single-sample ELBO: log p(x|z) + log N(z; 0, I) - log q(z|x) with torch.distributions
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps[0]
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    elbo = (model.log_px_given_z(x, model.decoder(z)) + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
            - q.log_prob(z).sum(1))
    assert torch.allclose(model.log_weights(x, eps)[0], elbo, atol=1e-9)
    # log (1/K) sum_k w_k >= mean_k log w_k (Jensen) for every image, and on average beats K=1
    lw = model.log_weights(x, torch.randn(64, 6, cfg.latent_dim, dtype=torch.float64))
    iwae = torch.logsumexp(lw, 0) - math.log(64)
    assert (iwae >= lw.mean(0) - 1e-9).all()
    assert iwae.mean() > lw.mean()


@pytest.mark.parametrize("likelihood", vae.CHOICES["likelihood"])
def test_train_end_to_end_every_likelihood(data_dir, tmp_path, likelihood):
    cfg = tiny(data_dir, tmp_path, likelihood=likelihood, binarize=likelihood == "bernoulli")
    res = vae.train(cfg)
    for name in ("ckpt.pt", "recon.png", "samples.png", "loss.png", "log.txt", "results.json"):
        assert os.path.exists(os.path.join(cfg.out_dir, name)), name
    assert math.isfinite(res["test_elbo_nats"]) and res["steps"] == 6
    assert res["test_elbo_nats"] == pytest.approx(res["test_rec_nats"] + res["test_kl_nats"])
    assert math.isfinite(res["test_iwae4_nats"]) and res["iwae_test_images"] == 16  # first 16: not the ELBO's set
    assert ("test_bpd" in res) == (likelihood == "logistic")
    assert res["test_iwae4_nats"] <= res["test_elbo_nats"] + 50  # same images would give <=; these are the first 16


def test_cifar10_shapes(data_dir, tmp_path, cifar_no_md5):
    res = vae.train(tiny(data_dir, tmp_path, dataset="cifar10", max_steps=2, iwae_k=0))
    assert res["test_bpd_kind"] == "elbo" and math.isfinite(res["test_bpd"])


def test_training_lowers_the_test_elbo(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path, max_steps=60, eval_every=1000, log_every=30, iwae_k=0, hidden=16, batch_size=32)
    first = vae.train(dataclasses.replace(cfg, max_steps=1, out_dir=str(tmp_path / "one")))
    assert vae.train(cfg)["test_elbo_nats"] < first["test_elbo_nats"] - 200


def test_resume_continues_from_saved_step(data_dir, tmp_path):
    vae.train(tiny(data_dir, tmp_path, max_steps=4))
    res = vae.train(tiny(data_dir, tmp_path, max_steps=8, resume=True))
    assert res["steps"] == 8
    log = open(os.path.join(tmp_path, "run", "log.txt")).read()
    assert "loaded" in log and "at step 4" in log and "step 6/8" in log and "step 2/8" not in log


def test_eval_only_rebuilds_model_from_checkpoint(data_dir, tmp_path):
    trained = vae.train(tiny(data_dir, tmp_path, latent_dim=6))
    # the command line says latent_dim 4, the checkpoint says 6: the checkpoint wins
    res = vae.train(tiny(data_dir, tmp_path, eval_only=True))
    assert res["config"]["latent_dim"] == 6 and res["steps"] == trained["steps"]
    assert res["test_elbo_nats"] == pytest.approx(trained["test_elbo_nats"], rel=1e-5)


def test_metrics_are_wired_in(data_dir, tmp_path):
    pytest.importorskip("metrics")
    res = vae.train(tiny(data_dir, tmp_path, fid_samples=64, iwae_k=0))
    assert math.isfinite(res["fid"]) and res["fid_features"] and res["sample_images_per_s"] > 0
    assert os.path.exists(os.path.join(tmp_path, "run", "samples.npz"))


def test_command_line_end_to_end(data_dir, tmp_path, cli):
    out = tmp_path / "cli"
    r = cli("vae.py", "--dataset", "fashion", "--data_dir", data_dir, "--out_dir", out, "--max_steps", "4",
            "--hidden", "8", "--latent_dim", "4", "--batch_size", "8", "--log_every", "2", "--iwae_k", "2",
            "--iwae_images", "8", "--fid_samples", "0", "--device", "cpu", "--binarize", "false")
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "results.json"))
    assert res["steps"] == 4 and res["config"]["binarize"] is False and res["device"] == "cpu"
    assert all(math.isfinite(res[k]) for k in ("test_elbo_nats", "test_bpd", "train_images_per_s"))
    assert "FINAL vae fashion" in r.stdout


def test_torchrun_two_gloo_processes(data_dir, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "vae.py",
           "--dataset", "mnist", "--data_dir", str(data_dir), "--out_dir", str(out), "--max_steps", "4",
           "--hidden", "8", "--latent_dim", "4", "--batch_size", "8", "--log_every", "2", "--iwae_k", "0",
           "--fid_samples", "0", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=os.path.dirname(vae.__file__), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out / "results.json"))
    assert res["steps"] == 4 and math.isfinite(res["test_elbo_nats"]) and res["train_images_per_s"] > 0
    assert open(out / "log.txt").read().count("FINAL") == 1  # only rank 0 writes


@pytest.mark.parametrize("kw,message", [
    (dict(dataset="svhn"), "unknown dataset"),
    (dict(likelihood="poisson"), "unknown likelihood"),
    (dict(dtype="bfloat16"), "bfloat16"),
    (dict(log_every=0), "--log_every must be >= 1, got 0"),
    (dict(lr=-1.0), "--lr must be >= 0, got -1.0"),
    (dict(iwae_images=-1), "--iwae_images must be >= 0, got -1"),
    (dict(device="gpu0"), "--device gpu0 is not available here"),
])
def test_bad_config_gives_one_line_error(data_dir, tmp_path, kw, message):
    with pytest.raises(SystemExit, match=message):
        vae.train(tiny(data_dir, tmp_path, **kw))


def test_missing_data_names_data_dir(tmp_path):
    with pytest.raises(SystemExit, match="--data_dir"):
        vae.train(tiny(tmp_path / "nothing", tmp_path))


def test_bad_checkpoints(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        vae.train(tiny(data_dir, tmp_path, resume=True))
    os.makedirs(tmp_path / "run", exist_ok=True)
    open(tmp_path / "run" / "ckpt.pt", "wb").write(b"not a checkpoint")
    with pytest.raises(SystemExit, match="is not a checkpoint these files wrote"):
        vae.train(tiny(data_dir, tmp_path, eval_only=True))
    vae.train(tiny(data_dir, tmp_path, max_steps=2))
    # another architecture on the command line: the checkpoint's wins, and the log says so
    res = vae.train(tiny(data_dir, tmp_path, resume=True, latent_dim=5, max_steps=3))
    assert res["config"]["latent_dim"] == 4 and res["steps"] == 3
    assert "its architecture: {" in open(tmp_path / "run" / "log.txt").read()
    torch.save({"script": "glow.py", "config": {"dataset": "mnist"}}, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"ckpt.pt is glow.py's checkpoint of mnist, not vae.py's of mnist"):
        vae.train(tiny(data_dir, tmp_path, resume=True))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    cfg = tiny(data_dir, tmp_path, max_steps=4, eval_every=2, log_every=2)
    vae.train(cfg)
    good = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    real_forward = vae.VAE.forward

    def exploding(self, x):
        loss, stats = real_forward(self, x)
        return loss * float("nan"), stats

    monkeypatch.setattr(vae.VAE, "forward", exploding)
    with pytest.raises(SystemExit, match="training loss diverged at step 6 \\(nan\\); the last good ckpt.pt is kept"):
        vae.train(dataclasses.replace(cfg, max_steps=10, resume=True))
    kept = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    assert kept["step"] == 4 and all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


def test_cli_error_is_one_line(tmp_path, cli):
    r = cli("vae.py", "--data_dir", tmp_path / "none", "--out_dir", tmp_path / "o", "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--data_dir" in r.stderr


def test_bool_flags_parse_and_bad_values_are_one_line_errors(capsys):
    assert vae.parse_args(["--compile", "false", "--resume", "YES"]).compile is False
    assert vae.parse_args(["--binarize", "1"]).binarize is True
    with pytest.raises(SystemExit):
        vae.parse_args(["--resume", "maybe"])
    assert "invalid boolean value: 'maybe'" in capsys.readouterr().err


def test_metrics_failure_keeps_the_results(data_dir, tmp_path, monkeypatch):
    import sys
    import types
    broken = types.ModuleType("metrics")
    broken.evaluate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("yardstick broke"))
    monkeypatch.setitem(sys.modules, "metrics", broken)
    res = vae.train(tiny(data_dir, tmp_path, fid_samples=16, iwae_k=0))
    assert "fid" not in res and math.isfinite(res["test_elbo_nats"])
    assert os.path.exists(os.path.join(tmp_path, "run", "results.json"))
    assert "metrics failed, fid left empty: RuntimeError: yardstick broke" in open(tmp_path / "run" / "log.txt").read()


def test_binarized_test_split_is_drawn_once_and_is_the_same_in_every_run(data_dir, tmp_path, monkeypatch):
    seen = []
    def record(model, x_test, cfg, iwae_k=0):
        seen.append(x_test.clone())
        return {"test_elbo_nats": 1.0}
    monkeypatch.setattr(vae, "evaluate", record)
    monkeypatch.setattr(vae, "save_samples", lambda *a, **k: (torch.zeros(0, 1, 28, 28, dtype=torch.uint8), 1.0))
    for seed in (0, 3):
        vae.train(tiny(data_dir, tmp_path / str(seed), likelihood="bernoulli", binarize=True, seed=seed))
    assert all(torch.equal(seen[0], x) for x in seen) and set(seen[0].unique().tolist()) == {0, 255}
    x = seen[0][:64]  # to_input keeps binary images as they are: ELBO and IWAE see the same images
    g = torch.Generator().manual_seed(1)
    assert torch.equal(vae.to_input(x, tiny(data_dir, tmp_path, binarize=True), g), x / 255)
