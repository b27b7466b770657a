"""Glow: a multi-scale flow of ActNorm -> invertible 1x1 conv -> affine coupling, with exact log-likelihood.

Paper: Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions" (arXiv:1807.03039).
L levels of [squeeze, K flow steps, split]; each split-off half and the top get learned Gaussians, written here
as affine standardizations eps = (z - mu) / sigma, so the whole model is one bijection y -> eps ~ N(0, I).
28x28 images use L=2 (28 -> 14 -> 7): no padding, so bpd is over the true 784 pixels (L=3 needs 32x32).
Units: y = (floor(x / 2^(8-n_bits)) + u) / 2^n_bits - 1/2, u ~ U[0,1)^D; test_bpd = (-log p(y) + D log 2^n_bits)
/ (D log 2), exact for the dequantized density with one noise draw per test image ("exact").
Deviations: (x + t) * sigmoid(h + 2) coupling as in the official code (--scale_fn exp is the paper's),
zero padding (not the official edge-aware one), no class conditioning, no Polyak averaging.
Headline (GPU; not measured here, no GPU was available):  python glow.py --dataset fashion   (downloads to ./data)
CPU run, 2-core shared CPU, 579 s: OMP_NUM_THREADS=1 python glow.py --dataset mnist --data_dir ../shared/data
  --out_dir /tmp/glow-mnist --K 8 --hidden 32 --max_steps 600 --warmup_steps 100 --eval_every 200 --fid_samples 0
  -> test bpd 4.068 (step 200), 3.150 (400), 2.881 (600); at T=1 most samples still overflow (samples_nonfinite_frac).
Writes to out_dir: ckpt.pt, samples.png (T=0.7), samples_temps.png (a row per temperature), samples.npz,
loss.png, log.txt, results.json (test_bpd; fid/precision/recall at --fid_temperature and over --sweep).
"""
import argparse
import dataclasses
import json
import math
import os
import re
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

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}
SHAPES = {"fashion": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
FLIP_OK = {"fashion", "cifar10"}  # horizontal flips keep these datasets' images plausible, not digits
ARCH_FIELDS = ("dataset", "L", "K", "hidden", "permutation", "lu", "coupling", "scale_fn", "learn_top", "n_bits")


@dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10
    data_dir: str = "./data"  # torchvision root: <data_dir>/FashionMNIST/raw/...
    out_dir: str = ""  # empty: out/glow-<dataset>
    L: int = 0  # levels; 0 = auto: 2 for 28x28 (28 -> 14 -> 7), 3 for 32x32 (paper)
    K: int = 32  # flow steps per level (paper: 32)
    hidden: int = 512  # channels of the coupling networks (paper: 512)
    permutation: str = "invconv"  # invconv | shuffle | reverse (the paper's ablation, fig. 3)
    lu: bool = True  # LU-decomposed 1x1 conv (sec. 3.2); false: plain W with slogdet
    coupling: str = "affine"  # affine | additive
    scale_fn: str = "sigmoid"  # sigmoid(h + 2) (official code) | exp (paper, table 1)
    learn_top: bool = True  # learned mean and log-std of the top prior
    n_bits: int = 8  # bits per pixel kept (paper: 5 for CelebA-HQ)
    flip: bool = True  # random horizontal flips where the dataset allows them
    max_steps: int = 30000  # optimizer steps
    batch_size: int = 64  # images per step (per process under torchrun)
    lr: float = 1e-3  # peak, after linear warmup
    warmup_steps: int = 1000  # linear lr warmup
    optimizer: str = "adam"  # adam | adamax (official code)
    grad_clip: float = 50.0  # max global gradient norm; 0 = off
    seed: int = 0
    eval_every: int = 2000  # steps between test bpd evaluations and checkpoints
    sample_every: int = 2000  # steps between refreshing samples.png
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only; evaluation stays float32)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in the sample grid
    temperature: float = 0.7  # of samples.png (paper: 0.7)
    fid_temperature: float = 1.0  # of samples.npz and the headline fid / precision / recall
    sweep: str = "0.6,0.7,0.8,0.9"  # more temperatures: a row of samples_temps.png and FID/P/R each
    fid_samples: int = 10000  # generated images per FID temperature (0 skips metrics)
    eval_batch_size: int = 500  # images per batch in evaluation and sampling


