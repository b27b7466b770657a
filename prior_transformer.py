"""Autoregressive prior over VQ-VAE codes: a GPT (or an LSTM baseline) that samples code grids, decoded to images.

The VQ-VAE (van den Oord et al. 2017, vqvae.py) turns an image into an H x W grid of K codes; this prior
models p(c) = prod_t p(c_t | c_<t) over the grid in raster order with a decoder-only Transformer (GPT-2
style: pre-LayerNorm, causal attention, tied embeddings; nanoGPT) or, with --arch lstm, an LSTM. Deviations
from the paper: a Transformer instead of the PixelCNN prior (as in VQGAN, Esser et al. 2021); regularized by
attention dropout that masks random past entries of the attention matrix (--attn_drop_p), dropout and the
codes of flipped images (--flip, not for digits); --conditional puts a class token in place of the start token.
The one cross-import in the repository: `from vqvae import load_vqvae, file_fingerprint` (to decode codes).

    python vqvae.py --dataset mnist --data_dir ../shared/data              # writes out/vqvae-mnist/codes.pt
    python prior_transformer.py --dataset mnist --data_dir ../shared/data  # defaults sized for one GPU (not run yet)
    python prior_transformer.py --dataset mnist --data_dir ../shared/data --device cpu --n_layer 4 --n_head 4 \
        --n_embd 128 --dropout 0 --attn_drop_p 0 --batch_size 32 --max_steps 350 --warmup_steps 30 --lr 2e-3
    # ^ 2-core shared CPU, 459 s, codes of a 400-step vqvae.py: val 1.835 nats/code (2.65 bits), top-1/5/10
    #   0.47/0.81/0.90, FID 360 (classifier features; VQ-VAE reconstructions 101, independent codes 734)
    python tests/bench_prior_transformer.py  # KV cache vs recomputation: 17x at 64 tokens, 38x at 256 (CPU)
Writes to --out_dir: ckpt.pt, samples.png (decoded), samples.npz, loss.png, log.txt, results.json
(val_nats_per_code, val_bits_per_code, val_top1/5/10 on the test codes, fid, ...), sweep.png with --sweep.
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


def parse_args(argv=None) -> Config:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    as_bool = lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    for f in dataclasses.fields(Config):
        kind = as_bool if f.type is bool else f.type
        p.add_argument(f"--{f.name}", type=kind, default=f.default, choices=CHOICES.get(f.name), help=f.type.__name__)
    return Config(**vars(p.parse_args(argv)))


def fail(msg):
    raise SystemExit(f"prior_transformer.py: error: {msg}")


def sweep_grid(cfg):
    try:
        return [float(t) for t in cfg.sweep_temperatures.split(",")], [int(k) for k in cfg.sweep_top_k.split(",")]
    except ValueError:
        fail("--sweep_temperatures and --sweep_top_k must be comma-separated numbers (e.g. 0.8,1.0 and 0,16)")


def check_config(cfg, K=None):
    """Every bad combination in one place; K (codebook size) once the codes file is read."""
    for name in (n for n, allowed in CHOICES.items() if getattr(cfg, n) not in allowed):
        fail(f"unknown {name} {getattr(cfg, name)!r}; expected one of {', '.join(CHOICES[name])}")
    if cfg.arch == "gpt" and cfg.n_embd % cfg.n_head:
        fail(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}")
    if cfg.temperature < 0:
        fail(f"--temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    temps, ks = sweep_grid(cfg)
    for k in [cfg.top_k] + (ks if cfg.sweep else []):
        if k < 0 or (K is not None and k > K):
            fail(f"--top_k must be in 1..K{f' = 1..{K}' if K else ''} (0 = all codes), got {k}")
    if not 0 < cfg.top_p <= 1:
        fail(f"--top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.sweep and (min(temps) < 0 or cfg.sweep_samples <= 0) or not (0 <= cfg.dropout < 1 and 0 <= cfg.attn_drop_p < 1):
        fail("--sweep needs temperatures >= 0 and --sweep_samples > 0; --dropout and --attn_drop_p lie in [0, 1)")
    if cfg.dtype == "bfloat16" and not cfg.device.startswith("cuda") and not (cfg.device == "auto" and torch.cuda.is_available()):
        fail("--dtype bfloat16 is autocast on CUDA; use --dtype float32 on this device")


# ----------------------------------------------------------------------------- model

def attn_drop_mask(T, p, batch_shape, device):
    """Boolean [*batch_shape, T, T], True = may attend: the causal mask minus random off-diagonal entries."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    drop = torch.rand(*batch_shape, T, T, device=device) < p
    return causal & ~(drop & ~torch.eye(T, dtype=torch.bool, device=device))  # the diagonal keeps rows non-empty


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.p = cfg.n_head, cfg.attn_drop_p
        self.qkv, self.proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd), nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cache=None):  # x [B, T, C]; cache {"k", "v": [B, nh, t, hd]} of earlier positions
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # [B, nh, T, hd]
        if cache is not None:  # KV cache: keys and values of the past are computed once
            k, v = (torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)) if cache else (k, v)
            cache["k"], cache["v"] = k, v
        if self.training and self.p > 0:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_drop_mask(T, self.p, (B, self.n_head), x.device))
        else:  # with a cache, tokens come one at a time (T = 1) and may see every cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(cfg.n_embd), SelfAttention(cfg), nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None):  # pre-LayerNorm residual block (GPT-2)
        x = x + self.drop(self.attn(self.ln1(x), cache))
        return x + self.drop(self.mlp(self.ln2(x)))


