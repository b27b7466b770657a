"""Tests for vqvae.py: the quantizer's math against hand computations, the codes contract, the command line."""
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vqvae
from vqvae import Config, VectorQuantizer, VQVAE

TINY = dict(hidden=16, res_hidden=8, codebook_size=16, code_dim=4, batch_size=16, max_steps=6,
            eval_every=3, log_every=2, fid_samples=0, n_samples=16)
TINY_ARGS = [a for k, v in TINY.items() for a in (f"--{k}", v)]


def tiny(tmp_path, root, **kw):
    return Config(**{**TINY, "data_dir": str(root), "out_dir": str(tmp_path / "run"), **kw})


def quantizer(K, d, ema, train=True):
    return VectorQuantizer(Config(codebook_size=K, code_dim=d, ema=ema)).train(train)


def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    vq = quantizer(10, 3, ema=False)
    z = torch.randn(40, 3)
    brute = [min(range(10), key=lambda k: sum((z[i, j].item() - vq.codebook[k, j].item()) ** 2 for j in range(3)))
             for i in range(40)]
    assert vq.nearest(z).tolist() == brute
    assert vq.nearest(z.view(2, 4, 5, 3)).flatten().tolist() == brute  # a grid [B, H, W, d] the same way


@pytest.mark.parametrize("ema", [False, True])
def test_straight_through_and_loss_gradients(ema):
    torch.manual_seed(1)
    beta, K, d = 0.25, 5, 3
    vq = quantizer(K, d, ema=ema, train=False)
    z = torch.randn(2, 3, 3, d, requires_grad=True)  # [B, H, W, d]
    z_q, loss = vq(z)
    g = torch.randn_like(z_q)  # stands for the decoder's gradient at its input
    ((z_q * g).sum() + loss).backward()
    codes = vq.nearest(z.detach())
    e = vq.codebook.detach()[codes]  # the chosen codes, [B, H, W, d]
    assert torch.allclose(z_q, e)  # forward value is the code
    n = z.numel()
    # encoder side: decoder gradient passed straight through + beta * d/dz ||z - sg(e)||^2 (mean over n)
    assert torch.allclose(z.grad, g + beta * 2 * (z.detach() - e) / n, atol=1e-6)
    if ema:
        assert vq.codebook.grad is None  # the EMA codebook takes no gradient at all
        return
    # codebook side: only d/de ||sg(z) - e||^2, without beta and without the decoder's gradient
    expect = torch.zeros(K, d)
    zf, cf = z.detach().reshape(-1, d), codes.reshape(-1)
    for i in range(len(zf)):
        expect[cf[i]] += 2 * (vq.codebook[cf[i]].detach() - zf[i]) / n
    assert torch.allclose(vq.codebook.grad, expect, atol=1e-6)


def test_ema_update_equals_hand_computation():
    gamma, eps = 0.99, 1e-5
    vq = quantizer(3, 2, ema=True)
    e0 = [[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]
    vq.codebook.data = torch.tensor(e0)
    vq.ema_sum.copy_(vq.codebook)
    vq.unused_steps.zero_()  # (a fresh quantizer counts every code as dead: the first batch seeds them)
    zs = [[0.1, -0.1], [0.2, 0.0], [1.2, 0.8], [0.9, 1.3]]  # two go to code 0, two to code 1, none to code 2
    vq(torch.tensor(zs).view(1, 2, 2, 2))  # [1, H=2, W=2, d=2]; row-major positions = zs
    n = [2, 2, 0]
    s = [[0.3, -0.1], [2.1, 2.1], [0.0, 0.0]]
    N = [gamma * 1 + (1 - gamma) * n[k] for k in range(3)]
    m = [[gamma * e0[k][j] + (1 - gamma) * s[k][j] for j in range(2)] for k in range(3)]
    total = sum(N)
    N_s = [(N[k] + eps) / (total + 3 * eps) * total for k in range(3)]  # Laplace smoothing
    expect = [[m[k][j] / N_s[k] for j in range(2)] for k in range(3)]
    assert torch.allclose(vq.ema_count, torch.tensor(N))
    assert torch.allclose(vq.codebook, torch.tensor(expect), atol=1e-6)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_is_reseeded_from_encoder_outputs(ema):
    vq = quantizer(4, 2, ema=ema)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    vq.ema_sum.copy_(vq.codebook)
    rows = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 0.8], [0.5, 0.6]])
    z = rows.view(1, 2, 2, 2)  # [B, H, W, d]
    vq.unused_steps.fill_(18)  # code 3 has been unused for 18 steps; a code is re-seeded after 20
    vq(z)
    assert vq.codebook[3].tolist() == [100.0, 100.0] or ema  # 19 unused steps: not yet dead
    assert vq.unused_steps[3] == 19
    vq(z)  # the 20th unused step: re-seeded from one of this batch's vectors
    assert any(torch.allclose(vq.codebook[3], r) for r in rows)
    assert vq.unused_steps[3] == 0 and vq.unused_steps[:3].tolist() == [0, 0, 0]


