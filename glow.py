"""Glow (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions", arXiv:1807.03039):
L levels of [squeeze, K x (ActNorm -> invertible 1x1 conv -> affine coupling), split]; each split-off half and the
top get learned Gaussians, written as eps = (z - mu) / sigma, so the model is one bijection y -> eps ~ N(0, I).
28x28 images use L=2 (28 -> 14 -> 7, no padding: bpd over the true 784 pixels); 32x32 ones L=3 (paper).
Units: y = (floor(x / 2^(8-n_bits)) + u) / 2^n_bits - 1/2, u ~ U[0,1)^D; test_bpd = (-log p(y) + D log 2^n_bits)
/ (D log 2), exact for the dequantized density with one noise draw per test image ("exact").
Deviations: coupling scale s = s_min + (1 - s_min) sigmoid(h + 2), --scale_min 0.5: the official sigmoid(h + 2)
(--scale_min 0) let 1/s explode in the sampling inverse: ~80% of T=1 samples were inf/NaN (see Coupling); the
paper's exp(h) is --scale_fn exp. Zero padding (not the official edge-aware one); no class conditioning or Polyak.
    python glow.py --dataset fashion    # the headline (GPU; downloads to ./data; not measured: no GPU was lent)
    OMP_NUM_THREADS=1 python glow.py --dataset mnist --data_dir ../shared/data --K 8 --hidden 32 --max_steps 600 \\
        --warmup_steps 100 --eval_every 200 --fid_samples 0   # 2-core shared CPU, 520 s: test bpd 3.98 (step 200),
        # 3.37 (400), 2.86 (600); 0 of 2000 samples inf/NaN at T=1 and T=0.7 (--scale_min 0: 2.88, 80% and 23%)
Writes to out_dir: ckpt.pt, samples.png (T=0.7), samples_temps.png (a row per temperature), samples.npz,
loss.png, log.txt, results.json (test_bpd; fid/precision/recall at --fid_temperature and over --sweep).
"""
import argparse, dataclasses, json, math, os, sys, time  # noqa: E401
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
ARCH_FIELDS = ("dataset", "L", "K", "hidden", "permutation", "lu", "coupling", "scale_fn", "scale_min", "learn_top", "n_bits")

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
    scale_min: float = 0.5  # sigmoid coupling scale in (scale_min, 1); 0 = official code (unbounded inverse)
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
    raise SystemExit(f"glow.py: error: {msg}")

def check_config(cfg):  # validates the combination once; resolves L = 0 (auto) in place
    for k, options in CHOICES.items():
        if getattr(cfg, k) not in options:
            fail(f"unknown {k} {getattr(cfg, k)!r}; expected one of {', '.join(options)}")
    size = SHAPES[cfg.dataset][1]
    cfg.L = cfg.L or (3 if size % 8 == 0 else 2)
    if cfg.L < 1 or size % 2 ** cfg.L:
        fail(f"--L {cfg.L} cannot squeeze {size}x{size} {cfg.dataset} images ({size} must be divisible by 2**L); "
             f"use --L {1 + (size % 4 == 0) + (size % 8 == 0)} or --L 0 (auto)")
    if min(cfg.K, cfg.hidden, cfg.batch_size, cfg.eval_batch_size, cfg.eval_every, cfg.sample_every, cfg.log_every) < 1 \
            or cfg.max_steps < 0 or not 1 <= cfg.n_bits <= 8 or not 0 <= cfg.scale_min < 1:
        fail("--K, --hidden, --batch_size, --eval_batch_size, --*_every must be >= 1, --max_steps >= 0, "
             "--n_bits in 1..8, --scale_min in [0, 1)")
    try:
        temperatures(cfg)
    except ValueError:
        fail(f"--sweep must be comma-separated temperatures like 0.6,0.8 (got {cfg.sweep!r})")
    if min(cfg.n_samples, cfg.fid_samples + 1, cfg.grad_clip + 1) < 1:
        fail("--n_samples must be >= 1, --fid_samples and --grad_clip >= 0 (0 skips / switches off)")
    try:
        device = pick_device(cfg.device)
    except RuntimeError:
        fail(f"unknown --device {cfg.device!r}; expected auto, cpu, cuda, cuda:N or mps")
    if cfg.dtype == "bfloat16" and device.type != "cuda":
        fail("--dtype bfloat16 is autocast on CUDA; use --dtype float32 on this device")

# ----------------------------------------------------------------------------- model: every layer maps
# forward(x) -> (y, log|det dy/dx| [B], per sample) and has the exact inverse(y) -> x

