"""Glow (Kingma & Dhariwal 2018): L levels of [squeeze, K steps of flow, split] (fig. 2), a step of
flow being ActNorm -> invertible 1x1 conv -> affine coupling; exact bits/dim of dequantized data.
Deviations: a bounded coupling scale s = s_min + (1 - s_min) sigmoid(h + 2), --scale_min 0.5 (the
official 0 lets samples overflow); zero padding, not edge-aware; no class conditioning. As in the
official code, a Polyak average of the weights (--ema) is evaluated and sampled.
    python glow.py --dataset fashion
"""
import argparse
import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps  # torchvision's dependency

# --------------------------------------------------------------------------- model
class ActNorm(nn.Module):  # y = (x + b) * exp(logs) per channel (sec. 3.1)
    init_mode = False  # True for every ActNorm during Glow.data_init only
    def __init__(self, C, logdet=True):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(1, C, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, C, 1, 1))
        self.logdet = logdet  # False inside the coupling networks, which need y only
        self.register_buffer("initialized", torch.tensor(False))  # saved: loading keeps the init
    def forward(self, x):  # y, and log|det dy/dx| = H W sum(logs) for every sample (table 1)
        if self.init_mode and not self.initialized:  # data-dependent: zero mean, unit variance
            var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
            self.b.data = -mean
            self.logs.data = -0.5 * torch.log(var + 1e-12)
            self.initialized.fill_(True)
        y = (x + self.b) * self.logs.exp()
        return (y, x[0, 0].numel() * self.logs.sum()) if self.logdet else y  # x[0, 0]: H x W
    def inverse(self, y):
        return y * torch.exp(-self.logs) - self.b

class InvConv1x1(nn.Module):  # invertible 1x1 conv, LU-decomposed (sec. 3.2)
    def __init__(self, C, permutation="invconv"):
        super().__init__()
        W = torch.linalg.qr(torch.randn(C, C))[0]  # a random rotation
        if permutation != "invconv":  # a fixed permutation, log-det 0: the paper's ablation (fig. 3)
            W = torch.eye(C)[torch.randperm(C)] if permutation == "shuffle" else torch.eye(C).flip(0)
        P, L, U = torch.linalg.lu(W)  # W = P L (U + diag(s)): log|det W| = sum log|s|
        self.register_buffer("P", P)
        self.register_buffer("sign_s", U.diagonal().sign())
        learned = permutation == "invconv"  # a permutation has L = U = I and stays fixed
        self.LU = nn.Parameter(torch.tril(L, -1) + torch.triu(U, 1), learned)  # L below, U above
        self.log_s = nn.Parameter(U.diagonal().abs().log(), learned)
    def weight(self):  # W [C, C] and log|det W|
        U = torch.triu(self.LU, 1) + torch.diag(self.sign_s * self.log_s.exp())
        return self.P @ (torch.tril(self.LU, -1) @ U + U), self.log_s.sum()  # P (L + I) U
    def forward(self, x):  # eq. (9): log|det dy/dx| = H W log|det W|, the same for every sample
        with torch.autocast(x.device.type, enabled=False):  # the flow stays float32 under bf16
            W, logdet = self.weight()
            return F.conv2d(x, W[:, :, None, None]), x[0, 0].numel() * logdet
    def inverse(self, y):
        return F.conv2d(y, self.weight()[0].inverse()[:, :, None, None])

class ZeroConv2d(nn.Conv2d):  # a 3x3 conv starting at 0, output times exp(3 logs) (official code)
    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.logs = nn.Parameter(torch.zeros(1, c_out, 1, 1))
    def forward(self, x):
        return super().forward(x) * torch.exp(3 * self.logs)