class Prior(nn.Module):
    """What both architectures share: embeddings, tied output layer, loss, accuracy, sampling."""

    def __init__(self, cfg, K, T, n_classes=0):
        super().__init__()
        self.K, self.T, self.n_classes = K, T, n_classes
        self.wte = nn.Embedding(K + max(1, n_classes), cfg.n_embd)  # codes 0..K-1, then the start/class tokens
        self.wpe = nn.Embedding(T, cfg.n_embd)  # learned positions 0..T-1 of the input sequence
        self.drop, self.ln_f = nn.Dropout(cfg.dropout), nn.LayerNorm(cfg.n_embd)

    def init_weights(self):  # GPT-2: N(0, 0.02) weights, zero biases (the LSTM keeps PyTorch's own init)
        for name, p in self.named_parameters():
            if "lstm" not in name and "ln" not in name:
                nn.init.normal_(p, 0.0, 0.02) if p.dim() >= 2 else nn.init.zeros_(p)

    def start(self, n, y=None, device=None):  # the first input token: start (K), or class token K + y
        return torch.full((n,), self.K, device=device) if y is None else self.K + y

    def logits(self, idx, cache=None, t0=0):  # idx [B, T'] input tokens at positions t0.. -> [B, T', K]
        pos = torch.arange(t0, t0 + idx.shape[1], device=idx.device)
        h = self.body(self.drop(self.wte(idx) + self.wpe(pos)), cache)
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
        for t in range(self.T):
            logits = self.logits(seq[:, -1:], cache, t) if use_cache else self.logits(seq)
            seq = torch.cat([seq, sample_logits(logits[:, -1], generator, temperature, top_k, top_p)[:, None]], 1)
        return seq[:, 1:]


class GPT(Prior):
    def __init__(self, cfg, K, T, n_classes=0):
        super().__init__(cfg, K, T, n_classes)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.init_weights()

    def body(self, x, cache=None):  # cache: {layer: {"k", "v"}}
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.setdefault(i, {}))
        return x


class LSTM(Prior):
    def __init__(self, cfg, K, T, n_classes=0):
        super().__init__(cfg, K, T, n_classes)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.n_embd, cfg.n_layer, batch_first=True, dropout=cfg.dropout * (cfg.n_layer > 1))
        self.init_weights()

    def body(self, x, cache=None):  # the cache of an RNN is its state (h, c)
        h, state = self.lstm(x, None if cache is None else cache.get("hc"))
        if cache is not None:
            cache["hc"] = state
        return h


def build_model(cfg, K, T, n_classes):
    return (GPT if cfg.arch == "gpt" else LSTM)(cfg, K, T, n_classes)


def filter_logits(logits, top_k=0, top_p=1.0):
    """-inf outside the top_k largest logits and outside the nucleus (Holtzman et al. 2020) of mass top_p."""
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[..., -1:], float("-inf"))
    if top_p < 1:
        srt, idx = logits.sort(-1, descending=True)
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the codes before it already hold top_p (the top code always stays)
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return logits


def sample_logits(logits, generator=None, temperature=1.0, top_k=0, top_p=1.0):  # logits [B, K] -> codes [B]
    if temperature == 0:
        return logits.argmax(-1)  # greedy
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------- codes (the contract with vqvae.py)

