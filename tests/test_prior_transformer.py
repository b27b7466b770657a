"""Tests of prior_transformer.py: causality, attention-dropout mask, KV cache = recomputation, sampling filters,
the likelihood against the chain rule, conditioning, the codes-file contract, the validation split held out of
the training codes, float32 evaluation, end to end (results from the best validation weights), resume, bad input."""
import hashlib
import itertools
import json
import math
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prior_transformer as pt

K, GRID = 16, (4, 4)
T = GRID[0] * GRID[1]


def tiny(arch="gpt", **kw):
    cfg = pt.Config(arch=arch, n_layer=2, n_head=2, n_embd=32, dropout=0.0, attn_drop_p=0.0)
    return replace(cfg, **kw)


def make_model(arch="gpt", n_classes=0, seed=0, **kw):
    torch.manual_seed(seed)
    return pt.Prior(tiny(arch, **kw), K, GRID, n_classes).eval()


@torch.no_grad()
def sample_by_recomputation(model, n, generator, temperature=1.0, top_k=0, top_p=1.0):
    """The reference for Prior.sample: the whole prefix recomputed at every step, no cache."""
    seq = model.start(n)[:, None]
    for _ in range(T):
        logits = model.logits(seq)[:, -1]
        code = logits.argmax(-1)
        if temperature > 0:
            probs = pt.filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            code = torch.multinomial(probs, 1, generator=generator)[:, 0]
        seq = torch.cat([seq, code[:, None]], 1)
    return seq[:, 1:].view(n, *GRID)


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("arch,p", [("gpt", 0.0), ("gpt", 0.5), ("lstm", 0.0)])
def test_causality(arch, p):
    """Changing tokens after t leaves the logits at positions <= t unchanged (also with attention dropout on)."""
    model = make_model(arch, attn_drop_p=p).train()  # train mode: attention dropout active
    x = torch.randint(K, (3, T))
    for t in (0, 5, T - 2):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randint(K, (3, T - t - 1))
        torch.manual_seed(1)
        a = model.logits(x)
        torch.manual_seed(1)  # the same random attention masks for both
        b = model.logits(x2)
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-3)  # later positions do see them


def test_attn_drop_mask():
    torch.manual_seed(0)
    n, p = 64, 0.3
    m = pt.attn_drop_mask(n, p, (4, 2), "cpu")
    assert m.shape == (4, 2, n, n)
    assert m.diagonal(dim1=-2, dim2=-1).all()  # never the diagonal
    assert not m.triu(1).any()  # never the future
    lower = torch.ones(n, n, dtype=torch.bool).tril(-1)
    kept = m[..., lower].float().mean().item()
    assert abs(kept - (1 - p)) < 0.02  # about a fraction p of the allowed past is masked
    assert not torch.equal(m[0, 0], m[0, 1])  # independent per head


def test_attention_dropout_matches_manual_softmax():
    """sdpa with the boolean mask equals softmax(q k^T / sqrt(d) with masked entries at -inf) v, in a whole block."""
    cfg = tiny(attn_drop_p=0.4, n_head=2, n_embd=8)
    torch.manual_seed(0)
    block = pt.Block(cfg).train()
    x = torch.randn(3, 7, 8)
    torch.manual_seed(5)
    y = block(x, {})
    torch.manual_seed(5)
    mask = pt.attn_drop_mask(7, 0.4, (3, 2), "cpu")
    q, k, v = block.qkv(block.ln1(x)).view(3, 7, 3, 2, 4).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask, float("-inf")).softmax(-1)
    h = x + block.proj((w @ v).transpose(1, 2).reshape(3, 7, 8))
    assert torch.allclose(y, h + block.mlp(block.ln2(h)), atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_cache_equals_recomputation(arch):
    model = make_model(arch)
    x = torch.randint(K + 1, (4, T))
    full = model.logits(x)
    cache, steps = {}, []
    for t in range(T):
        steps.append(model.logits(x[:, t : t + 1], cache, t))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}])
