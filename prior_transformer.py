"""Autoregressive prior over VQ-VAE codes: a GPT (or an LSTM baseline) that samples code grids, decoded to images.

The VQ-VAE (van den Oord et al. 2017, vqvae.py) turns an image into an H x W grid of K codes; this prior models
p(c) = prod_t p(c_t | c_<t) in raster order with a GPT-2 style decoder (pre-LayerNorm, causal attention, tied
embeddings; nanoGPT) or, with --arch lstm, an LSTM. Deviations: a Transformer, not the paper's PixelCNN prior (as in
VQGAN, Esser et al. 2021); attention dropout masking random past entries (--attn_drop_p), dropout, codes of flipped
images (--flip); --conditional: a class token for the start token. One cross-import: vqvae's load_vqvae, file_fingerprint.
    python vqvae.py --dataset mnist --data_dir ../shared/data               # writes out/vqvae-mnist/codes.pt
    python prior_transformer.py --dataset mnist --data_dir ../shared/data   # defaults sized for one GPU (not run yet)
    python prior_transformer.py --dataset mnist --data_dir ../shared/data --device cpu --n_layer 4 --n_head 4 \\
        --n_embd 128 --dropout 0 --attn_drop_p 0 --batch_size 32 --max_steps 350 --warmup_steps 30 --lr 2e-3
    # ^ 2-core shared CPU, 459 s, codes of a 400-step vqvae.py: val 1.835 nats/code (2.65 bits), top-1/5/10 .47/.81/.90,
    #   FID 360 (VQ-VAE reconstructions 101, independent codes 734). KV cache vs recomputation: 17x at 64 tokens, 38x at
    #   256 (python tests/bench_prior_transformer.py). Writes ckpt.pt, samples.png (decoded), samples.npz, loss.png,
    #   log.txt, results.json (val nats/bits per code, top-1/5/10, fid, ...), sweep.png (--sweep) to --out_dir.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCH_FIELDS = ("arch", "n_layer", "n_head", "n_embd", "conditional")  # define the network


@dataclass
class Config:
    dataset: str = "fashion"  # whose codes: fashion | mnist | cifar10
    data_dir: str = "./data"  # real images, used only by the metrics (FID against the test split)
    codes: str = ""  # codes.pt written by vqvae.py; empty: out/vqvae-<dataset>/codes.pt
    out_dir: str = ""  # empty: out/prior_transformer-<dataset>
    arch: str = "gpt"  # gpt (Transformer) | lstm (recurrent baseline)
    n_layer: int = 8  # Transformer blocks (LSTM layers)
    n_head: int = 8  # attention heads
    n_embd: int = 512  # width of the residual stream (LSTM hidden size)
    dropout: float = 0.1  # on embeddings and residual branches (between LSTM layers)
    attn_drop_p: float = 0.1  # chance of masking each allowed off-diagonal attention entry (training only)
    flip: bool = True  # train on the codes of flipped images half the time, where the codes file has them
    conditional: bool = False  # class-conditional: a class token instead of the start token
    max_steps: int = 10000  # optimizer steps
    batch_size: int = 128  # code grids per step (per process under torchrun)
    lr: float = 5e-4  # AdamW peak, after warmup; cosine decay to lr / 10; gradient norm clipped at 1
    warmup_steps: int = 300  # linear warmup
    weight_decay: float = 0.1  # on matrices and embeddings only
    seed: int = 0
    eval_every: int = 1000  # steps between validation passes (the complete test split) and checkpoints
    sample_every: int = 2000  # steps between refreshing samples.png
    log_every: int = 100  # steps between progress lines
    eval_batch_size: int = 500  # code grids per forward in evaluation and sampling
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in the sample grid (conditional: n_samples // classes per class row)
    fid_samples: int = 10000  # decoded samples for FID / precision / recall (0 skips them)
    temperature: float = 1.0  # softmax temperature of sampling; 0 = greedy
    top_k: int = 0  # sample among the k most likely codes, 1..K; 0 = all codes
    top_p: float = 1.0  # nucleus: the smallest set of codes whose probability reaches top_p, (0, 1]
    sweep: bool = False  # FID / precision / recall over temperature x top_k -> results["sweep"], sweep.png
    sweep_temperatures: str = "0.7,0.85,1.0,1.15"  # comma-separated
    sweep_top_k: str = "0,64,16"  # comma-separated, 0 = all codes
    sweep_samples: int = 2000  # decoded samples per sweep point


CHOICES = {"dataset": ("fashion", "mnist", "cifar10"), "arch": ("gpt", "lstm"), "dtype": ("float32", "bfloat16")}


def boolean(s):  # argparse turns the ValueError into a one-line "invalid boolean value" error
    if s.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(s)
    return s.lower() in ("true", "1", "yes")


def parse_args(argv=None) -> Config:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    for f in dataclasses.fields(Config):
        kind = boolean if f.type is bool else f.type
        p.add_argument(f"--{f.name}", type=kind, default=f.default, choices=CHOICES.get(f.name), help=f.type.__name__)
    return Config(**vars(p.parse_args(argv)))


def fail(msg):
    raise SystemExit(f"prior_transformer.py: error: {msg}")


def check_config(cfg, K=None):
    """Every bad combination in one place (K, the codebook size, once the codes file is read). -> the sweep grid."""
    try:  # "0.7,1.0" -> [0.7, 1.0]; parsed even without --sweep, so that a typo never waits for the end of a run
        temps, ks = [float(s) for s in cfg.sweep_temperatures.split(",")], [int(s) for s in cfg.sweep_top_k.split(",")]
    except ValueError:
        fail("--sweep_temperatures and --sweep_top_k must be comma-separated numbers (e.g. 0.8,1.0 and 0,16)")
    bad_t = ", ".join(str(t) for t in [cfg.temperature] + temps * cfg.sweep if t < 0)  # the grid counts with --sweep only
    bad_k = ", ".join(str(k) for k in [cfg.top_k] + ks * cfg.sweep if not 0 <= k <= (K or k))
    for name, ok in CHOICES.items():
        if getattr(cfg, name) not in ok:
            fail(f"unknown {name} {getattr(cfg, name)!r}; expected one of {', '.join(ok)}")
    for bad, msg in [(cfg.arch == "gpt" and cfg.n_embd % cfg.n_head,
                      f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}"),
                     (bad_t, f"--temperature must be >= 0 (0 = greedy), got {bad_t}"),
                     (bad_k, f"--top_k must be in 1..K{f' = 1..{K}' if K else ''} (0 = all codes), got {bad_k}"),
                     (not 0 < cfg.top_p <= 1, f"--top_p must be in (0, 1], got {cfg.top_p}"),
                     (cfg.sweep_samples < 1 or not (0 <= cfg.dropout < 1 and 0 <= cfg.attn_drop_p < 1),
                      "--sweep_samples must be >= 1, --dropout and --attn_drop_p in [0, 1)"),
                     (min(cfg.batch_size, cfg.eval_batch_size, cfg.eval_every, cfg.sample_every, cfg.log_every,
                          cfg.n_samples) < 1, "--batch_size, --eval_batch_size, --*_every, --n_samples must be >= 1"),
                     (cfg.dtype == "bfloat16" and pick_device(cfg.device).type != "cuda",
                      "--dtype bfloat16 is autocast on CUDA; use --dtype float32 on this device")]:
        if bad:
            fail(msg)
    return temps, ks


# ----------------------------------------------------------------------------- model

def attn_drop_mask(T, p, batch_shape, device):
    """Boolean [*batch_shape, T, T], True = may attend: the causal mask minus random off-diagonal entries."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    drop = torch.rand(*batch_shape, T, T, device=device) < p
    return causal & ~(drop & ~torch.eye(T, dtype=torch.bool, device=device))  # the diagonal keeps rows non-empty