CHOICES = {"dataset": tuple(DATASETS), "permutation": ("invconv", "shuffle", "reverse"), "coupling": ("affine", "additive"),
           "scale_fn": ("sigmoid", "exp"), "optimizer": ("adam", "adamax"), "dtype": ("float32", "bfloat16")}


def parse_args(argv=None) -> Config:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    as_bool = lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    for f in dataclasses.fields(Config):
        kind = as_bool if f.type is bool else f.type
        p.add_argument(f"--{f.name}", type=kind, default=f.default, choices=CHOICES.get(f.name), help=f.type.__name__)
    return Config(**vars(p.parse_args(argv)))


def fail(msg):
    raise SystemExit(f"glow.py: error: {msg}")


def check_config(cfg):
    """Validate the combination once; resolves L = 0 (auto) in place."""
    for k, options in CHOICES.items():
        if getattr(cfg, k) not in options:
            fail(f"unknown {k} {getattr(cfg, k)!r}; expected one of {', '.join(options)}")
    size = SHAPES[cfg.dataset][1]
    cfg.L = cfg.L or (3 if size % 8 == 0 else 2)
    if cfg.L < 1 or size % 2 ** cfg.L:
        fail(f"--L {cfg.L} cannot squeeze {size}x{size} {cfg.dataset} images ({size} must be divisible by 2**L); "
             f"use --L {1 + (size % 4 == 0) + (size % 8 == 0)} or --L 0 (auto)")
    if min(cfg.K, cfg.hidden, cfg.batch_size, cfg.eval_batch_size, cfg.eval_every, cfg.sample_every, cfg.log_every) < 1 \
            or cfg.max_steps < 0 or not 1 <= cfg.n_bits <= 8:
        fail("--K, --hidden, --batch_size, --eval_batch_size, --*_every must be >= 1, --max_steps >= 0, --n_bits in 1..8")
    if not re.fullmatch(r"[0-9., ]*", cfg.sweep):
        fail(f"--sweep must be comma-separated temperatures like 0.6,0.8 (got {cfg.sweep!r})")
    try:
        device = pick_device(cfg.device)
    except RuntimeError:
        fail(f"unknown --device {cfg.device!r}; expected auto, cpu, cuda, cuda:N or mps")
    if cfg.dtype == "bfloat16" and device.type != "cuda":
        fail("--dtype bfloat16 is autocast on CUDA; use --dtype float32 on this device")


# ----------------------------------------------------------------------------- model

class ActNorm(nn.Module):
    """y = (x + b) * exp(logs) per channel (sec. 3.1); b, logs set from the first batch for zero mean, unit
    variance. `initialized` is a buffer, so a loaded checkpoint is never re-initialized."""
    init_mode = False  # set by Glow.data_init only

    def __init__(self, C):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(1, C, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, C, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x):
        if self.init_mode:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
            self.b.data.copy_(-mean)
            self.logs.data.copy_(-0.5 * torch.log(var + 1e-12))
            self.initialized.fill_(True)
        y = (x + self.b) * self.logs.exp()
        return y, (x.shape[2] * x.shape[3] * self.logs.sum()).expand(x.shape[0])  # table 1: h*w*sum(log|s|)

    def inverse(self, y):
        return y * torch.exp(-self.logs) - self.b


class ActNormNoLogdet(ActNorm):  # inside the coupling networks (official code), where no log-det is needed
    def forward(self, x):
        return super().forward(x)[0]