def test_sampling_with_and_without_cache_identical(arch, kw):
    model = make_model(arch)
    a = model.sample(8, torch.Generator().manual_seed(3), **kw)
    b = sample_by_recomputation(model, 8, torch.Generator().manual_seed(3), **kw)
    assert a.shape == (8, *GRID) and a.dtype == torch.long and 0 <= a.min() and a.max() < K
    assert torch.equal(a, b)
    c = model.sample(8, torch.Generator().manual_seed(4), **kw)
    assert not torch.equal(a, c)  # a different generator gives different samples


def test_filters_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.4, 0.1, 0.2, 0.3]]))
    keep = lambda out: torch.isfinite(out)
    assert keep(pt.filter_logits(logits, top_k=1)).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert keep(pt.filter_logits(logits, top_k=3)).tolist() == [[False, True, True, True], [True, False, True, True]]
    # nucleus: the smallest set of most likely codes whose mass reaches top_p
    assert keep(pt.filter_logits(logits, top_p=0.75)).tolist() == [[False, True, False, True], [True, False, True, True]]
    assert keep(pt.filter_logits(logits, top_p=0.85)).tolist() == [[False, True, True, True], [True, False, True, True]]
    assert keep(pt.filter_logits(logits, top_p=0.3)).tolist() == [[False, True, False, False], [True, False, False, False]]
    # top-k first, then the nucleus of the renormalized rest: 0.5 / 0.8 = 0.625 >= 0.6; 0.4 / 0.7 = 0.57 < 0.6
    assert keep(pt.filter_logits(logits, top_k=2, top_p=0.6)).tolist() == [[False, True, False, False], [True, False, False, True]]
    assert torch.equal(pt.filter_logits(logits), logits)
    kept = pt.filter_logits(logits, top_k=2)  # kept logits are untouched
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(kept)])