class ActNorm(nn.Module):
    """y = (x + b) * exp(logs) per channel (sec. 3.1), b and logs set from the first batch for zero mean, unit variance;
    `initialized` is a buffer, so a loaded checkpoint is never re-initialized. logdet=False: inside coupling networks."""
    init_mode = False  # set by Glow.data_init only
    def __init__(self, C, logdet=True):
        super().__init__()
        self.b, self.logs, self.logdet = nn.Parameter(torch.zeros(1, C, 1, 1)), nn.Parameter(torch.zeros(1, C, 1, 1)), logdet
        self.register_buffer("initialized", torch.tensor(False))
    def forward(self, x):
        if self.init_mode:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
            self.b.data, self.logs.data = -mean, -0.5 * torch.log(var + 1e-12)
            self.initialized.fill_(True)
        y = (x + self.b) * self.logs.exp()  # table 1: log-det h * w * sum(logs), the same for every sample
        return (y, (x.shape[2] * x.shape[3] * self.logs.sum()).expand(len(x))) if self.logdet else y
    def inverse(self, y):
        return y * torch.exp(-self.logs) - self.b

class InvConv1x1(nn.Module):
    """Invertible 1x1 conv (sec. 3.2): W = P L (U + diag(sign(s) exp(log|s|))), log|det W| = sum log|s|, or a plain W
    with slogdet, both starting as a random rotation; or a fixed shuffle or reversal (the paper's ablation, log-det 0)."""
    def __init__(self, C, kind="invconv", lu=True):
        super().__init__()
        W, self.lu = torch.linalg.qr(torch.randn(C, C))[0], kind == "invconv" and lu
        if kind != "invconv":  # a fixed permutation matrix
            self.register_buffer("W", torch.eye(C)[torch.randperm(C) if kind == "shuffle" else torch.arange(C - 1, -1, -1)])
        elif not lu:
            self.W = nn.Parameter(W)
        else:
            P, L, U = torch.linalg.lu(W)
            self.register_buffer("P", P), self.register_buffer("sign_s", U.diagonal().sign())
            self.L, self.U, self.log_s = nn.Parameter(L), nn.Parameter(torch.triu(U, 1)), nn.Parameter(U.diagonal().abs().log())
    def weight(self):  # W [C, C] and log|det W|
        if not self.lu:
            return self.W, torch.linalg.slogdet(self.W)[1]
        L = torch.tril(self.L, -1) + torch.eye(len(self.P), dtype=self.P.dtype, device=self.P.device)  # unit lower
        U = torch.triu(self.U, 1) + torch.diag(self.sign_s * self.log_s.exp())  # its diagonal lives in s
        return self.P @ L @ U, self.log_s.sum()
    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # the flow itself stays float32 under bf16 autocast
            W, logdet = self.weight()
            return F.conv2d(x, W[:, :, None, None]), (x.shape[2] * x.shape[3] * logdet).expand(len(x))  # eq. (9)
    def inverse(self, y):
        return F.conv2d(y, torch.linalg.inv(self.weight()[0])[:, :, None, None])

class ZeroConv2d(nn.Conv2d):
    """3x3 conv initialized to zero, output scaled by exp(3 * logs) (official conv2d_zeros): starts as 0."""
    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, 3, padding=1)
        self.weight.data.zero_(), self.bias.data.zero_()
        self.logs = nn.Parameter(torch.zeros(1, c_out, 1, 1))
    def forward(self, x):
        return super().forward(x) * torch.exp(3 * self.logs)