def load_codes(cfg):
    """codes.pt of vqvae.py, checked: format, dataset, code range, labels, fingerprint of its VQ-VAE checkpoint."""
    path = cfg.codes or f"out/vqvae-{cfg.dataset}/codes.pt"
    if not os.path.exists(path):
        fail(f"no codes file at {path}: run `python vqvae.py --dataset {cfg.dataset}` first (or pass --codes)")
    try:
        from vqvae import file_fingerprint  # the one cross-import of the repository
    except ImportError as e:
        fail(f"cannot import vqvae.py ({e}); keep it next to prior_transformer.py")
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
        assert c["format"] == "vqvae-codes-v1"
        K, grid, ck = int(c["codebook_size"]), tuple(c["grid"]), c["vqvae_ckpt"]
    except Exception as e:
        fail(f"{path} is not a codes file of vqvae.py (format vqvae-codes-v1): {type(e).__name__}")
    if c["dataset"] != cfg.dataset:
        fail(f"{path} holds {c['dataset']} codes but --dataset is {cfg.dataset}")
    for split in ("train", "test", "train_flip"):
        x = c.get(split)
        if x is not None and (x.dim() != 3 or tuple(x.shape[1:]) != grid or x.min() < 0 or x.max() >= K):
            fail(f"codebook size mismatch: {path} '{split}' is not a [N, {grid[0]}, {grid[1]}] grid of codes in 0..{K - 1}")
    if not os.path.exists(ck):
        fail(f"the VQ-VAE checkpoint {ck} named by {path} is missing: rerun `python vqvae.py --dataset {cfg.dataset}`")
    if file_fingerprint(ck) != c["vqvae_sha256"]:
        fail(f"{ck} changed since {path} was written (fingerprint mismatch): rewrite the codes with "
             f"`python vqvae.py --dataset {cfg.dataset} --eval_only --write_codes`")
    if cfg.conditional and (c.get("train_labels") is None or c.get("test_labels") is None):
        fail(f"--conditional needs class labels but {path} has none")
    return c


# ----------------------------------------------------------------------------- evaluation and sampling

@torch.inference_mode()
def evaluate(model, X, Y, cfg):
    """Mean loss (nats and bits per code) and top-1/5/10 accuracy over every code of the complete split."""
    model.eval()
    sums, bs = {}, cfg.eval_batch_size
    for i in range(0, len(X), bs):
        stats = model(X[i : i + bs], None if Y is None else Y[i : i + bs])[1]
        sums = {k: sums.get(k, 0.0) + v.item() * len(X[i : i + bs]) for k, v in stats.items()}  # every grid has T codes
    model.train()
    res = {f"val_{k}": v / len(X) for k, v in sums.items()}
    res["val_bits_per_code"] = res["val_nats_per_code"] / math.log(2)
    return res