def test_first_batch_seeds_the_codebook():
    vq = quantizer(8, 2, ema=True)
    z = torch.randn(1, 4, 4, 2) + 10  # far from the initial codebook: all 16 vectors pick the same code
    vq(z)
    rows = z.reshape(-1, 2)
    seeded = [k for k in range(8) if any(torch.allclose(vq.codebook[k], r) for r in rows)]
    assert len(seeded) == 7  # every code the batch did not use now sits on one of its vectors


@pytest.mark.parametrize("dataset,channels,size", [("mnist", 1, 28), ("cifar10", 3, 32)])
def test_decode_codes_equals_reconstruction(dataset, channels, size):
    torch.manual_seed(0)
    arch = {k: TINY[k] for k in ("hidden", "res_hidden", "codebook_size", "code_dim")}
    model = VQVAE(Config(dataset=dataset, **arch)).eval()
    x = torch.randint(0, 256, (5, channels, size, size), dtype=torch.uint8)
    codes = model.encode_codes(x)
    assert codes.shape == (5, 8, 8) and codes.dtype == torch.int64
    images = model.decode_codes(codes)
    assert images.shape == (5, channels, size, size) and images.min() >= 0 and images.max() <= 1
    z_q, _ = model.vq(model.encode(x))  # the training path (straight-through, then decoder)
    assert torch.allclose(z_q, model.vq.codebook[codes])  # its forward value: the nearest codes
    x_hat = model.decode(z_q)
    assert torch.allclose(images, ((x_hat + 1) / 2).clamp(0, 1), atol=1e-5)
    assert torch.allclose(model.decode_codes(codes.to(torch.int16)), images)  # the dtype codes.pt stores


def test_train_in_process_writes_codes_contract(tmp_path, data_dir):
    cfg = tiny(tmp_path, data_dir, dataset="mnist")
    res = vqvae.train(cfg)
    out = tmp_path / "run"
    for f in ("ckpt.pt", "codes.pt", "recon.png", "samples_independent.png", "loss.png", "log.txt",
              "results.json", "samples.npz"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "results.json").read_text())
    for k in ("train_images_per_s", "steps", "wall_s", "device", "config", "test_mse", "test_psnr_db",
              "codes_used", "code_perplexity"):
        assert k in saved and k in res, k
    assert saved["steps"] == 6 and 0 < saved["test_mse"] < 1 and math.isfinite(saved["test_psnr_db"])
    assert 1 <= saved["codes_used"] <= 16 and 1 <= saved["code_perplexity"] <= saved["codes_used"] + 1e-6
    codes = torch.load(out / "codes.pt", weights_only=True)
    assert codes["format"] == "vqvae-codes-v1" and codes["dataset"] == "mnist"
    assert codes["codebook_size"] == 16 and codes["grid"] == [8, 8] and codes["train_flip"] is None
    assert codes["train"].shape == (512, 8, 8) and codes["test"].shape == (256, 8, 8)
    assert codes["train"].dtype == torch.int16 and codes["train_labels"].dtype == torch.int64
    assert codes["vqvae_sha256"] == vqvae.file_fingerprint(out / "ckpt.pt")
    assert codes["vqvae_ckpt"] == str((out / "ckpt.pt").resolve())
    x_test, y_test = vqvae.load_split(vqvae.Config(dataset="mnist", data_dir=str(data_dir)), train=False)
    assert torch.equal(codes["test_labels"], y_test)
    model = vqvae.load_vqvae(codes["vqvae_ckpt"], "cpu")  # round trip: the checkpoint re-encodes the same codes
    assert not model.training
    assert torch.equal(model.encode_codes(x_test).to(torch.int16), codes["test"])
    npz = np.load(out / "samples.npz")
    assert npz["independent"].dtype == np.uint8 and npz["independent"].shape[1:] == (1, 28, 28)