class Coupling(nn.Module):  # affine (table 1): x_b -> (x_b + t) * s, (h, t) = NN(x_a); additive: s = 1
    def __init__(self, C, cfg):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.nn = nn.Sequential(
            nn.Conv2d(C // 2, h, 3, padding=1, bias=False), ActNorm(h, False), nn.ReLU(),
            nn.Conv2d(h, h, 1, bias=False), ActNorm(h, False), nn.ReLU(),
            ZeroConv2d(h, C if cfg.coupling == "affine" else C // 2))  # (t, h) interleaved, or t
    def shift_logscale(self, xa):  # t and log s; s_min > 0 caps 1 / s, the gain of the inverse
        h = self.nn(xa).to(xa.dtype)  # float32 log-dets under bf16 autocast
        if self.cfg.coupling == "additive":
            return h, torch.zeros_like(h)
        t, h = h[:, 0::2], h[:, 1::2]  # interleaved channels, as the official code
        if self.cfg.scale_fn == "exp":  # the paper's s = exp(h)
            return t, h
        return t, torch.log(self.cfg.scale_min + (1 - self.cfg.scale_min) * torch.sigmoid(h + 2))
    def forward(self, x):
        xa, xb = x.chunk(2, 1)
        t, logs = self.shift_logscale(xa)
        return torch.cat([xa, (xb + t) * logs.exp()], 1), logs.flatten(1).sum(1)
    def inverse(self, y):
        ya, yb = y.chunk(2, 1)
        t, logs = self.shift_logscale(ya)
        return torch.cat([ya, yb * torch.exp(-logs) - t], 1)

class FlowStep(nn.Module):  # a step of flow (fig. 2a): actnorm -> invertible 1x1 conv -> coupling
    def __init__(self, C, cfg):
        super().__init__()
        self.actnorm = ActNorm(C)
        self.invconv = InvConv1x1(C, cfg.permutation)
        self.coupling = Coupling(C, cfg)
    def forward(self, x):  # y, and log|det dy/dx| [B]: the sum of the three layers'
        x, logdet_actnorm = self.actnorm(x)
        x, logdet_invconv = self.invconv(x)
        y, logdet_coupling = self.coupling(x)
        return y, logdet_actnorm + logdet_invconv + logdet_coupling
    def inverse(self, y):
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))

class Glow(nn.Module):  # the multi-scale flow (fig. 2b): L x [squeeze, K FlowSteps, split]
    def __init__(self, cfg, shape):  # shape: (C, H, W) of the images, H = W
        super().__init__()
        C, H = shape[:2]
        self.levels = nn.ModuleList()  # K FlowSteps per level
        self.splits = nn.ModuleList()  # (mu, log sigma) of a split-off z, from the kept half
        self.eps_shapes = []
        for i in range(cfg.L):
            C, H = 4 * C, H // 2  # the squeeze
            self.levels.append(nn.ModuleList([FlowStep(C, cfg) for _ in range(cfg.K)]))
            if i < cfg.L - 1:  # the split
                self.splits.append(ZeroConv2d(C // 2, C))
                C = C // 2
            self.eps_shapes.append((C, H, H))  # the z that leaves this level
        self.top = nn.Parameter(torch.zeros(1, 2 * C, H, H))  # (mu, log sigma) of the top z
    def prior(self, i, x):  # (mu, log sigma) of level i's z: from the kept half x, or the top's
        return (self.splits[i](x) if i < len(self.splits) else self.top).chunk(2, 1)
    def forward_flow(self, x):  # y [B, C, H, W] -> eps (a [B, c, h, w] per level), log|det| [B]
        eps, logdet = [], 0
        for i, steps in enumerate(self.levels):
            x = F.pixel_unshuffle(x, 2)  # the squeeze: channel 4c + 2i + j holds pixel (i, j)
            for step in steps:
                x, step_logdet = step(x)
                logdet += step_logdet
            x, z = x.chunk(2, 1) if i < len(self.splits) else (x, x)
            mu, logs = self.prior(i, x)
            eps.append((z - mu) * torch.exp(-logs))
            logdet -= logs.flatten(1).sum(1)  # d eps / dz = 1 / sigma
        return eps, logdet
    def inverse(self, eps):  # eps (one per level) -> y
        x = eps[-1]  # the top's prior ignores it
        for i in reversed(range(len(self.levels))):
            mu, logs = self.prior(i, x)
            z = mu + torch.exp(logs) * eps[i]
            x = torch.cat([x, z], 1) if i < len(self.splits) else z
            for step in reversed(self.levels[i]):
                x = step.inverse(x)
            x = F.pixel_shuffle(x, 2)  # the unsqueeze
        return x
    def bpd(self, y):  # [B] bits/dim of the 8-bit data: (-log p(y) + D log 256) / (D log 2)
        eps, logdet = self.forward_flow(y)
        log_p = logdet + sum(-0.5 * (e ** 2 + math.log(2 * math.pi)).flatten(1).sum(1) for e in eps)
        return -log_p / (y[0].numel() * math.log(2)) + 8  # log_p: eq. 2-3, nats
    def forward(self, y):  # dequantized y (see dequantize) -> loss and stats in bits/dim
        loss = self.bpd(y).mean()
        return loss, {"bpd": loss.detach()}
    @torch.no_grad()
    def data_init(self, x):  # ActNorm's init (sec. 3.1) from one uint8 batch, unless done already
        ActNorm.init_mode = True  # one pass: each ActNorm normalizes what the layers before it give
        self.forward_flow(dequantize(x).to(self.top))
        ActNorm.init_mode = False
    @torch.inference_mode()
    def sample(self, n, temperature=1.0, generator=None):  # y [n, C, H, W], eps ~ N(0, T^2 I), sec. 4
        like = {"device": self.top.device, "dtype": self.top.dtype, "generator": generator}
        return self.inverse([temperature * torch.randn(n, *s, **like) for s in self.eps_shapes])

def dequantize(x, generator=None):  # uint8 -> y = (x + u) / 256 - 1/2 in [-1/2, 1/2), u ~ U[0, 1)
    return (x + torch.rand(x.shape, device=x.device, generator=generator)) / 256 - 0.5

def to_uint8(y):  # the bin of y: back to 0..255; NaN shows as mid-grey
    return ((y.nan_to_num() + 0.5) * 256).clamp(0, 255).byte()  # truncation is the floor

# --------------------------------------------------------------------------- data, evaluation, samples
def load_split(cfg, train):  # the split as one uint8 tensor [N, C, H, W], labels [N]
    if cfg.dataset == "folder":
        return hold_out_test(*read_folder(cfg), train)
    stl10 = f"{cfg.data_dir}/stl10_binary/{'train' if train else 'test'}_%s.bin"  # torchvision's
    try:
        if cfg.dataset != "stl10":
            Set = getattr(torchvision.datasets, DATASETS[cfg.dataset])  # MNIST, CIFAR10, ...
            ds = Set(cfg.data_dir, train, download=True)
        elif not os.path.exists(stl10 % "y"):
            torchvision.datasets.STL10(cfg.data_dir, "train" if train else "test", download=True)
    except Exception as e:  # not in data_dir, and no network ("urlopen error") or another failure
        why = "no network" if "urlopen error" in str(e) else type(e).__name__
        fail(f"no {cfg.dataset} in --data_dir {cfg.data_dir} and its download failed ({why})")
    if cfg.dataset == "stl10":  # 96x96 RGB, each image stored column by column; labels 1..10
        x = torch.from_numpy(np.fromfile(stl10 % "X", np.uint8)).view(-1, 3, 96, 96).transpose(2, 3)
        y = torch.from_numpy(np.fromfile(stl10 % "y", np.uint8)).long() - 1
        return resize(x, cfg.image_size), y
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST: [N, H, W]; CIFAR: NHWC
    return x.contiguous(), torch.as_tensor(ds.targets)

def resize(x, size):  # uint8 [N, C, h, w] -> [N, C, size, size], antialiased bicubic, in chunks
    chunks = [nn.functional.interpolate(xb.float(), size, mode="bicubic", antialias=True)
              for xb in x.split(500)]
    return torch.cat(chunks).round().clamp(0, 255).byte()

def read_folder(cfg):  # the images under --data_dir, squared: [N, 3, S, S]; a label per subfolder
    root = Path(cfg.data_dir)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 10:  # a tenth is the test split
        fail(f"--dataset folder needs 10 or more .png or .jpg files in --data_dir {root}; "
             f"found {len(files)}")
    listing = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    stamp = hashlib.sha256(repr(listing).encode()).hexdigest()  # a changed folder: a new cache
    where = root if os.access(root, os.W_OK) else Path(cfg.out_dir)  # a read-only folder
    cache = where / f"images-{cfg.image_size}px.pt"
    old = torch.load(cache, weights_only=True) if cache.exists() else {}
    if old.get("stamp") == stamp:
        return old["x"], old["y"]
    label = {d: i for i, d in enumerate(sorted({p.parent for p in files}))}  # no subfolders: all 0
    x = torch.stack([square(p, cfg.image_size) for p in progress(cfg, "reading images", files)])
    y = torch.tensor([label[p.parent] for p in files])
    where.mkdir(parents=True, exist_ok=True)
    torch.save({"stamp": stamp, "x": x, "y": y}, f"{cache}.{os.getpid()}.tmp")
    os.replace(f"{cache}.{os.getpid()}.tmp", cache)  # atomic: never a half-written cache
    log(cfg, f"read {len(x)} images in {len(label)} classes; cached in {cache}")
    return x, y

def square(path, size):  # an image file -> its centre square, resized: uint8 [3, size, size]
    try:
        with Image.open(path) as im:
            im = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        fail(f"cannot read the image {path} ({type(e).__name__}); remove or replace it")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]

def hold_out_test(x, y, train):  # a seeded tenth of the folder (at most 10,000) is the test split
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # no runs of a class
    n_test = min(10000, len(x) // 10)
    i = order[n_test:] if train else order[:n_test]  # so the first N test images are a fair sample
    return x[i], y[i]

@torch.inference_mode()
def evaluate(model, x_test, cfg):  # exact test bits/dim over the whole split, a fixed dequantization
    g = torch.Generator(x_test.device).manual_seed(cfg.seed + 1)
    batches = progress(cfg, "test bits/dim", x_test.split(500))
    bits = sum(model.bpd(dequantize(xb, g)).sum() for xb in batches).item()
    return {"test_bpd": bits / len(x_test), "test_bpd_kind": "exact (dequantized density, 1 noise draw)"}

def save_pictures(model, cfg):  # the same noise every time, and in every row of samples_temps.png
    g = torch.Generator(model.top.device)
    for name, n, temps in [("samples", cfg.n_samples, [cfg.temperature]),
                           ("samples_temps", 8, [0.0, 0.5, 0.7, 0.8, 0.9, 1.0])]:  # a row per T
        y = torch.cat([model.sample(n, t, g.manual_seed(cfg.seed)) for t in temps])
        torchvision.utils.save_image(to_uint8(y) / 255, f"{cfg.out_dir}/{name}.png")

def sample_metrics(model, cfg, device):  # samples.npz at --fid_temperature; FID etc., inf/NaN share
    g = torch.Generator(device).manual_seed(cfg.seed + 2)
    n = cfg.fid_samples or cfg.n_samples
    t0 = time.perf_counter()
    batches = progress(cfg, f"samples at T={cfg.fid_temperature}", range(0, n, 500))
    y = torch.cat([model.sample(min(500, n - i), cfg.fid_temperature, g) for i in batches])
    imgs = to_uint8(y).cpu()  # inf/NaN samples show mid-grey
    res = {"sample_images_per_s": n / (time.perf_counter() - t0),
           "samples_nonfinite_frac": 1 - y.isfinite().flatten(1).all(1).float().mean().item()}
    np.savez_compressed(f"{cfg.out_dir}/samples.npz", images=imgs.numpy(), temperature=cfg.fid_temperature)
    return res | (fid_metrics(imgs, cfg, device) if cfg.fid_samples else {})

@dataclasses.dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10 | stl10 | folder
    data_dir: str = "./data"  # torchvision's root (<data_dir>/MNIST/raw/...), or the folder
    image_size: int = 32  # stl10 and folder images are resized to it once (others keep theirs)
    out_dir: str = "out/glow-{dataset}"  # everything of the run
    L: int = 0  # levels; 0: auto, 2 for 28x28 (28 -> 14 -> 7), 3 for 32x32 (paper), 4 for 64
    K: int = 32  # steps of flow per level (paper: 32)
    hidden: int = 512  # channels of the coupling networks (paper: 512)
    permutation: str = "invconv"  # invconv | shuffle | reverse (the paper's ablation, fig. 3)
    coupling: str = "affine"  # affine | additive
    scale_fn: str = "sigmoid"  # sigmoid(h + 2) (official code, bounded by scale_min) | exp (paper)
    scale_min: float = 0.5  # the sigmoid scale lies in (scale_min, 1); 0: the official, unbounded
    max_steps: int = 30000  # optimizer steps
    batch_size: int = 64  # images per step (per process under torchrun)
    lr: float = 1e-3  # peak, after the warmup
    warmup_steps: int = 1000  # linear learning-rate warmup
    optimizer: str = "adam"  # adam | adamax; the official code: Adamax, lr 1e-3
    ema: float = 0.999  # Polyak averaging: decay of the evaluated, sampled weights' average; 0: off
    seed: int = 0
    eval_every: int = 2000  # steps between test bits/dim, pictures and checkpoints
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only; the flow stays float32)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in samples.png
    temperature: float = 0.7  # of samples.png (paper: 0.7)
    fid_temperature: float = 1.0  # of samples.npz and the headline fid / precision / recall
    fid_samples: int = None  # samples for FID / precision / recall; 0 skips the metrics

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "stl10": "STL10",
            "folder": None}  # folder: the images under --data_dir
OPTIMIZERS = {"adam": functools.partial(torch.optim.Adam, fused=True), "adamax": torch.optim.Adamax}
CHOICES = {"dataset": tuple(DATASETS), "permutation": ("invconv", "shuffle", "reverse"),
           "coupling": ("affine", "additive"), "scale_fn": ("sigmoid", "exp"),
           "optimizer": tuple(OPTIMIZERS), "dtype": ("float32", "bfloat16")}
ARCH = ("dataset", "image_size", "L", "K", "hidden", "permutation", "coupling", "scale_fn",
        "scale_min")
BY_DEVICE = {"fid_samples": (10000, 2000)}  # Config fields left None: (on CUDA, elsewhere)

# -------------------------------------------------------------- scaffolding, the same in every model file
RANK = int(os.environ.get("RANK", 0))  # this process under torchrun, of WORLD
WORLD = int(os.environ.get("WORLD_SIZE", 1))
NAME = os.path.basename(__file__)  # this file's name, in messages and checkpoints
def fail(msg):  # a one-line error for the user's mistakes, never a traceback; exit status 1
    raise SystemExit(f"{NAME}: error: {msg}")
def boolean(s):  # true, 1, yes: True; false, 0, no: False; else argparse's one-line error
    return ("false", "0", "no", "true", "1", "yes").index(s.lower()) >= 3
def parse_args(argv=None) -> Config:  # a flag per field; -h shows its comment and default
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    notes = dict(re.findall(r"\n +(\w+): .+?  # (.+)", inspect.getsource(Config)))
    for f in dataclasses.fields(Config):  # bools: --resume, --resume true, --resume no
        kind = {"type": boolean, "nargs": "?", "const": True} if f.type is bool else {"type": f.type}
        shown = "%s on CUDA, %s elsewhere" % BY_DEVICE[f.name] if f.name in BY_DEVICE else f.default
        p.add_argument(f"--{f.name}", **kind, default=f.default, choices=CHOICES.get(f.name),
                       help=f"{notes.get(f.name, '')} (default: {shown})")
    return Config(**vars(p.parse_args(argv)))
def setup(cfg):  # check cfg, pick the device (join torchrun's group), make out_dir, load ckpt.pt
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    for k, (on_cuda, elsewhere) in BY_DEVICE.items():  # end-of-run sizes, by device
        if getattr(cfg, k) is None:
            setattr(cfg, k, on_cuda if name.startswith("cuda") else elsewhere)
    for k, v in vars(cfg).items():  # the choices, and no negative numbers (0 means off)
        if k in CHOICES and v not in CHOICES[k]:
            fail(f"unknown {k} {v!r}; expected one of {', '.join(CHOICES[k])}")
        least = 1 if k in ("max_steps", "batch_size", "log_every", "eval_every") else 0
        if type(v) in (int, float) and v < least:
            fail(f"--{k} must be >= {least}, got {v}")
    try:
        torch.empty(0, device=name)  # fails at once for an unknown or missing device
    except Exception as e:
        fail(f"--device {name} is not available here ({type(e).__name__}); try --device cpu")
    if cfg.dtype == "bfloat16" and not name.startswith("cuda"):
        fail("--dtype bfloat16 is autocast on CUDA; use --dtype float32 on this device")
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls in TF32 on CUDA, as convs
    if WORLD > 1 and name == "cuda":  # torchrun: a GPU per process, NCCL
        name = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(name)
    if WORLD > 1:
        torch.distributed.init_process_group("nccl" if name.startswith("cuda") else "gloo")
    cfg.out_dir = cfg.out_dir.replace("{dataset}", cfg.dataset)  # the default: out/<file>-<dataset>
    try:  # a file or a read-only folder fails now, not after the training
        os.makedirs(cfg.out_dir, exist_ok=True)
        log(cfg, f"{cfg}\ntorch {torch.__version__} | device {name} | processes {WORLD} | "
            + ("TF32 matmuls" if name.startswith("cuda") else "float32 matmuls"))
    except OSError as e:
        fail(f"cannot write to --out_dir {cfg.out_dir} ({e.strerror})")
    path = f"{cfg.out_dir}/ckpt.pt"
    if not (cfg.resume or cfg.eval_only):
        return torch.device(name), None
    if not os.path.exists(path):
        fail(f"no checkpoint at {path} (train first, or check --out_dir)")
    try:  # weights_only: tensors and plain types, all that our checkpoints hold
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        script, dataset = ckpt.get("script", "older code"), ckpt["config"]["dataset"]
    except Exception as e:
        fail(f"{path} is not a checkpoint these files wrote ({type(e).__name__})")
    if (script, dataset) != (NAME, cfg.dataset):  # never evaluate another model or dataset silently
        fail(f"{path} is {script}'s checkpoint of {dataset}, not {NAME}'s of {cfg.dataset}")
    if any(k not in ckpt["config"] for k in ARCH):  # an older version of this file wrote it
        fail(f"{path} lacks settings that this {NAME} needs; train anew")
    arch = {k: ckpt["config"][k] for k in ARCH}
    log(cfg, f"loaded {path} at step {ckpt['step']}; its architecture: {arch}")
    vars(cfg).update(arch)  # the checkpoint's architecture replaces the command line's
    return torch.device(name), ckpt
def log(cfg, msg):  # print, and append to log.txt in out_dir: on rank 0 only
    if RANK == 0:
        print(msg, flush=True)
        with open(f"{cfg.out_dir}/log.txt", "a") as f:
            f.write(msg + "\n")
def progress(cfg, what, items):  # yields the items; a line with the ETA every 10 s of a long phase
    t0 = last = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if time.perf_counter() - last > 10 and i < len(items):
            last = time.perf_counter()
            log(cfg, f"{what} {i}/{len(items)} | eta {(last - t0) * (len(items) - i) / i:.0f}s")
def stop_if_diverged(cfg, step, value, what="training loss", worst=math.inf):  # exit status 1
    if torch.is_tensor(value) and WORLD > 1:  # a loss: its mean over the ranks, so all stop together
        value = value.detach() / WORLD  # a new tensor, which all_reduce sums in place
        torch.distributed.all_reduce(value)
    if not value < worst:  # inf, NaN, or worse than this model can be
        saved = os.path.exists(f"{cfg.out_dir}/ckpt.pt")
        fail(f"the {what} diverged at step {step} ({value:.4g}); "
             + ("the last good ckpt.pt is kept" if saved else "no checkpoint was written"))
def save_checkpoint(cfg, step, test, worst=math.inf, **state):  # atomic, and only if test < worst
    stop_if_diverged(cfg, step, test, "test metric", worst)
    state |= {"script": NAME, "step": step, "config": dataclasses.asdict(cfg)}
    torch.save(state, f"{cfg.out_dir}/ckpt.tmp")
    os.replace(f"{cfg.out_dir}/ckpt.tmp", f"{cfg.out_dir}/ckpt.pt")  # a kill keeps the old one
def fid_metrics(imgs, cfg, device):  # metrics.py's FID, precision, recall of uint8 images
    try:
        import metrics  # lazily: a copied model file runs alone with --fid_samples 0
        return metrics.evaluate(imgs, cfg.dataset, cfg.data_dir, device)
    except (Exception, SystemExit) as e:  # a broken yardstick must not lose a finished run
        log(cfg, f"metrics failed, fid left empty: {type(e).__name__}: {e}")
        return {}
def finish(cfg, res, curves, keys):  # loss.png, results.json and the FINAL line
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    ax.plot(*zip(*curves["train"]), label="train")
    ax.plot(*zip(*curves["test"]), "o-", label="test")
    ax.set(xlabel="step", ylabel=keys[0])
    ax.legend()
    ax.figure.savefig(f"{cfg.out_dir}/loss.png")
    res["config"] = dataclasses.asdict(cfg)
    with open(f"{cfg.out_dir}/results.json", "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={res[k]:.4g}" for k in keys if k in res)
    log(cfg, f"FINAL {NAME[:-3]} {cfg.dataset} {shown} steps={res['steps']} "
        f"time={res['wall_s']:.0f}s device={res['device']}")
    return res
def main():  # the command line; a batch too big for the memory is a one-line error too
    cfg = parse_args()
    try:
        train(cfg)
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA, MPS), or the CPU allocator's
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        fail(f"out of memory at --batch_size {cfg.batch_size}: {str(e).split(' Including')[0]}")
# --------------------------------------------------------------------------- training
def train(cfg: Config) -> dict:
    device, ckpt = setup(cfg)
    x_train = load_split(cfg, train=True)[0].to(device)  # all on the device
    x_test = load_split(cfg, train=False)[0].to(device)
    size = x_train.shape[2]
    halvings = [L for L in range(1, 7) if size % 2 ** L == 0 and size // 2 ** L >= 4]
    cfg.L = cfg.L or max(halvings, default=1)  # down to 4x4 at least: 28 -> 7 (L 2), 64 -> 4 (L 4)
    if size % 2 ** cfg.L:
        fail(f"--L {cfg.L} cannot halve {size}x{size} images {cfg.L} times")
    torch.manual_seed(cfg.seed + RANK)  # DDP gives every rank rank 0's initial weights
    model = Glow(cfg, x_train.shape[1:]).to(device)
    model.data_init(x_train[:256])  # the first batch, before DDP; a loaded checkpoint replaces it
    ema = copy.deepcopy(model).requires_grad_(False)  # the Polyak average, as in the official code
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * RANK)  # batches and dequantization
    step, curves = 0, {"train": [], "test": []}  # curves: (step, bits/dim) pairs for loss.png
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt.get("ema", ckpt["model"]))  # older files: the last weights
        opt.load_state_dict(ckpt["optimizer"])
        step, curves = ckpt["step"], ckpt["curves"]
        g.manual_seed(cfg.seed + 1000 * RANK + step)  # the other ranks draw new batches
        if RANK == 0:
            g.set_state(ckpt["rng"])  # rank 0 continues exactly
    fwd = nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    t0 = time.perf_counter()
    t_train = 0.0  # seconds in training steps, for img/s
    start = step
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)]
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss, stats = fwd(dequantize(x, g))  # the noise u drawn outside the compiled graph
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # a short run averages over fewer steps
        with torch.no_grad():  # the official decay: 1 - 1 / (steps per epoch), 0.9987 on CIFAR-10
            torch._foreach_lerp_(ema_params, params, 1 - decay)  # ema += (1 - decay) (w - ema)
        step += 1
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            bpd = stats["bpd"]  # bits/dim, a 0-dim tensor
            stop_if_diverged(cfg, step, bpd)  # on every rank, before a diverged model is saved
            curves["train"].append((step, bpd.item()))  # the device syncs at log steps only
            speed = (step - start) * cfg.batch_size * WORLD / t_train
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start) / 60
            log(cfg, f"step {step}/{cfg.max_steps} | loss {curves['train'][-1][1]:.3f} bits/dim"
                f" | {speed:.0f} img/s | eta {eta:.1f}m")
        if RANK == 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            save_pictures(ema, cfg)
            curves["test"].append((step, evaluate(ema, x_test, cfg)["test_bpd"]))
            log(cfg, f"eval step {step} | test {curves['test'][-1][1]:.4f} bits/dim (exact, ema)")
            save_checkpoint(cfg, step, curves["test"][-1][1], model=model.state_dict(),
                            ema=ema.state_dict(), optimizer=opt.state_dict(), curves=curves,
                            rng=g.get_state(), train_images_per_s=speed)
    if WORLD > 1:
        torch.distributed.destroy_process_group()
    if RANK != 0:
        return {}
    res = evaluate(ema, x_test, cfg)  # the Polyak average, as the checkpoints' test curve
    save_pictures(ema, cfg)
    res |= sample_metrics(ema, cfg, device)
    res |= {"steps": step, "wall_s": time.perf_counter() - t0, "device": str(device)}
    res["train_images_per_s"] = speed if step > start else ckpt["train_images_per_s"]
    return finish(cfg, res, curves, ["test_bpd", "fid", "samples_nonfinite_frac"])

if __name__ == "__main__":
    main()