class Block(nn.Module):
    """Pre-LayerNorm residual block (GPT-2): x + attention(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg):
        super().__init__()
        C, self.n_head, self.p = cfg.n_embd, cfg.n_head, cfg.attn_drop_p
        self.ln1, self.qkv, self.proj = nn.LayerNorm(C), nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.ln2, self.mlp = nn.LayerNorm(C), nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None):  # x [B, T, C]; cache {"k", "v": [B, nh, t, hd]} of the earlier positions
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # [B, nh, T, hd]
        if cache is not None:  # KV cache: keys and values of the past are computed once
            k, v = (torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)) if cache else (k, v)
            cache["k"], cache["v"] = k, v
        if self.training and self.p > 0:  # attention dropout: a fresh random causal mask per example and head
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_drop_mask(T, self.p, (B, self.n_head), x.device))
        else:  # causal; with a cache, tokens come one at a time (T = 1) and may see every cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Prior(nn.Module):
    """p(c_t | c_<t) over K codes: embeddings, a GPT (or LSTM) body, tied output layer; loss, accuracy, sampling."""

    def __init__(self, cfg, K, T, n_classes=0):
        super().__init__()
        self.K, self.T, self.n_classes, C = K, T, n_classes, cfg.n_embd
        self.wte = nn.Embedding(K + max(1, n_classes), C)  # codes 0..K-1, then the start token or the class tokens
        self.wpe = nn.Embedding(T, C)  # learned positions 0..T-1 of the input sequence
        self.drop, self.ln_f = nn.Dropout(cfg.dropout), nn.LayerNorm(C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer) if cfg.arch == "gpt")  # none for the LSTM
        lstm = cfg.arch == "lstm"  # the recurrent baseline keeps PyTorch's own init
        self.lstm = nn.LSTM(C, C, cfg.n_layer, batch_first=True, dropout=cfg.dropout * (cfg.n_layer > 1)) if lstm else None
        for name, p in self.named_parameters():  # GPT-2: N(0, 0.02) weights, zero biases
            if "lstm" not in name and "ln" not in name:
                nn.init.normal_(p, 0.0, 0.02) if p.dim() >= 2 else nn.init.zeros_(p)

    def start(self, n, y=None, device=None):  # the first input token: start (K), or class token K + y
        return torch.full((n,), self.K, device=device) if y is None else self.K + y

    def logits(self, idx, cache=None, t0=0):  # idx [B, T'] input tokens at positions t0.. -> [B, T', K]
        h = self.drop(self.wte(idx) + self.wpe(torch.arange(t0, t0 + idx.shape[1], device=idx.device)))
        if self.lstm is not None:  # the cache of an RNN is its state (h, c)
            h, state = self.lstm(h, None if cache is None else cache.get("hc"))
            if cache is not None:
                cache["hc"] = state
        for i, block in enumerate(self.blocks):  # the cache of a GPT: {layer: {"k", "v"}}
            h = block(h, None if cache is None else cache.setdefault(i, {}))
        return F.linear(self.ln_f(h), self.wte.weight[: self.K])  # weight tying; start tokens are never predicted

    def forward(self, x, y=None):
        """x [B, T] codes in raster order, y [B] labels (conditional) -> loss in nats per code, stats."""
        inp = torch.cat([self.start(len(x), y, x.device)[:, None], x[:, :-1]], 1)  # shifted right by one
        logits = self.logits(inp).float()
        loss = F.cross_entropy(logits.reshape(-1, self.K), x.reshape(-1))
        stats = {"nats_per_code": loss.detach()}
        if not self.training:  # top-k accuracy: near-identical codes make exact (top-1) accuracy misleading
            hit = logits.topk(min(10, self.K), -1).indices == x[..., None]  # [B, T, 10]
            stats.update({f"top{k}": hit[..., :k].any(-1).float().mean() for k in (1, 5, 10)})
        return loss, stats

    @torch.inference_mode()
    def sample(self, n, generator=None, y=None, temperature=1.0, top_k=0, top_p=1.0, use_cache=True):
        """n code sequences [n, T]; use_cache=False recomputes the whole prefix at every step (for comparison)."""
        seq, cache = self.start(n, y, self.wpe.weight.device)[:, None], {} if use_cache else None
        for t in range(self.T):  # with the cache each step feeds one token: O(t) work per step instead of O(t^2)
            logits = self.logits(seq[:, -1:], cache, t) if use_cache else self.logits(seq)
            seq = torch.cat([seq, sample_logits(logits[:, -1], generator, temperature, top_k, top_p)[:, None]], 1)
        return seq[:, 1:]


def filter_logits(logits, top_k=0, top_p=1.0):
    """-inf outside the top_k largest logits and outside the nucleus (Holtzman et al. 2020) of mass top_p."""
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[..., -1:], float("-inf"))
    if top_p < 1:
        srt, idx = logits.sort(-1, descending=True)
        p = srt.softmax(-1)  # renormalized over what top_k kept
        drop = p.cumsum(-1) - p >= top_p  # the codes before it already hold top_p (the top code always stays)
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return logits


def sample_logits(logits, generator=None, temperature=1.0, top_k=0, top_p=1.0):  # logits [B, K] -> codes [B]
    if temperature == 0:
        return logits.argmax(-1)  # greedy
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------- codes (the contract with vqvae.py)

def load_codes(cfg, device):
    """codes.pt of vqvae.py checked (format, dataset, code range, labels, VQ-VAE fingerprint) -> (codes, its VQVAE)."""
    path = cfg.codes or f"out/vqvae-{cfg.dataset}/codes.pt"
    if not os.path.exists(path):
        fail(f"no codes file at {path}: run `python vqvae.py --dataset {cfg.dataset}` first (or pass --codes)")
    try:
        from vqvae import file_fingerprint, load_vqvae  # the one cross-import of the repository
    except ImportError as e:
        fail(f"cannot import vqvae.py ({e}); keep it next to prior_transformer.py")
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
        assert c["format"] == "vqvae-codes-v1"
        K, grid, ck, sha, ds = int(c["codebook_size"]), tuple(c["grid"]), c["vqvae_ckpt"], c["vqvae_sha256"], c["dataset"]
    except Exception as e:
        fail(f"{path} is not a codes file of vqvae.py (format vqvae-codes-v1): {type(e).__name__}")
    bad = [s for s in ("train", "test", "train_flip") if c.get(s) is not None and (c[s].dim() != 3 or
           tuple(c[s].shape[1:]) != grid or c[s].min() < 0 or c[s].max() >= K)]
    for wrong, msg in [(ds != cfg.dataset, f"{path} holds {ds} codes but --dataset is {cfg.dataset}"),
                       (bad, f"codebook size mismatch: {path} {bad} not [N, {grid[0]}, {grid[1]}] grids of codes in 0..{K - 1}"),
                       (not os.path.exists(ck), f"the VQ-VAE checkpoint {ck} named by {path} is missing: rerun "
                                                f"`python vqvae.py --dataset {cfg.dataset}`"),
                       (os.path.exists(ck) and file_fingerprint(ck) != sha,
                        f"{ck} changed since {path} was written (fingerprint mismatch): rewrite the codes with "
                        f"`python vqvae.py --dataset {cfg.dataset} --eval_only --write_codes`"),
                       (cfg.conditional and (c.get("train_labels") is None or c.get("test_labels") is None),
                        f"--conditional needs class labels but {path} has none")]:
        if wrong:
            fail(msg)
    return c, load_vqvae(ck, device)


# ----------------------------------------------------------------------------- evaluation and sampling

@torch.inference_mode()
def evaluate(model, X, Y, cfg):
    """Mean loss (nats and bits per code) and top-1/5/10 accuracy over every code of the complete split."""
    model.eval()
    sums, bs = {}, cfg.eval_batch_size
    for xb, yb in zip(X.split(bs), [None] * len(X) if Y is None else Y.split(bs)):
        sums = {k: sums.get(k, 0.0) + v.item() * len(xb) for k, v in model(xb, yb)[1].items()}  # every grid has T codes
    model.train()
    res = {f"val_{k}": v / len(X) for k, v in sums.items()}
    return {**res, "val_bits_per_code": res["val_nats_per_code"] / math.log(2)}


@torch.inference_mode()
def generate(model, decode, n, cfg, seed):
    """n samples at cfg's temperature / top_k / top_p, decoded: uint8 [n, C, h, w] on the CPU, and samples per second.
    Its own generator (the same noise every time); a conditional model gets the classes in equal blocks, in order."""
    model.eval()
    g, t0 = torch.Generator(model.wpe.weight.device).manual_seed(seed), time.perf_counter()
    ys = (torch.arange(n, device=g.device) * max(1, model.n_classes) // n).split(cfg.eval_batch_size)  # class labels
    imgs = torch.cat([decode(model.sample(len(y), g, y if model.n_classes else None, cfg.temperature, cfg.top_k, cfg.top_p))
                      for y in ys])
    model.train()
    return imgs, n / (time.perf_counter() - t0)


def save_samples(model, decode, cfg):  # samples.png; conditional: one row per class. Returns samples per second
    nc = model.n_classes
    nrow = max(1, cfg.n_samples // nc) if nc else max(1, int(math.sqrt(cfg.n_samples)))
    imgs, per_s = generate(model, decode, nc * nrow or cfg.n_samples, cfg, cfg.seed)
    torchvision.utils.save_image(imgs / 255, os.path.join(cfg.out_dir, "samples.png"), nrow=nrow)
    return per_s


def score(model, decode, cfg, n, log, npz=None):
    """n decoded samples: samples per second, and metrics.py's FID / precision / recall / density / coverage."""
    imgs, per_s = generate(model, decode, n, cfg, cfg.seed + 2)
    res = {"sample_images_per_s": per_s, **dict.fromkeys(("fid", "precision", "recall", "fid_features"))}
    if npz:
        np.savez_compressed(npz, images=imgs.numpy())
    try:
        import metrics  # lazily: a copied file runs alone with --fid_samples 0

        m = metrics.evaluate(imgs, cfg.dataset, cfg.data_dir, model.wpe.weight.device)
        res.update({k: v for k, v in m.items() if k != "n"})
    except (Exception, SystemExit) as e:  # a broken yardstick must not lose a finished run
        log(f"metrics.py failed, fid left empty: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    return res


def sweep(model, decode, cfg, log):
    """FID / precision / recall over temperature x top_k: lower ones trade recall for precision. -> rows, sweep.png"""
    (temps, ks), rows, names = check_config(cfg), [], ("fid", "precision", "recall", "density", "coverage")
    for k, t in [(k, t) for k in ks for t in temps]:
        m = score(model, decode, dataclasses.replace(cfg, temperature=t, top_k=k), cfg.sweep_samples, log)
        rows.append({"temperature": t, "top_k": k, **{n: m.get(n) for n in names}})
        log(f"sweep temperature {t} top_k {k} | " + " | ".join(f"{n} {m[n]:.3f}" for n in names if m.get(n) is not None))
    curve = lambda n, k: tuple(zip(*[(r["temperature"], r[n]) for r in rows if r["top_k"] == k]))  # (xs, ys)
    plot(os.path.join(cfg.out_dir, "sweep.png"), {n: {f"top_k {k or 'all'}": curve(n, k) for k in ks} for n in names[:3]},
         "temperature")
    return rows


def plot(path, panels, xlabel, ylabel=None):
    """One panel per {title: {label: (xs, ys)}} entry; the y label is the title unless given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, lines) in zip(axs[0], panels.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", lw=1, label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel or title)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- training

def load_checkpoint(path, cfg):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path} (train first, or check --out_dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        diff = {k: (ckpt["config"][k], getattr(cfg, k)) for k in ARCH_FIELDS if ckpt["config"][k] != getattr(cfg, k)}
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    if cfg.resume and diff:
        fail(f"checkpoint {path} was made with another model (saved vs asked: {diff}); use another --out_dir")
    return ckpt


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def setup_distributed(device):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPU). Returns (device, rank, world)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def make_logger(path, master):
    def log(msg):  # only rank 0 prints and writes
        if master:
            print(msg, flush=True)
            with open(path, "a") as f:
                f.write(msg + "\n")
    return log


def train(cfg: Config) -> dict:
    check_config(cfg)
    cfg.out_dir = cfg.out_dir or f"out/prior_transformer-{cfg.dataset}"
    device, rank, world = setup_distributed(pick_device(cfg.device))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg) if cfg.resume or cfg.eval_only else None
    if cfg.eval_only:  # rebuild the model the checkpoint describes, whatever the command line says
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    codes, vq = load_codes(cfg, device)
    K, grid = int(codes["codebook_size"]), tuple(codes["grid"])
    check_config(cfg, K)
    meta = {"codebook_size": K, "grid": list(grid), "n_classes": int(codes["train_labels"].max()) + 1 if cfg.conditional else 0,
            "dataset": codes["dataset"], "vqvae_sha256": codes["vqvae_sha256"]}  # a prior is tied to its codebook
    if ckpt is not None and ckpt.get("meta") != meta:
        fail(f"checkpoint {ckpt_path} was trained on other codes (codebook size, grid, classes, dataset or VQ-VAE): "
             f"it models {ckpt.get('meta')}, the codes file has {meta}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = make_logger(os.path.join(cfg.out_dir, "log.txt"), master=rank == 0)
    torch.manual_seed(cfg.seed + rank)
    flat = lambda t: t.reshape(len(t), -1).long().to(device)  # [N, H, W] -> [N, T] in raster order, on the device
    x_train, x_test = flat(codes["train"]), flat(codes["test"])
    x_flip = flat(codes["train_flip"]) if cfg.flip and codes.get("train_flip") is not None else None
    y_train, y_test = (codes["train_labels"].to(device), codes["test_labels"].to(device)) if cfg.conditional else (None, None)
    decode = lambda c: (vq.decode_codes(c.view(-1, *grid)).float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    model = Prior(cfg, K, x_train.shape[1], meta["n_classes"]).to(device)
    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | processes {world} | K {K} grid {grid} | "
        f"{cfg.arch} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | flip {x_flip is not None}")
    groups = [{"params": [p for p in model.parameters() if (p.dim() >= 2) == d], "weight_decay": cfg.weight_decay * d}
              for d in (True, False)]  # AdamW decays matrices and embeddings, not biases and LayerNorm gains
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)  # batch indices and flips
    step, history, evals = 0, [], []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            g.set_state(ckpt["rng"]) if rank == 0 else g.manual_seed(cfg.seed + 1000 * rank + ckpt["step"])
            step, history, evals = ckpt["step"], ckpt["history"], ckpt["evals"]
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint {ckpt_path} does not fit this model: {(str(e).splitlines() or [''])[0]}")
        log(f"loaded {ckpt_path} at step {step}")
    fwd = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()

    def lr_at(s):  # linear warmup, then cosine decay from lr to lr / 10 at max_steps
        q = min(1.0, max(0, s - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.lr * min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * (0.1 + 0.45 * (1 + math.cos(math.pi * q)))

    def checkpoint(results=None):
        if history and not math.isfinite(history[-1][1]):  # never overwrite the last good checkpoint with a diverged model
            fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
        if rank == 0:  # write, then rename: a crash never leaves a half-written ckpt.pt
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg),
                        "results": results, "meta": meta, "history": history, "evals": evals, "rng": g.get_state()},
                       ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)

    def validate():
        with autocast:
            ev = evaluate(model, x_test, y_test, cfg)
        evals.append((step, ev["val_nats_per_code"]))
        log(f"eval step {step} | val {ev['val_nats_per_code']:.4f} nats/code ({ev['val_bits_per_code']:.4f} bits/code)"
            f" | top1 {ev['val_top1']:.3f} top5 {ev['val_top5']:.3f} top10 {ev['val_top10']:.3f}")
        return ev

    t_train, t0, start_step, last_log, loss_sum = 0.0, time.perf_counter(), step, step, 0.0
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        idx = torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)
        x = x_train[idx] if x_flip is None else torch.where(  # augmentation: the mirrored image's codes, half of the time
            torch.rand(len(idx), 1, device=device, generator=g) < 0.5, x_flip[idx], x_train[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with autocast:
            loss, _ = fwd(x, None if y_train is None else y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_sum = loss_sum + loss.detach()  # summed on the device, read at log steps only
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            history.append((step, loss_sum.item() / (step - last_log)))  # mean over the steps since the last line
            loss_sum, last_log = 0.0, step
            if not math.isfinite(history[-1][1]):
                checkpoint()  # fails with its one-line message; the last good checkpoint stays
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {history[-1][1]:.4f} nats/code | "
                f"{(step - start_step) * cfg.batch_size / t_train:.0f} img/s | lr {lr_at(step):.2e} | eta {eta / 60:.1f}m")
        if rank == 0 and step % cfg.sample_every == 0:
            save_samples(model, decode, cfg)
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            if rank == 0:
                validate()
            checkpoint()
    if not cfg.eval_only:
        checkpoint()  # before the final evaluation and sampling, so no training is lost
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    res = {**validate(), "train_nats_per_code": history[-1][1] if history else None}  # the last log window, dropout on
    res["sample_images_per_s"] = save_samples(model, decode, cfg)  # replaced by the larger FID batch's rate
    if cfg.fid_samples > 0:
        res.update(score(model, decode, cfg, cfg.fid_samples, log, npz=os.path.join(cfg.out_dir, "samples.npz")))
        vq_res = os.path.join(os.path.dirname(codes["vqvae_ckpt"]), "results.json")  # vqvae.py's numbers, if there
        vq_res = json.load(open(vq_res)) if os.path.exists(vq_res) else {}
        res.update(vqvae_recon_fid=vq_res.get("fid"), vqvae_independent_fid=vq_res.get("fid_independent"))  # ceiling, floor
    if cfg.sweep:
        res["sweep"] = sweep(model, decode, cfg, log)
    res.update(steps=step, wall_s=time.perf_counter() - t0, device=str(device), config=asdict(cfg),
               n_params=sum(p.numel() for p in model.parameters()),
               train_images_per_s=(step - start_step) * cfg.batch_size * world / t_train if t_train else None)
    if not cfg.eval_only:
        checkpoint(res)
        plot(os.path.join(cfg.out_dir, "loss.png"), {"loss": {"train": tuple(zip(*history)), "validation": tuple(zip(*evals))}},
             "step", "nats / code")
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={res[k]:.4g}" for k in ("val_nats_per_code", "val_bits_per_code", "val_top1", "fid")
                     if isinstance(res.get(k), float))
    log(f"FINAL prior_transformer {cfg.dataset} {shown} steps={step} time={res['wall_s']:.0f}s device={device}")
    return res


if __name__ == "__main__":
    train(parse_args())