def test_file_fingerprint_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib
    data = bytes(range(256)) * 20000  # 5 MB: several chunks
    (tmp_path / "f").write_bytes(data)
    assert vqvae.file_fingerprint(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_training_learns_and_uses_codes(tmp_path, data_dir):
    cfg = tiny(tmp_path, data_dir, dataset="mnist", max_steps=150, batch_size=16, lr=3e-3, hidden=32,
               res_hidden=16, code_dim=8, eval_every=1000, log_every=1000)
    x_train, _ = vqvae.load_split(vqvae.Config(dataset="mnist", data_dir=str(data_dir)), train=True)
    x_test, _ = vqvae.load_split(vqvae.Config(dataset="mnist", data_dir=str(data_dir)), train=False)
    torch.manual_seed(cfg.seed)
    (tmp_path / "untrained").mkdir()
    untrained = vqvae.evaluate(VQVAE(cfg), x_test, dataclasses.replace(cfg, out_dir=str(tmp_path / "untrained")))
    res = vqvae.train(cfg)
    mean_image = x_train.float().mean(0) / 255  # the best reconstruction that ignores its input
    assert res["test_mse"] < 0.25 * untrained[0]["test_mse"]
    assert res["test_mse"] < 1.3 * ((x_test.float() / 255 - mean_image) ** 2).mean().item()
    assert res["codes_used"] >= 4 and res["code_perplexity"] > 2


@pytest.mark.slow
def test_real_mnist_short_run(tmp_path):
    res = vqvae.train(Config(dataset="mnist", data_dir=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                             out_dir=str(tmp_path / "run"), hidden=64, res_hidden=32, batch_size=64,
                             max_steps=300, eval_every=1000, fid_samples=0, device="cpu"))
    # measured: test mse 0.0143, 510 codes used; a collapsed codebook (seen with lr 2e-3) gives 0.069 and 25 codes
    assert res["test_mse"] < 0.02 and res["codes_used"] > 100


def test_cli_fashion_metrics_flip_codes_resume_and_eval_only(tmp_path, data_dir, cli, capsys):
    """Two processes only (each pays the torch import): a run with metrics, and a one-line error."""
    has_metrics = importlib.util.find_spec("metrics") is not None
    out = tmp_path / "run"
    base = ["--dataset", "fashion", "--data_dir", data_dir, "--out_dir", out, *TINY_ARGS]
    r = cli("vqvae.py", *base, "--max_steps", 4, "--fid_samples", 64 if has_metrics else 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("FINAL vqvae fashion test_mse=")
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and all(math.isfinite(res[k]) for k in ("test_mse", "wall_s", "train_images_per_s"))
    if has_metrics:  # the reconstruction FID (the ceiling for a prior) and the independent-codes one
        assert math.isfinite(res["fid"]) and res["fid"] >= 0 and math.isfinite(res["fid_independent"])
        assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
        npz = np.load(out / "samples.npz")
        assert npz["images"].shape == npz["independent"].shape == (64, 1, 28, 28)
    codes = torch.load(out / "codes.pt", weights_only=True)
    x_train, _ = vqvae.load_split(vqvae.Config(dataset="fashion", data_dir=str(data_dir)), train=True)
    model = vqvae.load_vqvae(out / "ckpt.pt", "cpu")
    assert torch.equal(model.encode_codes(x_train.flip(-1)).to(torch.int16), codes["train_flip"])
    cfg = vqvae.parse_args([str(a) for a in base])  # the same run, continued in-process from step 4
    capsys.readouterr()
    vqvae.train(dataclasses.replace(cfg, max_steps=6, resume=True))
    stdout = capsys.readouterr().out
    assert "step 6/6" in stdout and "step 2/6" not in stdout and "at step 4" in stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
    sha, before = vqvae.file_fingerprint(out / "ckpt.pt"), torch.load(out / "codes.pt", weights_only=True)
    (out / "codes.pt").unlink()
    vqvae.train(dataclasses.replace(cfg, eval_only=True, write_codes=True))
    assert vqvae.file_fingerprint(out / "ckpt.pt") == sha  # evaluation never rewrites the checkpoint
    after = torch.load(out / "codes.pt", weights_only=True)
    assert after["vqvae_sha256"] == sha
    assert all(torch.equal(before[k], after[k]) for k in ("train", "test", "train_flip"))  # the same codes again
    r = cli("vqvae.py", *base, "--eval_only", "1", "--out_dir", tmp_path / "nothing")
    assert r.returncode != 0 and "vqvae.py: error:" in r.stderr and "no checkpoint at" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_errors_are_one_line(tmp_path, data_dir):
    def fails(match, **kw):
        with pytest.raises(SystemExit, match=match):
            vqvae.train(tiny(tmp_path, data_dir, dataset="mnist", **kw))
    fails("no checkpoint at", resume=True)
    fails("no checkpoint at", eval_only=True, write_codes=True)
    fails("--codebook_size must be >= 0", codebook_size=-1)
    fails("--batch_size must be >= 1", batch_size=0)
    fails("bfloat16 is autocast on CUDA", dtype="bfloat16", device="cpu")
    fails("no mnist in --data_dir", data_dir=str(tmp_path / "nowhere"))
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"not a checkpoint")
    fails("is not a checkpoint these files wrote", resume=True)
    with pytest.raises(SystemExit, match="cannot load the VQ-VAE checkpoint"):
        vqvae.load_vqvae(tmp_path / "run" / "ckpt.pt", "cpu")
    with pytest.raises(SystemExit, match="cannot load the VQ-VAE checkpoint .*FileNotFoundError"):
        vqvae.load_vqvae(tmp_path / "missing.pt", "cpu")


def test_resume_takes_the_checkpoints_architecture_and_keeps_good_checkpoint_on_nan(tmp_path, data_dir, capsys):
    vqvae.train(tiny(tmp_path, data_dir, dataset="mnist", max_steps=3))
    ckpt = tmp_path / "run" / "ckpt.pt"
    capsys.readouterr()
    vqvae.train(tiny(tmp_path, data_dir, dataset="mnist", max_steps=6, resume=True, codebook_size=32))
    assert "'codebook_size': 16" in capsys.readouterr().out  # the log line names the architecture it took
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 6 and saved["config"]["codebook_size"] == 16 and saved["config"]["dataset"] == "mnist"
    sha = vqvae.file_fingerprint(ckpt)
    with pytest.raises(SystemExit, match="diverged.*the last good ckpt.pt is kept"):
        vqvae.train(tiny(tmp_path, data_dir, dataset="mnist", max_steps=60, resume=True, lr=1e30, eval_every=1))
    assert vqvae.file_fingerprint(ckpt) == sha


def test_parse_args(capsys):
    cfg = vqvae.parse_args(["--ema", "no", "--hidden=4", "--dataset", "cifar10", "--lr", "3e-4", "--resume", "true",
                            "--eval_only", "1", "--write_codes", "yes"])
    assert cfg.ema is False and cfg.hidden == 4 and cfg.dataset == "cifar10" and cfg.lr == 3e-4
    assert cfg.resume is cfg.eval_only is cfg.write_codes is True
    with pytest.raises(SystemExit):
        vqvae.parse_args(["--dataset", "imagenet"])
    with pytest.raises(SystemExit):
        vqvae.parse_args(["-h"])
    assert "codes.pt" in capsys.readouterr().out  # -h prints the docstring