def test_sampling_distribution_and_greedy(monkeypatch):
    """Prior.sample's draw from given logits: greedy at temperature 0, softmax(logits / T), top-k renormalized."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    model = pt.Prior(tiny(), 3, (1, 1)).eval()  # one code per grid, its logits fixed below
    monkeypatch.setattr(model, "logits", lambda idx, cache=None, t0=0: logits.expand(len(idx), 1, 3))
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: model.sample(20000, g, **kw).flatten()
    assert torch.equal(draw(temperature=0), torch.zeros(20000, dtype=torch.long))
    for temp in (1.0, 2.0):
        freq = torch.bincount(draw(temperature=temp), minlength=3).float() / 20000
        assert torch.allclose(freq, (logits / temp).softmax(-1), atol=0.015)
    freq = torch.bincount(draw(top_k=2), minlength=3).float() / 20000
    assert freq[2] == 0 and abs(freq[0] - 0.625) < 0.015  # renormalized over the two kept codes


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_loss_is_chain_rule_nll_and_sums_to_one(arch):
    """forward's loss = -1/T sum_t log p(x_t | x_<t), computed token by token through the cache; and on a toy
    case (K = 3, T = 2) the probabilities of all K^T sequences sum to 1."""
    model = make_model(arch)
    x = torch.randint(K, (5, T))
    loss, stats = model(x)
    cache, tok, nll = {}, model.start(5), torch.zeros(5)
    for t in range(T):
        logp = model.logits(tok[:, None], cache, t)[:, -1].log_softmax(-1)
        nll -= logp[torch.arange(5), x[:, t]]
        tok = x[:, t]
    assert torch.allclose(loss, nll.mean() / T, atol=1e-5)
    hits = model.logits(torch.cat([model.start(5)[:, None], x[:, :-1]], 1)).topk(5, -1).indices == x[..., None]
    assert math.isclose(stats["top5"].item(), hits.any(-1).float().mean().item(), abs_tol=1e-6)
    assert stats["top1"] <= stats["top5"] <= stats["top10"]
    torch.manual_seed(0)
    toy = pt.Prior(tiny(arch), 3, (1, 2), 0).eval()
    seqs = torch.tensor(list(itertools.product(range(3), repeat=2)))
    total = sum(math.exp(-2 * toy(s[None])[0].item()) for s in seqs)
    assert math.isclose(total, 1.0, rel_tol=1e-5)


def test_conditional_model_is_fed_its_class():
    """Trained on grids whose every code is its class, the conditional model samples its class everywhere."""
    torch.manual_seed(0)
    model = pt.Prior(tiny(), K, GRID, n_classes=4).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        y = torch.randint(4, (32,))
        loss, _ = model(y[:, None].expand(32, T) + 0, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    y = torch.arange(4).repeat_interleave(3)
    assert (model.sample(12, None, y, temperature=0) == y[:, None, None]).all()  # greedy: the class everywhere
    s = model.sample(12, torch.Generator().manual_seed(0), y)
    assert (s == y[:, None, None]).float().mean() > 0.8
    assert torch.equal(model.start(4, torch.arange(4)), torch.arange(K, K + 4))  # class tokens follow the codes
    # generate() (sample grids, FID samples) asks for the classes in equal blocks, in order: one grid row per class
    as_image = types.SimpleNamespace(decode_codes=lambda c: c[:, None] / 255)  # a "VQ-VAE" that shows the codes
    imgs, per_s = pt.generate(model, as_image, 12, tiny(temperature=0.0), seed=0)
    assert torch.equal(imgs[:, 0].long(), torch.arange(4).repeat_interleave(3)[:, None, None].expand(12, *GRID))
    assert per_s > 0


# ----------------------------------------------------------------------------- codes file and end to end

class FakeVQVAE(nn.Module):
    """Stands in for vqvae.VQVAE: decode_codes maps a code grid to a 28x28 image in [0, 1]."""

    def decode_codes(self, codes):
        return F.interpolate(codes[:, None].float() / (K - 1), size=(28, 28), mode="nearest")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def fake_vqvae(monkeypatch):
    """A stub `vqvae` module with the contract's two functions (until the real vqvae.py is used end to end)."""
    mod = types.SimpleNamespace(load_vqvae=lambda path, device: FakeVQVAE().to(device), file_fingerprint=sha)
    monkeypatch.setitem(sys.modules, "vqvae", mod)


def write_codes(tmp_path, dataset="mnist", **override):
    """A codes.pt by the contract: codes with structure (row r of class c holds (c + r) % K), some noise."""
    g = torch.Generator().manual_seed(0)
    ckpt = tmp_path / "vq_ckpt.pt"
    ckpt.write_bytes(b"a VQ-VAE checkpoint")

    def split(n):
        y = torch.randint(10, (n,), generator=g)
        x = (y[:, None, None] + torch.arange(GRID[0])[None, :, None]).expand(n, *GRID) % K
        noise = torch.rand(n, *GRID, generator=g) < 0.1
        return torch.where(noise, torch.randint(K, (n, *GRID), generator=g), x).to(torch.int16), y

    (xtr, ytr), (xte, yte) = split(256), split(64)
    c = {"format": "vqvae-codes-v1", "dataset": dataset, "codebook_size": K, "grid": list(GRID), "train": xtr,
         "test": xte, "train_flip": None, "train_labels": ytr, "test_labels": yte,
         "vqvae_ckpt": str(ckpt.resolve()), "vqvae_sha256": sha(ckpt)}
    c.update(override)
    path = tmp_path / "codes.pt"
    torch.save(c, path)
    return path


def run_cfg(tmp_path, codes, **kw):
    base = dict(dataset="mnist", codes=str(codes), out_dir=str(tmp_path / "out"), device="cpu", max_steps=30,
                batch_size=32, lr=3e-3, warmup_steps=5, eval_every=15, log_every=10, n_samples=16, fid_samples=0)
    base.update(kw)
    return replace(tiny(), **base)