class InvConv1x1(nn.Module):
    """Invertible 1x1 conv (sec. 3.2): W = P L (U + diag(sign(s) exp(log|s|))) with log|det W| = sum log|s|,
    or a plain W with slogdet, both starting as a random rotation (log-det 0); or, for the paper's ablation,
    a fixed channel shuffle or reversal (RealNVP's permutations, log-det 0)."""

    def __init__(self, C, kind="invconv", lu=True):
        super().__init__()
        self.kind, self.lu = kind, lu
        if kind != "invconv":
            self.register_buffer("W", torch.eye(C)[torch.randperm(C) if kind == "shuffle" else torch.arange(C - 1, -1, -1)])
            return
        W = torch.linalg.qr(torch.randn(C, C))[0]
        if not lu:
            self.W = nn.Parameter(W)
            return
        P, L, U = torch.linalg.lu(W)
        s = U.diagonal()
        self.register_buffer("P", P)
        self.register_buffer("sign_s", s.sign())
        self.register_buffer("upper", torch.triu(torch.ones(C, C), 1))  # strictly upper mask
        self.L, self.U, self.log_s = nn.Parameter(L), nn.Parameter(torch.triu(U, 1)), nn.Parameter(s.abs().log())

    def weight(self):  # W [C, C] and log|det W|
        if self.kind != "invconv":
            return self.W, self.W.new_zeros(())
        if not self.lu:
            return self.W, torch.linalg.slogdet(self.W)[1]
        L = self.L * self.upper.T + torch.eye(len(self.P), dtype=self.P.dtype, device=self.P.device)
        U = self.U * self.upper + torch.diag(self.sign_s * self.log_s.exp())
        return self.P @ L @ U, self.log_s.sum()

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # the flow itself stays float32 under bf16 autocast
            W, logdet = self.weight()
            return F.conv2d(x, W[:, :, None, None]), (x.shape[2] * x.shape[3] * logdet).expand(x.shape[0])  # eq. (9)

    def inverse(self, y):
        return F.conv2d(y, torch.linalg.inv(self.weight()[0])[:, :, None, None])