class Coupling(nn.Module):
    """Affine coupling (table 1): x_a passes, x_b -> (x_b + t) * s, (h, t) = NN(x_a), s = s_min + (1 - s_min) sigmoid(h + 2)
    or exp(h) (paper); additive: s = 1. The inverse x_b = y_b / s - t gains 1 / s: with s_min = 0 (official code), x_a a
    little unlike the data gave h ~ -100 and an output that drove the next steps' h lower still, until samples overflowed;
    s_min > 0 caps the gain at 1 / s_min per step, and the map stays an exact bijection with log-det sum log s.
    NN = conv3x3 - ActNorm - ReLU - conv1x1 - ActNorm - ReLU - ZeroConv3x3, so a step starts as the identity (or as a
    fixed scaling by s_min + (1 - s_min) sigmoid(2))."""
    def __init__(self, C, hidden, affine=True, scale_fn="sigmoid", scale_min=0.5):
        super().__init__()
        self.affine, self.scale_fn, self.scale_min = affine, scale_fn, scale_min
        self.nn = nn.Sequential(nn.Conv2d(C // 2, hidden, 3, padding=1, bias=False), ActNorm(hidden, False), nn.ReLU(),
                                nn.Conv2d(hidden, hidden, 1, bias=False), ActNorm(hidden, False), nn.ReLU(),
                                ZeroConv2d(hidden, C if affine else C // 2))
    def shift_logscale(self, xa, xb):
        h = self.nn(xa).to(xb.dtype)  # float32 log-dets under bf16 autocast
        if not self.affine:
            return h, torch.zeros_like(xb)
        t, h, s_min = h[:, 0::2], h[:, 1::2], self.scale_min  # interleaved halves, as the official code
        if self.scale_fn == "exp":
            return t, h
        return t, F.logsigmoid(h + 2) if s_min == 0 else torch.log(s_min + (1 - s_min) * torch.sigmoid(h + 2))
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
                            Coupling(C, cfg.hidden, cfg.coupling == "affine", cfg.scale_fn, cfg.scale_min))
            self.levels.append(nn.ModuleList([layer for _ in range(cfg.K) for layer in step()]))  # K x fig. 2a
            if i < cfg.L - 1:  # split: half leaves as eps, its (mu, log sigma) from the other half
                self.splits.append(ZeroConv2d(C // 2, C))
                self.eps_shapes.append((C // 2, H, W))
                C //= 2
        self.eps_shapes.append((C, H, W))
        self.top = nn.Parameter(torch.zeros(1, 2 * C, H, W), requires_grad=cfg.learn_top)  # top (mu, log sigma)
    def prior(self, i, x):  # (mu, log sigma) of level i's eps: from the kept half x after a split, else the top
        return (self.splits[i](x) if i < len(self.splits) else self.top.expand(len(x), -1, -1, -1)).chunk(2, 1)
    def forward_flow(self, x):  # y [B, C, H, W] -> eps (one [B, c, h, w] per level), log|det d eps / dy| [B]
        eps, logdet = [], x.new_zeros(len(x))
        for i, layers in enumerate(self.levels):
            x = squeeze(x)
            for layer in layers:  # ActNorm, 1x1 conv, coupling, ActNorm, ...
                x, ld = layer(x)
                logdet = logdet + ld
            x, z = x.chunk(2, 1) if i < len(self.splits) else (x, x)  # channels are even: squeeze made them 4C
            mu, logs = self.prior(i, x)
            eps.append((z - mu) * torch.exp(-logs))
            logdet = logdet - logs.flatten(1).sum(1)  # d eps / dz = 1 / sigma
        return eps, logdet
    def inverse(self, eps):
        x = eps[-1]  # the top prior only takes its batch size
        for i in reversed(range(len(self.levels))):
            mu, logs = self.prior(i, x)
            z = mu + torch.exp(logs) * eps[i]
            x = torch.cat([x, z], 1) if i < len(self.splits) else z
            for layer in reversed(self.levels[i]):
                x = layer.inverse(x)
            x = unsqueeze(x)
        return x
    def log_prob(self, y):  # [B] nats: the density of y (change of variables, per sample)
        eps, logdet = self.forward_flow(y)
        return logdet + sum(-0.5 * (e ** 2 + math.log(2 * math.pi)).flatten(1).sum(1) for e in eps)
    def bpd(self, y):  # [B] bits/dim of the n_bits data: (-log p(y) + D log 2^n_bits) / (D log 2)
        return -self.log_prob(y) / (self.D * math.log(2)) + self.n_bits
    def forward(self, x, generator=None):  # uint8 -> loss and stats in bits/dim, 0-dim tensors (no device sync)
        loss = self.bpd(dequantize(x, self.n_bits, generator).to(self.top.dtype)).mean()
        return loss, {"bpd": loss.detach()}
    @torch.no_grad()
    def data_init(self, x):  # ActNorm's data-dependent init (sec. 3.1) on one uint8 batch, unless already done
        norms = [m for m in self.modules() if isinstance(m, ActNorm) and not m.initialized]
        for m in norms:
            m.init_mode = True
        if norms:  # one pass: each ActNorm normalizes the output of the layers before it
            self.log_prob(dequantize(x, self.n_bits).to(self.top.dtype))
        for m in norms:
            m.init_mode = False
        return bool(norms)
    @torch.inference_mode()
    def sample(self, n, temperature=1.0, generator=None):  # y [n, C, H, W] in about [-1/2, 1/2), eps ~ N(0, T^2 I)
        dev, dtype = self.top.device, self.top.dtype  # (sec. 4: a reduced temperature T)
        return self.inverse([temperature * torch.randn((n, *s), device=dev, dtype=dtype, generator=generator) for s in self.eps_shapes])

def dequantize(x, n_bits, generator=None):  # uint8 -> y = (x_n + u) / 2^n - 1/2 in [-1/2, 1/2)
    x = torch.div(x, 2 ** (8 - n_bits), rounding_mode="floor").float()  # keep the n_bits high bits
    return (x + torch.rand(x.shape, device=x.device, generator=generator)) / 2 ** n_bits - 0.5

def to_uint8(y, n_bits):  # the bin of y, back on the 0..255 scale; NaN shows as mid-grey
    x = torch.floor((torch.nan_to_num(y.float()) + 0.5) * 2 ** n_bits).clamp(0, 2 ** n_bits - 1)
    return (x * 2 ** (8 - n_bits)).to(torch.uint8)

# ----------------------------------------------------------------------------- data and evaluation

def load_split(dataset, data_dir, train):  # the whole split: uint8 [N, C, H, W], int64 labels [N] (no per-image PIL)
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

@torch.inference_mode()
def evaluate(model, x_test, cfg):  # exact test bits/dim over the whole split, one fixed dequantization per image
    g = torch.Generator(x_test.device).manual_seed(cfg.seed + 1)
    return sum(model.bpd(dequantize(xb, cfg.n_bits, g)).sum().item() for xb in x_test.split(cfg.eval_batch_size)) / len(x_test)

def temperatures(cfg):  # of the headline samples and metrics, then the sweep
    return [cfg.fid_temperature] + [float(t) for t in cfg.sweep.split(",") if t.strip()]

@torch.inference_mode()
def save_pictures(model, cfg, final=False):  # samples.png at --temperature; at the end samples_temps.png, a row per T
    g = torch.Generator(model.top.device).manual_seed(cfg.seed)  # the same noise every time
    imgs = to_uint8(model.sample(cfg.n_samples, cfg.temperature, g), cfg.n_bits) / 255.
    torchvision.utils.save_image(imgs, os.path.join(cfg.out_dir, "samples.png"), nrow=max(1, int(math.sqrt(cfg.n_samples))))
    if final:  # the same 8 noise draws at every temperature
        eps = [torch.randn((8, *s), device=model.top.device, generator=g) for s in model.eps_shapes]
        rows = [to_uint8(model.inverse([t * e for e in eps]), cfg.n_bits) for t in sorted({0, cfg.temperature, *temperatures(cfg)})]
        torchvision.utils.save_image(torch.cat(rows) / 255., os.path.join(cfg.out_dir, "samples_temps.png"), nrow=8)

def generate_and_score(model, cfg, device):
    """samples.npz at --fid_temperature (timed) and metrics.py's FID / precision / recall at every temperature, each
    with the fraction of samples whose inverse overflowed (inf/NaN pixels, shown mid-grey)."""
    g = torch.Generator(device).manual_seed(cfg.seed + 2)
    def generate(n, t):  # n uint8 images on the CPU and the non-finite fraction
        ys = [model.sample(min(cfg.eval_batch_size, n - i), t, g) for i in range(0, n, cfg.eval_batch_size)]
        return torch.cat([to_uint8(y, cfg.n_bits) for y in ys]).cpu(), sum(int((~y.isfinite()).flatten(1).any(1).sum()) for y in ys) / n
    t0 = time.perf_counter()
    imgs, bad = generate(max(cfg.fid_samples, cfg.n_samples), cfg.fid_temperature)
    res = {"sample_images_per_s": len(imgs) / (time.perf_counter() - t0), "samples_nonfinite_frac": bad}
    np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=imgs.numpy(), temperature=cfg.fid_temperature)
    if cfg.fid_samples == 0:
        return res
    import metrics  # lazily: a copied glow.py runs alone with --fid_samples 0
    res.update(metrics.evaluate(imgs[:cfg.fid_samples], cfg.dataset, cfg.data_dir, device), fid_temperature=cfg.fid_temperature)
    res["metrics_by_temperature"] = by_t = {}
    for t in temperatures(cfg)[1:]:
        imgs, bad = generate(cfg.fid_samples, t)
        m = metrics.evaluate(imgs, cfg.dataset, cfg.data_dir, device)
        by_t[str(t)] = {"fid": m["fid"], "precision": m["precision"], "recall": m["recall"], "samples_nonfinite_frac": bad}
    return res

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
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(auto if name == "auto" else name)

def setup_distributed(device):  # under torchrun, join the process group (NCCL on GPUs, gloo on CPU)
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

def plot_losses(history, evals, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*history), lw=0.8, label="train bpd"), ax.plot(*zip(*evals), "o-", label="test bpd (exact)")
    ax.set(xlabel="step", ylabel="bits / dim"), ax.legend(), fig.savefig(path, dpi=100, bbox_inches="tight"), plt.close(fig)

def train(cfg: Config) -> dict:
    check_config(cfg)
    cfg.out_dir = cfg.out_dir or f"out/glow-{cfg.dataset}"
    device, rank, world = setup_distributed(pick_device(cfg.device))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg) if cfg.resume or cfg.eval_only else None
    if cfg.eval_only:  # rebuild the model the checkpoint describes, whatever the command line says
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = make_logger(os.path.join(cfg.out_dir, "log.txt"), master=rank == 0)
    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | processes {world}")
    x_train, x_test = (load_split(cfg.dataset, cfg.data_dir, split)[0].to(device) for split in (True, False))  # on the device
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    model = Glow(cfg, SHAPES[cfg.dataset]).to(device)
    log(f"glow L={cfg.L} K={cfg.K} hidden={cfg.hidden} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = (torch.optim.Adamax if cfg.optimizer == "adamax" else torch.optim.Adam)(model.parameters(), lr=cfg.lr)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)  # batch indices, flips, dequantization
    step, history, evals = 0, [], []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            g.set_state(ckpt["rng"]) if rank == 0 else g.manual_seed(cfg.seed + 1000 * rank + ckpt["step"])
            step, history, evals = ckpt["step"], ckpt["history"], ckpt["evals"]
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint {ckpt_path} does not fit this model: {str(e).splitlines()[0]}")
        log(f"loaded {ckpt_path} at step {step}")
    if model.data_init(x_train[torch.randperm(len(x_train), device=device)[:max(cfg.batch_size, 256)]]):
        log("ActNorm initialized from a batch of training data")  # before DDP, which then broadcasts rank 0's
    fwd = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    def checkpoint(results=None):  # never overwrites the last good checkpoint with a diverged model
        if (history and not math.isfinite(history[-1][1])) or not all(p.isfinite().all() for p in model.parameters()):
            fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
        if rank == 0:  # write, then rename: never a half-written ckpt.pt
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg),
                        "results": results, "history": history, "evals": evals, "rng": g.get_state()}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
    t_train, t0, start_step = 0.0, time.perf_counter(), step
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)]
        if cfg.flip and cfg.dataset in FLIP_OK:  # on the device, half of the batch mirrored left-right
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device, generator=g) < 0.5, x.flip(3), x)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))  # linear warmup
        with autocast:
            loss, stats = fwd(x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # 0 = off
        opt.step()
        step, t_train = step + 1, t_train + time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            history.append((step, stats["bpd"].item()))
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {history[-1][1]:.3f} bpd | "
                f"{(step - start_step) * cfg.batch_size / t_train:.0f} img/s | eta {eta / 60:.1f}m")
            if not math.isfinite(history[-1][1]):
                checkpoint()  # fails with the non-finite message
        if rank == 0 and step % cfg.sample_every == 0:
            save_pictures(model, cfg)
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            if rank == 0:
                evals.append((step, evaluate(model, x_test, cfg)))
                log(f"eval step {step} | test_bpd {evals[-1][1]:.4f} bits/dim (exact, {len(x_test)} test images)")
            checkpoint()
    if not cfg.eval_only:
        checkpoint()  # before the (long) final evaluation, so no training is lost
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    res = {"test_bpd": evaluate(model, x_test, cfg), "test_bpd_kind": "exact (dequantized density, 1 noise draw)", "test_bpd_n_bits": cfg.n_bits}
    save_pictures(model, cfg, final=True)
    res.update(generate_and_score(model, cfg, device))
    res.update(steps=step, wall_s=time.perf_counter() - t0, device=str(device), config=asdict(cfg),
               train_images_per_s=(step - start_step) * cfg.batch_size * world / t_train if t_train else None)
    if not cfg.eval_only:
        evals.append((step, res["test_bpd"]))
        checkpoint(res)
        plot_losses(history, evals, os.path.join(cfg.out_dir, "loss.png"))
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={res[k]:.4g}" for k in ("test_bpd", "fid", "samples_nonfinite_frac") if isinstance(res.get(k), float))
    log(f"FINAL glow {cfg.dataset} {shown} steps={step} time={res['wall_s']:.0f}s device={device}")
    return res

if __name__ == "__main__":
    train(parse_args())