@torch.inference_mode()
def generate(model, vq, n, labels, grid, cfg, g, temperature, top_k, top_p):
    """n images decoded from sampled codes, uint8 [n, C, h, w] on the CPU; labels [n] for a conditional model."""
    model.eval()
    out, bs = [], cfg.eval_batch_size
    for i in range(0, n, bs):
        y = None if labels is None else labels[i : i + bs].to(g.device)
        codes = model.sample(min(bs, n - i), g, y, temperature, top_k, top_p).view(-1, *grid)
        out.append((vq.decode_codes(codes).float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    model.train()
    return torch.cat(out)


def sample_grid(model, vq, grid, cfg, device, path):
    """samples.png with the same noise every time; a conditional model gets one row per class."""
    nc, g = model.n_classes, torch.Generator(device).manual_seed(cfg.seed)
    per_row = max(1, cfg.n_samples // nc) if nc else max(1, int(math.sqrt(cfg.n_samples)))
    labels = torch.arange(nc).repeat_interleave(per_row) if nc else None
    imgs = generate(model, vq, nc * per_row or cfg.n_samples, labels, grid, cfg, g, cfg.temperature, cfg.top_k, cfg.top_p)
    torchvision.utils.save_image(imgs.float() / 255, path, nrow=per_row)


def score(model, vq, grid, cfg, device, n, temperature, top_k, top_p, log, npz=None):
    """n decoded samples (classes in turn when conditional): images per second and metrics.py's numbers."""
    g = torch.Generator(device).manual_seed(cfg.seed + 2)
    labels = torch.arange(n) % model.n_classes if model.n_classes else None
    t0 = time.perf_counter()
    imgs = generate(model, vq, n, labels, grid, cfg, g, temperature, top_k, top_p)
    res = {"sample_images_per_s": n / (time.perf_counter() - t0), "fid": None, "precision": None, "recall": None, "fid_features": None}
    if npz:
        np.savez_compressed(npz, images=imgs.numpy())
    try:
        import metrics  # lazily: a copied file runs alone with --fid_samples 0

        res.update({k: v for k, v in metrics.evaluate(imgs, cfg.dataset, cfg.data_dir, device).items() if k != "n"})
    except (Exception, SystemExit) as e:  # a broken yardstick must not lose a finished run
        log(f"metrics.py failed, fid left empty: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return res


def sweep(model, vq, grid, cfg, device, log):
    """FID / precision / recall over temperature x top_k: lower ones trade recall for precision. -> rows, sweep.png"""
    (temps, ks), rows = sweep_grid(cfg), []
    for k in ks:
        for t in temps:
            m = score(model, vq, grid, cfg, device, cfg.sweep_samples, t, k, cfg.top_p, log)
            rows.append({"temperature": t, "top_k": k, **{n: m.get(n) for n in ("fid", "precision", "recall", "density", "coverage")}})
            log(f"sweep temperature {t} top_k {k} | " + " | ".join(f"{n} {v:.3f}" for n, v in rows[-1].items() if n in m and v is not None))
    curve = lambda m, k: tuple(zip(*[(r["temperature"], r[m]) for r in rows if r["top_k"] == k]))
    plot(os.path.join(cfg.out_dir, "sweep.png"), {m: {f"top_k {k or 'all'}": curve(m, k) for k in ks} for m in ("fid", "precision", "recall")}, "temperature")
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

def lr_at(step, cfg):  # linear warmup, then cosine decay from lr to lr / 10 at max_steps
    q = min(1.0, max(0, step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * (0.1 + 0.45 * (1 + math.cos(math.pi * q)))


def save_checkpoint(path, state):
    torch.save(state, path + ".tmp")  # write then rename: a crash never leaves a half-written ckpt.pt
    os.replace(path + ".tmp", path)


def load_checkpoint(path, cfg):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path} (train first, or check --out_dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = {k: ckpt["config"][k] for k in ARCH_FIELDS}
        ckpt["model"], ckpt["step"], ckpt["meta"]["codebook_size"]
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if cfg.resume and any(saved[k] != getattr(cfg, k) for k in ARCH_FIELDS):
        diff = {k: (saved[k], getattr(cfg, k)) for k in ARCH_FIELDS if saved[k] != getattr(cfg, k)}
        fail(f"checkpoint {path} was made with another model (saved vs asked: {diff}); use another --out_dir")
    return ckpt


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def train(cfg: Config) -> dict:
    check_config(cfg)
    cfg.out_dir = cfg.out_dir or f"out/prior_transformer-{cfg.dataset}"
    ddp, device = int(os.environ.get("WORLD_SIZE", 1)) > 1, pick_device(cfg.device)
    if ddp:  # torchrun: one process per device, gradients averaged by DDP
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0  # only rank 0 prints and writes
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg) if cfg.resume or cfg.eval_only else None
    if cfg.eval_only:  # rebuild the model the checkpoint describes, whatever the command line says
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    codes = load_codes(cfg)
    K, grid = int(codes["codebook_size"]), tuple(codes["grid"])
    check_config(cfg, K)
    meta = {"codebook_size": K, "grid": list(grid), "n_classes": int(codes["train_labels"].max()) + 1 if cfg.conditional else 0}
    if ckpt is not None and ckpt["meta"] != meta:
        fail(f"codebook size mismatch: checkpoint {ckpt_path} models {ckpt['meta']} but the codes file has {meta}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_file = open(os.path.join(cfg.out_dir, "log.txt"), "a") if master else None

    def log(msg):
        if master:
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | world {world} | K {K} grid {grid}")
    torch.manual_seed(cfg.seed + rank)
    flat = lambda t: t.reshape(len(t), -1).long().to(device)  # [N, H, W] -> [N, T] in raster order
    x_train, x_test = flat(codes["train"]), flat(codes["test"])
    x_flip = flat(codes["train_flip"]) if cfg.flip and codes.get("train_flip") is not None else None
    y_train, y_test = (codes["train_labels"].to(device), codes["test_labels"].to(device)) if cfg.conditional else (None, None)
    model = build_model(cfg, K, x_train.shape[1], meta["n_classes"]).to(device)
    groups = [{"params": [p for p in model.parameters() if (p.dim() >= 2) == d], "weight_decay": cfg.weight_decay * d}
              for d in (True, False)]  # AdamW decays matrices and embeddings, not biases and LayerNorm gains
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)  # batch indices and flips
    step, history, evals = 0, [], []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            if not cfg.eval_only:
                opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint {ckpt_path} does not fit this model: {str(e).splitlines()[0]}")
        step, history, evals = ckpt["step"], ckpt.get("history", []), ckpt.get("evals", [])
        if "rng" in ckpt and not cfg.eval_only:
            g.set_state(ckpt["rng"])
        log(f"loaded {ckpt_path} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.arch}: {n_params / 1e6:.2f}M parameters | flip augmentation {x_flip is not None}")
    fwd = nn.parallel.DistributedDataParallel(model) if ddp else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()

    def checkpoint(results=None):
        if history and not math.isfinite(history[-1][1]):  # never save a diverged model
            fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
        if master:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                        "config": asdict(cfg), "results": results, "meta": meta, "history": history,
                                        "evals": evals, "rng": g.get_state()})

    def validate():
        with autocast:
            ev = evaluate(model, x_test, y_test, cfg)
        evals.append((step, ev["val_nats_per_code"]))
        log(f"eval step {step} | val {ev['val_nats_per_code']:.4f} nats/code ({ev['val_bits_per_code']:.4f} bits/code)"
            f" | top1 {ev['val_top1']:.3f} top5 {ev['val_top5']:.3f} top10 {ev['val_top10']:.3f}")
        return ev

    from vqvae import load_vqvae  # decodes sampled codes to images

    vq = None
    t_train, n_seen, t0, start_step, last_log, loss_sum = 0.0, 0, time.perf_counter(), step, step, 0.0
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        idx = torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)
        x = x_train[idx]
        if x_flip is not None:  # augmentation: the codes of the mirrored image, half of the time
            x = torch.where(torch.rand(len(idx), 1, device=device, generator=g) < 0.5, x_flip[idx], x)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast:
            loss, _ = fwd(x, None if y_train is None else y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_sum = loss_sum + loss.detach()  # summed on the device, read at log steps only
        t_train += time.perf_counter() - t_step
        n_seen += cfg.batch_size
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            history.append((step, loss_sum.item() / (step - last_log)))  # mean over the steps since the last line
            loss_sum, last_log = 0.0, step
            if not math.isfinite(history[-1][1]):
                fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {history[-1][1]:.4f} nats/code | {n_seen / t_train:.0f} img/s | "
                f"lr {lr_at(step, cfg):.2e} | eta {eta / 60:.1f}m")
        if master and step % cfg.sample_every == 0:
            vq = vq or load_vqvae(codes["vqvae_ckpt"], device)
            sample_grid(model, vq, grid, cfg, device, os.path.join(cfg.out_dir, "samples.png"))
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            if master:
                validate()
            checkpoint()
    if not master:
        dist.destroy_process_group()
        return {}
    if not cfg.eval_only:
        checkpoint()
    res = validate()
    if history:
        res["train_nats_per_code"] = history[-1][1]  # mean of the last log window, with dropout on
    vq = vq or load_vqvae(codes["vqvae_ckpt"], device)
    sample_grid(model, vq, grid, cfg, device, os.path.join(cfg.out_dir, "samples.png"))
    if cfg.fid_samples > 0:
        res.update(score(model, vq, grid, cfg, device, cfg.fid_samples, cfg.temperature, cfg.top_k, cfg.top_p, log,
                         npz=os.path.join(cfg.out_dir, "samples.npz")))
        vq_res = os.path.join(os.path.dirname(codes["vqvae_ckpt"]), "results.json")  # vqvae.py's numbers, if there
        vq_res = json.load(open(vq_res)) if os.path.exists(vq_res) else {}
        res.update(vqvae_recon_fid=vq_res.get("fid"), vqvae_independent_fid=vq_res.get("fid_independent"))  # ceiling, floor
    if cfg.sweep:
        res["sweep"] = sweep(model, vq, grid, cfg, device, log)
    res.update(steps=step, wall_s=time.perf_counter() - t0, device=str(device), config=asdict(cfg), n_params=n_params,
               train_images_per_s=n_seen * world / t_train if t_train else None)
    if not cfg.eval_only:
        checkpoint(res)
    if history:
        plot(os.path.join(cfg.out_dir, "loss.png"), {"loss": {"train": tuple(zip(*history)), "validation": tuple(zip(*evals))}},
             "step", "nats / code")
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={res[k]:.4g}" for k in ("val_nats_per_code", "val_bits_per_code", "val_top1", "fid") if isinstance(res.get(k), float))
    log(f"FINAL prior_transformer {cfg.dataset} {shown} steps={step} time={res['wall_s']:.0f}s device={device}")
    log_file.close()
    if ddp:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    train(parse_args())