class ZeroConv2d(nn.Module):
    """3x3 conv initialized to zero, output scaled by exp(3 * logs) (official conv2d_zeros): starts as 0."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        nn.init.zeros_(self.conv.weight), nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, c_out, 1, 1))

    def forward(self, x):
        return self.conv(x) * torch.exp(3 * self.logs)


class Coupling(nn.Module):
    """Affine coupling (table 1): x_a passes, x_b -> (x_b + t) * s with (log s, t) = NN(x_a); additive: s = 1.
    NN = conv3x3 - ActNorm - ReLU - conv1x1 - ActNorm - ReLU - ZeroConv3x3: each step starts as the identity
    (exp, additive) or as a fixed scaling by sigmoid(2) = 0.88 (sigmoid, as the official code)."""

    def __init__(self, C, hidden, affine=True, scale_fn="sigmoid"):
        super().__init__()
        self.affine, self.scale_fn = affine, scale_fn
        self.nn = nn.Sequential(
            nn.Conv2d(C // 2, hidden, 3, padding=1, bias=False), ActNormNoLogdet(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1, bias=False), ActNormNoLogdet(hidden), nn.ReLU(),
            ZeroConv2d(hidden, C if affine else C // 2))

    def shift_logscale(self, xa, xb):
        h = self.nn(xa).to(xb.dtype)  # float32 log-dets under bf16 autocast
        if not self.affine:
            return h, torch.zeros_like(xb)
        t, raw = h[:, 0::2], h[:, 1::2]  # interleaved halves, as the official code
        return t, F.logsigmoid(raw + 2.0) if self.scale_fn == "sigmoid" else raw

    def forward(self, x):
        xa, xb = x.chunk(2, 1)
        t, logs = self.shift_logscale(xa, xb)
        return torch.cat([xa, (xb + t) * logs.exp()], 1), logs.flatten(1).sum(1)

    def inverse(self, y):
        ya, yb = y.chunk(2, 1)
        t, logs = self.shift_logscale(ya, yb)
        return torch.cat([ya, yb * torch.exp(-logs) - t], 1)


def squeeze(x):  # [B, C, H, W] -> [B, 4C, H/2, W/2]: each 2x2 patch becomes 4 channels (sec. 3, RealNVP)
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x):  # [B, 4C, H, W] -> [B, C, 2H, 2W]
    B, C, H, W = x.shape
    return x.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * H, 2 * W)


class Glow(nn.Module):
    """Multi-scale architecture (fig. 2b). log p(y) = sum log N(eps; 0, I) + log|det d eps / dy| (eq. 2-3)."""

    def __init__(self, cfg, shape):
        super().__init__()
        C, H, W = shape
        self.n_bits, self.D = cfg.n_bits, C * H * W
        self.levels, self.splits, self.eps_shapes = nn.ModuleList(), nn.ModuleList(), []
        for i in range(cfg.L):
            C, H, W = 4 * C, H // 2, W // 2
            step = lambda: (ActNorm(C), InvConv1x1(C, cfg.permutation, cfg.lu),
                            Coupling(C, cfg.hidden, cfg.coupling == "affine", cfg.scale_fn))
            self.levels.append(nn.ModuleList([layer for _ in range(cfg.K) for layer in step()]))  # K x fig. 2a
            if i < cfg.L - 1:  # split: half leaves as eps, its (mu, log sigma) from the other half
                self.splits.append(ZeroConv2d(C // 2, C))
                self.eps_shapes.append((C // 2, H, W))
                C //= 2
        self.eps_shapes.append((C, H, W))
        self.top = nn.Parameter(torch.zeros(1, 2 * C, H, W), requires_grad=cfg.learn_top)  # top (mu, log sigma)

    def forward_flow(self, x):
        """y [B, C, H, W] -> eps (a list, one [B, c, h, w] per level), log|det d eps / dy| [B] per sample."""
        eps, logdet = [], x.new_zeros(x.shape[0])
        for i, layers in enumerate(self.levels):
            x = squeeze(x)
            for layer in layers:  # ActNorm, 1x1 conv, coupling, ActNorm, ...
                x, ld = layer(x)
                logdet = logdet + ld
            if i < len(self.splits):
                x, z = x.chunk(2, 1)  # channels are even: squeeze made them 4C
                mu, logs = self.splits[i](x).chunk(2, 1)  # learned conditional prior p(z | x)
            else:
                z, (mu, logs) = x, self.top.expand(x.shape[0], -1, -1, -1).chunk(2, 1)
            eps.append((z - mu) * torch.exp(-logs))
            logdet = logdet - logs.flatten(1).sum(1)  # d eps / dz = 1 / sigma
        return eps, logdet

    def inverse(self, eps):
        x = None
        for i in reversed(range(len(self.levels))):
            if x is None:
                mu, logs = self.top.expand(eps[i].shape[0], -1, -1, -1).chunk(2, 1)
                x = mu + torch.exp(logs) * eps[i]
            else:
                mu, logs = self.splits[i](x).chunk(2, 1)
                x = torch.cat([x, mu + torch.exp(logs) * eps[i]], 1)
            for layer in reversed(self.levels[i]):
                x = layer.inverse(x)
            x = unsqueeze(x)
        return x

    def log_prob(self, y):  # [B] nats: the density of y (change of variables, per sample)
        eps, logdet = self.forward_flow(y)
        return logdet + sum(-0.5 * (e ** 2 + math.log(2 * math.pi)).flatten(1).sum(1) for e in eps)

    def bpd(self, y):  # [B] bits/dim of the n_bits data: (-log p(y) + D log 2^n_bits) / (D log 2)
        return -self.log_prob(y) / (self.D * math.log(2)) + self.n_bits

    def forward(self, x, generator=None):
        """uint8 images -> mean bits/dim over the batch (the loss) and stats in bits/dim (0-dim tensors, so
        neither a device sync per step nor a torch.compile graph break; float() them when logging)."""
        loss = self.bpd(dequantize(x, self.n_bits, generator).to(self.top.dtype)).mean()
        return loss, {"bpd": loss.detach()}

    @torch.no_grad()
    def data_init(self, x):
        """ActNorm's data-dependent init (sec. 3.1) on one uint8 batch, unless the state says it was done."""
        norms = [m for m in self.modules() if isinstance(m, ActNorm)]
        if all(bool(m.initialized) for m in norms):
            return False
        for m in norms:
            m.init_mode = True
        self.log_prob(dequantize(x, self.n_bits).to(self.top.dtype))  # each ActNorm sees its normalized input
        for m in norms:
            m.init_mode = False
        return True

    @torch.inference_mode()
    def sample(self, n, temperature=1.0, generator=None):
        """n samples y [n, C, H, W] from eps ~ N(0, T^2 I) (sec. 4: reduced temperature), continuous, in about
        [-1/2, 1/2) (to_uint8 bins them); inf/NaN where the inverse overflowed (undertrained models, high T)."""
        dev = self.top.device
        eps = [temperature * torch.randn((n, *s), device=dev, dtype=self.top.dtype, generator=generator) for s in self.eps_shapes]
        return self.inverse(eps)