@pytest.mark.parametrize("arch,conditional", [("gpt", False), ("lstm", False), ("gpt", True)])
def test_train_end_to_end_in_process(tmp_path, fake_vqvae, arch, conditional):
    codes = write_codes(tmp_path)
    res = pt.train(run_cfg(tmp_path, codes, arch=arch, conditional=conditional, attn_drop_p=0.1, max_steps=60))
    out = tmp_path / "out"
    for f in ("ckpt.pt", "samples.png", "loss.png", "log.txt", "results.json"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    for key in ("test_nats_per_code", "test_bits_per_code", "test_top1", "test_top5", "test_top10",
                "selected_step", "val_nats_per_code", "train_nats_per_code", "train_images_per_s", "steps", "wall_s",
                "device", "config"):
        assert key in saved, key
    assert saved["steps"] == 60 and math.isfinite(saved["test_nats_per_code"])
    assert math.isclose(saved["test_bits_per_code"], saved["test_nats_per_code"] / math.log(2))
    assert saved["test_nats_per_code"] < math.log(K) - 0.5  # learned something beyond uniform over K codes
    assert 0 <= saved["test_top1"] <= saved["test_top5"] <= saved["test_top10"] <= 1
    assert res["test_nats_per_code"] == saved["test_nats_per_code"]
    assert (out / "log.txt").read_text().strip().splitlines()[-1].startswith("FINAL prior_transformer mnist")
    # the selected step is the argmin of the validation curve, and its loss the reported one
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    steps, vals = zip(*ck["curves"]["test"])
    assert steps == (15, 30, 45, 60) and saved["selected_step"] == steps[vals.index(min(vals))] == ck["best"]["step"]
    assert saved["val_nats_per_code"] == min(vals) == ck["best"]["val_nats_per_code"]
    assert saved["train_nats_per_code"] == dict(ck["curves"]["train"])[saved["selected_step"]]
    # the checkpoint rebuilds the model with no command line; its best weights give the reported numbers exactly
    cfg = pt.Config(**ck["config"])
    model = pt.Prior(cfg, ck["meta"]["codebook_size"], ck["meta"]["grid"], 10 if cfg.conditional else 0)
    model.load_state_dict(ck["best"]["model"])
    reported = {k: v for k, v in saved.items() if k.startswith("test_")}
    assert pt.evaluate(model, the_test_split(codes), "test", cfg) == reported


def the_test_split(codes_path):
    c = torch.load(codes_path, weights_only=True)
    return {"test": c["test"].long(), "test_labels": c["test_labels"].long()}


def test_results_come_from_the_best_validation_weights_also_after_resume(tmp_path, fake_vqvae, monkeypatch):
    """15 good steps; then, resumed, 30 steps on noise codes: the validation loss rises, so the weights of
    step 15 (kept in ckpt.pt across the resume) give the reported numbers, not the worse last ones."""
    codes = write_codes(tmp_path)
    pt.train(run_cfg(tmp_path, codes, max_steps=15))
    forward = pt.Prior.forward
    noise = lambda self, x, y=None: forward(self, torch.randint_like(x, K) if self.training else x, y)
    monkeypatch.setattr(pt.Prior, "forward", noise)
    res = pt.train(run_cfg(tmp_path, codes, max_steps=45, resume=True))
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    steps, vals = zip(*ck["curves"]["test"])
    assert steps == (15, 30, 45) and vals[0] < min(vals[1:])  # the forced situation: the last is worse
    assert res["selected_step"] == 15 and res["val_nats_per_code"] == vals[0] and ck["step"] == 45
    monkeypatch.setattr(pt.Prior, "forward", forward)
    model = pt.Prior(tiny(), K, GRID)
    model.load_state_dict(ck["model"])
    last = pt.evaluate(model, the_test_split(codes), "test", tiny())
    model.load_state_dict(ck["best"]["model"])
    best = pt.evaluate(model, the_test_split(codes), "test", tiny())
    assert res["test_nats_per_code"] == best["test_nats_per_code"] < last["test_nats_per_code"] - 0.1
    assert "selected step 15: validation" in (tmp_path / "out" / "log.txt").read_text()
    again = pt.train(run_cfg(tmp_path, codes, eval_only=True))  # --eval_only reports the same selection
    assert again["selected_step"] == 15 and again["test_nats_per_code"] == res["test_nats_per_code"]


def test_validation_is_held_out_of_the_training_codes(tmp_path, fake_vqvae, monkeypatch):
    """A fixed split of the training grids (whatever --seed), with their labels and mirrored codes; the
    training batches never hold a validation grid."""
    ids = torch.arange(256)  # train grid i starts with the codes (i // K, i % K): unique, recognizable
    train = torch.randint(K, (256, *GRID), generator=torch.Generator().manual_seed(1))
    train[:, 0, 0], train[:, 0, 1] = ids // K, ids % K
    codes = write_codes(tmp_path, train=train.short(), train_labels=ids % 10, train_flip=(train.short() + 1) % K)
    c, _ = pt.load_codes(run_cfg(tmp_path, codes), "cpu")
    other, _ = pt.load_codes(run_cfg(tmp_path, codes, seed=5), "cpu")
    assert torch.equal(c["val"], other["val"]) and torch.equal(c["train"], other["train"])
    ident = lambda x: (x[:, 0, 0] * K + x[:, 0, 1]).tolist()
    val, tr = ident(c["val"]), ident(c["train"])
    assert len(val) == math.ceil(0.05 * 256) and len(tr) == 256 - len(val)
    assert sorted(val + tr) == list(range(256))  # disjoint, and together all of the training grids
    assert c["val_labels"].tolist() == [i % 10 for i in val] and c["train_labels"].tolist() == [i % 10 for i in tr]
    assert torch.equal(c["train_flip"], (c["train"] + 1) % K)  # the mirrored codes follow their grids
    seen, forward = set(), pt.Prior.forward

    def recording(self, x, y=None):
        if self.training:
            seen.update(ident(x))
        return forward(self, x, y)

    monkeypatch.setattr(pt.Prior, "forward", recording)
    pt.train(run_cfg(tmp_path, codes, flip=False, max_steps=20))
    assert len(seen) > 200 and not seen & set(val)


def test_evaluation_is_float32_under_autocast():
    """evaluate() switches autocast off: under bfloat16 autocast it returns the float32 numbers exactly, though
    the model itself gives other numbers under autocast."""
    model = make_model()
    x = torch.randint(K, (600, *GRID), generator=torch.Generator().manual_seed(0))
    codes = {"val": x, "val_labels": torch.zeros(600, dtype=torch.long)}
    with torch.autocast("cpu", torch.bfloat16):
        got = pt.evaluate(model, codes, "val", tiny())
        with torch.inference_mode():
            in_bf16 = [model.eval()(xb)[1]["nats_per_code"].item() for xb in x.split(500)]
    with torch.inference_mode():
        in_fp32 = [model(xb)[1]["nats_per_code"].item() for xb in x.split(500)]
    assert got == pt.evaluate(model, codes, "val", tiny())
    assert set(got) == {"val_nats_per_code", "val_bits_per_code", "val_top1", "val_top5", "val_top10"}
    assert math.isclose(got["val_nats_per_code"], (500 * in_fp32[0] + 100 * in_fp32[1]) / 600, rel_tol=1e-9)
    assert abs(in_bf16[0] - in_fp32[0]) > 1e-6  # bfloat16 numbers, which the test could tell apart


def test_long_phases_print_progress_with_an_eta(tmp_path, monkeypatch):
    """evaluate() and generate() go through progress(): with a clock that moves 20 s per reading they log ETAs."""
    clock = itertools.count(0, 20)
    monkeypatch.setattr(pt.time, "perf_counter", lambda: next(clock))
    cfg = tiny(out_dir=str(tmp_path))
    model = make_model()
    pt.evaluate(model, {"test": torch.randint(K, (1200, *GRID)), "test_labels": torch.zeros(1200).long()}, "test", cfg)
    as_image = types.SimpleNamespace(decode_codes=lambda c: c[:, None] / 255)
    pt.generate(model, as_image, 1001, cfg, seed=0)
    log = (tmp_path / "log.txt").read_text()
    assert "test nats/code 1/3 | eta" in log and "test nats/code 2/3 | eta" in log
    assert "samples at T=1.0 1/3 | eta" in log


def test_flip_codes_are_used(tmp_path, fake_vqvae):
    """With --flip the batches mix in train_flip; codes that only appear there must be learned."""
    c = torch.load(write_codes(tmp_path), weights_only=True)
    flipped = torch.zeros_like(c["train"])  # the flipped codes: all zeros
    codes = write_codes(tmp_path, dataset="fashion", train_flip=flipped, test=torch.zeros_like(c["test"]))
    on = pt.train(run_cfg(tmp_path, codes, dataset="fashion", flip=True, out_dir=str(tmp_path / "on")))
    off = pt.train(run_cfg(tmp_path, codes, dataset="fashion", flip=False, out_dir=str(tmp_path / "off")))
    assert on["test_nats_per_code"] < off["test_nats_per_code"] - 0.5


def test_fid_and_sweep_in_process(tmp_path, fake_vqvae, data_dir):
    """metrics.py judges the decoded samples; the sweep writes its table and plot."""
    pytest.importorskip("metrics")
    codes = write_codes(tmp_path)
    res = pt.train(run_cfg(tmp_path, codes, data_dir=str(data_dir), fid_samples=40, sweep=True,
                           sweep_temperatures=(0.5, 1.0), sweep_top_k=(0, 4), sweep_samples=20))
    for key in ("fid", "precision", "recall", "density", "coverage", "fid_features", "sample_images_per_s"):
        assert key in res and res[key] is not None, key
    assert math.isfinite(res["fid"]) and res["sample_images_per_s"] > 0
    assert [(r["temperature"], r["top_k"]) for r in res["sweep"]] == [(0.5, 0), (1.0, 0), (0.5, 4), (1.0, 4)]
    assert all(math.isfinite(r["fid"]) and 0 <= r["recall"] <= 1 for r in res["sweep"])
    images = np.load(tmp_path / "out" / "samples.npz")["images"]
    assert images.shape == (40, 1, 28, 28) and images.dtype.name == "uint8"
    assert (tmp_path / "out" / "sweep.png").exists()


def test_broken_metrics_do_not_lose_the_run(tmp_path, fake_vqvae, monkeypatch):
    def evaluate(*args, **kw):
        raise RuntimeError("feature net mismatch")

    monkeypatch.setitem(sys.modules, "metrics", types.SimpleNamespace(evaluate=evaluate))
    res = pt.train(run_cfg(tmp_path, write_codes(tmp_path), fid_samples=20))
    assert res.get("fid") is None and res["sample_images_per_s"] > 0 and math.isfinite(res["test_nats_per_code"])
    assert (tmp_path / "out" / "samples.npz").exists() and (tmp_path / "out" / "results.json").exists()
    assert "metrics failed, fid left empty: RuntimeError: feature net mismatch" in (tmp_path / "out" / "log.txt").read_text()


def test_resume_and_eval_only(tmp_path, fake_vqvae):
    codes = write_codes(tmp_path)
    pt.train(run_cfg(tmp_path, codes, max_steps=20))
    res = pt.train(run_cfg(tmp_path, codes, max_steps=40, resume=True))
    assert res["steps"] == 40 and torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 40
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "at step 20" in log and "step 30/40" in log and "step 10/40" not in log
    # eval_only rebuilds from the checkpoint's config, whatever the command line says about the architecture
    again = pt.train(run_cfg(tmp_path, codes, eval_only=True, n_layer=5, n_embd=64))
    assert again["test_nats_per_code"] == res["test_nats_per_code"] and again["steps"] == 40
    # another architecture on the command line: the checkpoint's wins, and the log says so
    res = pt.train(run_cfg(tmp_path, codes, max_steps=50, resume=True, n_embd=64, n_layer=5))
    assert res["steps"] == 50 and res["config"]["n_embd"] == 32 and res["config"]["n_layer"] == 2
    assert "its architecture: {" in (tmp_path / "out" / "log.txt").read_text()


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, fake_vqvae, monkeypatch):
    codes, calls, forward = write_codes(tmp_path), [0], pt.Prior.forward

    def diverging(self, x, y=None):  # the training loss turns NaN after 7 steps
        loss, stats = forward(self, x, y)
        calls[0] += self.training
        return (loss * float("nan") if self.training and calls[0] > 7 else loss), stats

    monkeypatch.setattr(pt.Prior, "forward", diverging)
    with pytest.raises(SystemExit, match="training loss diverged at step 10 \\(nan\\); the last good ckpt.pt is kept"):
        pt.train(run_cfg(tmp_path, codes, max_steps=20, eval_every=5, log_every=5))
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_bad_input(tmp_path, fake_vqvae):
    codes = write_codes(tmp_path)
    for kw, match in [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
                      ({"top_k": -1}, "top_k"), ({"top_k": K + 1}, "top_k must be in 1..K = 1..16"),
                      ({"sweep": True, "sweep_top_k": (0, 99)}, "top_k"),
                      ({"n_embd": 30, "n_head": 4}, "multiple"), ({"codes": str(tmp_path / "none.pt")}, "run `python vqvae.py --dataset mnist --data_dir "),
                      ({"dataset": "fashion"}, "holds mnist codes"), ({"resume": True}, "no checkpoint"),
                      ({"eval_only": True}, "no checkpoint"), ({"dtype": "bfloat16"}, "CUDA"),
                      ({"val_fraction": 0.0}, "val_fraction 0.0 must leave"), ({"val_fraction": 1.0}, "val_fraction")]:
        with pytest.raises(SystemExit, match=match):
            pt.train(run_cfg(tmp_path, **{"codes": codes, **kw}))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match="not a codes file"):
        pt.train(run_cfg(tmp_path, tmp_path / "junk.pt"))
    c = torch.load(codes, weights_only=True)
    for i, (override, match) in enumerate([({"train": c["train"] + K}, "not a codes file"),
                                           ({"vqvae_sha256": "0" * 64}, "changed since it wrote"),
                                           ({"vqvae_ckpt": str(tmp_path / "gone.pt")}, "missing"),
                                           ({"train_labels": None}, "not a codes file")]):
        sub = tmp_path / f"case{i}"
        sub.mkdir()
        path = write_codes(sub, **override)
        with pytest.raises(SystemExit, match=match):
            pt.train(run_cfg(sub, path, conditional=True))
    # a checkpoint trained on another codebook
    pt.train(run_cfg(tmp_path, codes, max_steps=2, eval_every=2, out_dir=str(tmp_path / "k")))
    (tmp_path / "k2").mkdir()
    bigger = write_codes(tmp_path / "k2", codebook_size=2 * K)
    with pytest.raises(SystemExit, match="trained on other codes"):
        pt.train(run_cfg(tmp_path, bigger, max_steps=4, resume=True, out_dir=str(tmp_path / "k")))
    # same K and grid, but made by a retrained VQ-VAE: the old prior must not be resumed or scored on them
    (tmp_path / "k3").mkdir()
    other = tmp_path / "k3" / "retrained_vq.pt"
    other.write_bytes(b"another VQ-VAE checkpoint")
    retrained = write_codes(tmp_path / "k3", vqvae_ckpt=str(other.resolve()), vqvae_sha256=sha(other))
    for kw in (dict(resume=True, max_steps=4), dict(eval_only=True)):
        with pytest.raises(SystemExit, match="trained on other codes"):
            pt.train(run_cfg(tmp_path, retrained, out_dir=str(tmp_path / "k"), **kw))
    (tmp_path / "k" / "ckpt.pt").write_bytes(b"corrupt")
    with pytest.raises(SystemExit, match="is not a checkpoint these files wrote"):
        pt.train(run_cfg(tmp_path, codes, eval_only=True, out_dir=str(tmp_path / "k")))