def dequantize(x, n_bits, generator=None):  # uint8 -> y = (x_n + u) / 2^n - 1/2 in [-1/2, 1/2)
    x = torch.div(x, 2 ** (8 - n_bits), rounding_mode="floor").float()  # keep the n_bits high bits
    return (x + torch.rand(x.shape, device=x.device, generator=generator)) / 2 ** n_bits - 0.5


def to_uint8(y, n_bits):  # the bin of y, back on the 0..255 scale; NaN shows as mid-grey
    x = torch.floor((torch.nan_to_num(y.float()) + 0.5) * 2 ** n_bits).clamp(0, 2 ** n_bits - 1)
    return (x * 2 ** (8 - n_bits)).to(torch.uint8)


# ----------------------------------------------------------------------------- data

def load_split(dataset, data_dir, train):
    """The whole split as one uint8 tensor [N, C, H, W] and int64 labels [N] (no per-image PIL work)."""
    cls = getattr(torchvision.datasets, DATASETS[dataset])
    try:
        ds = cls(data_dir, train=train, download=False)
    except RuntimeError:
        try:
            ds = cls(data_dir, train=train, download=True)
        except Exception as e:
            where = f"{data_dir}/cifar-10-batches-py/" if dataset == "cifar10" else f"{data_dir}/{DATASETS[dataset]}/raw/train-images-idx3-ubyte"
            fail(f"{dataset} not found under --data_dir {data_dir} (expected torchvision's layout, e.g. {where}) "
                 f"and download failed ({type(e).__name__}); point --data_dir at a folder that has it")
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST [N,28,28]; CIFAR [N,32,32,3]
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


def random_flip(x, generator):  # on the device, half of the batch mirrored left-right
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device, generator=generator) < 0.5, x.flip(3), x)


# ----------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def evaluate(model, x_test, cfg):
    """Exact test bits/dim over the whole split, one fixed dequantization draw per image (float32)."""
    model.eval()
    g = torch.Generator(x_test.device).manual_seed(cfg.seed + 1)
    total = sum(model.bpd(dequantize(xb, cfg.n_bits, g)).sum().item() for xb in x_test.split(cfg.eval_batch_size))
    model.train()
    return total / len(x_test)


def generate(model, n, temperature, cfg, g):  # n uint8 images on the CPU, fraction with non-finite pixels
    ys = [model.sample(min(cfg.eval_batch_size, n - i), temperature, g) for i in range(0, n, cfg.eval_batch_size)]
    bad = sum(int((~y.isfinite()).flatten(1).any(1).sum()) for y in ys) / n
    return torch.cat([to_uint8(y, cfg.n_bits) for y in ys]).cpu(), bad


def save_pictures(model, cfg, final=False):
    """samples.png at --temperature; at the end also samples_temps.png: the same noise, one row per temperature."""
    g = torch.Generator(model.top.device).manual_seed(cfg.seed)  # the same noise every time
    nrow = max(1, int(math.sqrt(cfg.n_samples)))
    imgs = to_uint8(model.sample(cfg.n_samples, cfg.temperature, g), cfg.n_bits)
    torchvision.utils.save_image(imgs / 255., os.path.join(cfg.out_dir, "samples.png"), nrow=nrow)
    if final:
        temps = sorted({cfg.temperature, cfg.fid_temperature, 0.0, *[float(t) for t in cfg.sweep.split(",") if t.strip()]})
        eps = [torch.randn((8, *s), device=model.top.device, generator=g) for s in model.eps_shapes]
        with torch.inference_mode():
            rows = [to_uint8(model.inverse([t * e for e in eps]), cfg.n_bits) for t in temps]
        torchvision.utils.save_image(torch.cat(rows) / 255., os.path.join(cfg.out_dir, "samples_temps.png"), nrow=8)


def generate_and_score(model, cfg, device):
    """samples.npz at --fid_temperature (timed) and metrics.py's FID / precision / recall over the temperatures."""
    g = torch.Generator(device).manual_seed(cfg.seed + 2)
    t0 = time.perf_counter()
    imgs, bad = generate(model, max(cfg.fid_samples, cfg.n_samples), cfg.fid_temperature, cfg, g)
    res = {"sample_images_per_s": len(imgs) / (time.perf_counter() - t0), "samples_nonfinite_frac": bad}
    np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=imgs.numpy(), temperature=cfg.fid_temperature)
    if cfg.fid_samples == 0:
        return res
    import metrics  # lazily: a copied glow.py runs alone with --fid_samples 0
    res.update(metrics.evaluate(imgs[:cfg.fid_samples], cfg.dataset, cfg.data_dir, device))
    res["fid_temperature"], sweep = cfg.fid_temperature, {}
    for t in [float(t) for t in cfg.sweep.split(",") if t.strip()]:
        imgs, bad = generate(model, cfg.fid_samples, t, cfg, g)
        m = metrics.evaluate(imgs, cfg.dataset, cfg.data_dir, device)
        sweep[str(t)] = {"fid": m["fid"], "precision": m["precision"], "recall": m["recall"], "samples_nonfinite_frac": bad}
    res["metrics_by_temperature"] = sweep
    return res


# ----------------------------------------------------------------------------- training

def save_checkpoint(path, state):
    torch.save(state, path + ".tmp")  # write then rename: a crash never leaves a half-written ckpt.pt
    os.replace(path + ".tmp", path)