def test_command_line_errors_and_help(tmp_path, fake_vqvae, capsys):
    """The flags come from Config; a bad value is one line, no traceback (`__main__` runs through the CLI below)."""
    args = ["--dataset", "mnist", "--codes", str(write_codes(tmp_path)), "--out_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"^prior_transformer.py: error: --top_p must be in \(0, 1\], got 0.0$") as e:
        pt.train(pt.parse_args([*args, "--top_p", "0", "--device", "cpu"]))
    assert "\n" not in str(e.value)
    cfg = pt.parse_args(["--flip", "no", "--conditional=yes", "--n_layer", "3", "--top_p=0.9",
                         "--sweep_temperatures", "0.5,1", "--sweep_top_k=0,32"])
    assert (cfg.flip, cfg.conditional, cfg.n_layer, cfg.top_p) == (False, True, 3, 0.9)
    assert cfg.sweep_temperatures == (0.5, 1.0) and cfg.sweep_top_k == (0, 32)
    with pytest.raises(SystemExit) as e:  # a sweep grid that is not comma-separated numbers: argparse's one line
        pt.parse_args(["--sweep_temperatures", "a,b"])
    assert e.value.code == 2 and "--sweep_temperatures: invalid numbers value: 'a,b'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        pt.parse_args(["-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--attn_drop_p" in out and "Autoregressive prior" in out


# ----------------------------------------------------------------------------- with the real vqvae.py

def test_end_to_end_with_vqvae_cli(cli, data_dir, tmp_path):
    """tiny vqvae.py run -> codes.pt -> prior training -> decoded samples, all through the command lines, then a
    one-line error on the command line (the only subprocesses of this file: each costs seconds of importing torch)."""
    pytest.importorskip("vqvae")
    vq_out, out = tmp_path / "vq", tmp_path / "prior"
    r = cli("vqvae.py", "--dataset", "mnist", "--data_dir", data_dir, "--out_dir", vq_out, "--device", "cpu",
            "--max_steps", "10", "--fid_samples", "0", "--eval_every", "10", "--log_every", "10",
            "--hidden", "16", "--res_hidden", "8", "--codebook_size", "32", "--code_dim", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (vq_out / "codes.pt").exists()
    args = ["--dataset", "mnist", "--data_dir", data_dir, "--codes", vq_out / "codes.pt", "--out_dir", out,
            "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--max_steps", "20",
            "--eval_every", "10", "--log_every", "10", "--n_samples", "16"]
    r = cli("prior_transformer.py", *args, "--fid_samples", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert math.isfinite(res["test_nats_per_code"]) and res["steps"] == 20
    assert (out / "samples.png").exists() and "FINAL prior_transformer mnist" in r.stdout
    # the real vqvae.py's fingerprint: a VQ-VAE checkpoint changed after the codes were written is refused
    ck = torch.load(vq_out / "codes.pt", weights_only=True)["vqvae_ckpt"]
    with open(ck, "ab") as f:
        f.write(b"x")
    r = cli("prior_transformer.py", *args, "--fid_samples", "0", "--out_dir", tmp_path / "p2")  # a bad input, on the CLI
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("prior_transformer.py: error: ") and "is missing or changed since it wrote" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