def load_checkpoint(path, cfg):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path} (train first, or check --out_dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        diff = {k: (ckpt["config"][k], getattr(cfg, k)) for k in ARCH_FIELDS if ckpt["config"][k] != getattr(cfg, k)}
        ckpt["model"], ckpt["step"]
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    if cfg.resume and diff:
        fail(f"checkpoint {path} was made with another model (saved vs asked: {diff}); use another --out_dir")
    return ckpt


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def plot_losses(history, evals, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*history), lw=0.8, label="train bpd")
    if evals:
        ax.plot(*zip(*evals), "o-", label="test bpd (exact)")
    ax.set(xlabel="step", ylabel="bits / dim")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def train(cfg: Config) -> dict:
    check_config(cfg)
    cfg.out_dir = cfg.out_dir or f"out/glow-{cfg.dataset}"
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = pick_device(cfg.device)
    if ddp:  # torchrun: one process per device, gradients averaged by DDP
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if ddp else 0
    master = rank == 0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg) if cfg.resume or cfg.eval_only else None
    if cfg.eval_only:  # rebuild the model the checkpoint describes, whatever the command line says
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_file = open(os.path.join(cfg.out_dir, "log.txt"), "a") if master else None

    def log(msg):
        if master:
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | world {dist.get_world_size() if ddp else 1}")
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    x_train, _ = load_split(cfg.dataset, cfg.data_dir, train=True)
    x_test, _ = load_split(cfg.dataset, cfg.data_dir, train=False)
    x_train, x_test = x_train.to(device), x_test.to(device)  # the whole dataset lives on the device
    model = Glow(cfg, SHAPES[cfg.dataset]).to(device)
    log(f"glow L={cfg.L} K={cfg.K} hidden={cfg.hidden} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = (torch.optim.Adamax if cfg.optimizer == "adamax" else torch.optim.Adam)(model.parameters(), lr=cfg.lr)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)  # batch indices, flips, dequantization
    step, history, evals = 0, [], []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            if not cfg.eval_only:
                opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint {ckpt_path} does not fit this model: {str(e).splitlines()[0]}")
        step, history, evals = ckpt["step"], ckpt.get("history", []), ckpt.get("evals", [])
        if "rng" in ckpt and not cfg.eval_only:  # rank 0's stream; the other ranks draw fresh ones
            g.set_state(ckpt["rng"]) if rank == 0 else g.manual_seed(cfg.seed + 1000 * rank + step)
        log(f"loaded {ckpt_path} at step {step}")
    if model.data_init(x_train[torch.randperm(len(x_train), device=device)[:max(cfg.batch_size, 256)]]):
        log("ActNorm initialized from a batch of training data")  # before DDP, which then broadcasts rank 0's
    fwd = nn.parallel.DistributedDataParallel(model) if ddp else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()

    def checkpoint(results=None):
        if (history and not math.isfinite(history[-1][1])) or not all(p.isfinite().all() for p in model.parameters()):
            fail(f"non-finite loss or weights at step {step}; the last good checkpoint {ckpt_path} is kept")
        if master:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                        "config": asdict(cfg), "results": results, "history": history,
                                        "evals": evals, "rng": g.get_state()})

    t_train, n_seen, t0, start_step = 0.0, 0, time.perf_counter(), step
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)]
        x = random_flip(x, g) if cfg.flip and cfg.dataset in FLIP_OK else x
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))  # linear warmup
        with autocast:
            loss, stats = fwd(x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        t_train += time.perf_counter() - t_step
        n_seen += cfg.batch_size
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            history.append((step, stats["bpd"].item()))
            if not math.isfinite(history[-1][1]):
                fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {history[-1][1]:.3f} bpd | {n_seen / t_train:.0f} img/s | eta {eta / 60:.1f}m")
        if master and step % cfg.sample_every == 0:
            save_pictures(model, cfg)
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            if master:
                evals.append((step, evaluate(model, x_test, cfg)))
                log(f"eval step {step} | test_bpd {evals[-1][1]:.4f} bits/dim (exact, {len(x_test)} test images)")
            checkpoint()
    if not master:
        dist.destroy_process_group()
        return {}
    if not cfg.eval_only:
        checkpoint()
    res = {"test_bpd": evaluate(model, x_test, cfg), "test_bpd_kind": "exact", "test_bpd_n_bits": cfg.n_bits}
    save_pictures(model, cfg, final=True)
    res.update(generate_and_score(model, cfg, device))
    res.update(steps=step, wall_s=time.perf_counter() - t0, device=str(device), config=asdict(cfg),
               train_images_per_s=n_seen * (dist.get_world_size() if ddp else 1) / t_train if t_train else None)
    if not cfg.eval_only:
        checkpoint(res)
    if history:
        plot_losses(history, evals + [(step, res["test_bpd"])], os.path.join(cfg.out_dir, "loss.png"))
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={res[k]:.4g}" for k in ("test_bpd", "fid", "samples_nonfinite_frac") if isinstance(res.get(k), float))
    log(f"FINAL glow {cfg.dataset} {shown} steps={step} time={res['wall_s']:.0f}s device={device}")
    log_file.close()
    if ddp:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    train(parse_args())
