"""PixelCNN (van den Oord et al. 2016a) and Gated PixelCNN (van den Oord et al. 2016b): p(x) = prod_i p(x_i | x_<i)
in raster order, R -> G -> B inside a pixel, so the test likelihood is exact: test_bpd = -log2 p(x) / D.
--arch pixelcnn: 7x7 type-A masked conv, residual blocks of kxk type-B convs (has the blind spot); --arch gated
(default): vertical + horizontal stacks, tanh * sigmoid gates, no blind spot. Output per channel: a softmax over
--levels values (x -> floor(x * levels / 256); bpd is then exact for the quantized data), or --output logistic_mix
(PixelCNN++'s discretized logistic mixture, Salimans et al. 2017). --conditional: a class bias in every layer.
Deviations: the mixture is per channel, ordered by the masks (no PixelCNN++ linear coupling); small defaults.
Fast sampler: vertical stack once per row on the rows that reach it, horizontal stack on the current row only;
the same uniform noise gives the same images as the naive loop (tests/bench_pixelcnn.py, default network,
one 28x28 image, 1 thread of a shared 2-core CPU: 11.4 s vs 460 s, 40x, identical images).

    python pixelcnn.py --dataset mnist --data_dir ../shared/data                    # default run (GPU)
    python pixelcnn.py --dataset mnist --data_dir ../shared/data --levels 4         # posterized, faster
Shared 2-core CPU, OMP_NUM_THREADS=1, --hidden 32 --n_layers 6 --kernel 3 --batch_size 32 --lr 3e-3: 250 steps
-> test 1.222 bits/dim (exact), 955 s; --levels 4, 200 steps -> 0.252 bits/dim (exact, 4 levels), 469 s.
Writes to --out_dir: ckpt.pt, samples.png, samples.npz, loss.png, log.txt, results.json.
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

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}
CHANNELS = {"fashion": 1, "mnist": 1, "cifar10": 3}
FLIP_OK = {"fashion", "cifar10"}  # horizontal flips keep these datasets' images plausible, not digits
ARCH_FIELDS = ("dataset", "arch", "output", "levels", "n_mix", "conditional", "hidden", "n_layers", "kernel")


@dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10
    data_dir: str = "./data"  # torchvision root: <data_dir>/FashionMNIST/raw/...
    out_dir: str = ""  # empty: out/pixelcnn-<dataset>
    arch: str = "gated"  # gated (vertical + horizontal stacks) | pixelcnn (original, with a blind spot)
    output: str = "softmax"  # softmax over --levels values per channel | logistic_mix (needs --levels 256)
    levels: int = 256  # intensity levels per channel, 2..256; x -> floor(x * levels / 256)
    n_mix: int = 5  # logistic mixture components (logistic_mix only)
    conditional: bool = False  # learned class bias in every layer; sample grids get one row per class
    hidden: int = 96  # channels p of each stack (a multiple of the image channels, for the R/G/B groups)
    n_layers: int = 12  # gated layers (gated) or residual blocks (pixelcnn)
    kernel: int = 5  # k of the k x k masked convs (odd); the first pixelcnn layer is 7x7
    flip: bool = True  # random horizontal flips where the dataset allows them
    max_steps: int = 20000  # optimizer steps
    batch_size: int = 64  # images per step (per process under torchrun)
    lr: float = 1e-3  # Adam, after a linear warmup of min(200, max_steps / 10) steps, cosine decay to 10%
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0
    eval_every: int = 2000  # steps between exact test-set evaluations and checkpoints
    sample_every: int = 2000  # steps between refreshing samples.png
    log_every: int = 100  # steps between progress lines
    fast_sampler: bool = True  # cached sampler (false: the whole network on the whole image per value)
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in the sample grid
    fid_samples: int = 2000  # generated images for FID / precision / recall (0 skips them)


CHOICES = {"dataset": tuple(DATASETS), "arch": ("gated", "pixelcnn"), "output": ("softmax", "logistic_mix"),
           "dtype": ("float32", "bfloat16")}


def parse_args(argv=None) -> Config:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    as_bool = lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    for f in dataclasses.fields(Config):
        kind = as_bool if f.type is bool else f.type
        p.add_argument(f"--{f.name}", type=kind, default=f.default, choices=CHOICES.get(f.name), help=f.type.__name__)
    return Config(**vars(p.parse_args(argv)))


def fail(msg):
    raise SystemExit(f"pixelcnn.py: error: {msg}")


def check_config(cfg):
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            fail(f"unknown {name} {getattr(cfg, name)!r}; expected one of {', '.join(allowed)}")
    if not 2 <= cfg.levels <= 256:
        fail(f"--levels must be in 2..256 (got {cfg.levels})")
    if cfg.output == "logistic_mix" and cfg.levels != 256:
        fail(f"--output logistic_mix models all 256 values; it needs --levels 256 (got {cfg.levels})")
    if cfg.kernel < 3 or cfg.kernel % 2 == 0:
        fail(f"--kernel must be odd and >= 3 (got {cfg.kernel})")
    if min(cfg.hidden, cfg.n_layers, cfg.n_mix, cfg.batch_size) < 1:
        fail("--hidden, --n_layers, --n_mix and --batch_size must be >= 1")
    if cfg.hidden % CHANNELS[cfg.dataset]:
        fail(f"--hidden must be a multiple of {CHANNELS[cfg.dataset]} on {cfg.dataset} (R/G/B groups); got {cfg.hidden}")
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.dtype == "bfloat16" and not cuda:
        fail("--dtype bfloat16 is autocast on CUDA; use --dtype float32 on this device")


# ----------------------------------------------------------------------------- model

class MaskedConv2d(nn.Conv2d):
    """Conv with explicit zero padding pad = (left, right, top, bottom). kind None: no mask. kind A/B: taps
    after `centre` in raster order are zero; at the centre, channel o (group o % C: R, G, B) sees input
    channel i only if group(i) < group(o) (A) or <= (B). Every tensor uses the same c % C grouping."""
    def __init__(self, ci, co, kernel, pad, centre=None, kind=None, C=1):
        super().__init__(ci, co, kernel)
        mask = torch.ones_like(self.weight)  # [co, ci, kh, kw]
        if kind is not None:
            r, c = centre
            mask[:, :, r + 1:] = 0
            mask[:, :, r, c + 1:] = 0
            go, gi = torch.arange(co)[:, None] % C, torch.arange(ci)[None, :] % C
            mask[:, :, r, c] = (go > gi) if kind == "A" else (go >= gi)
        self.register_buffer("mask", mask)
        self.pad = pad

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


def gate(x):  # tanh(W_f * x) * sigmoid(W_g * x), eq. (2) of van den Oord et al. 2016b
    a, b = x.chunk(2, dim=1)  # halves keep the R/G/B grouping because p % C == 0
    return torch.tanh(a) * torch.sigmoid(b)


def pointwise(ci, co, C):  # 1x1 conv that keeps R -> G -> B inside a pixel (type B)
    return MaskedConv2d(ci, co, 1, (0, 0, 0, 0), (0, 0), "B", C)


class GatedLayer(nn.Module):
    """One layer of both stacks. The vertical stack only ever sees rows above the current one: the first
    layer takes the kh = k//2+1 rows strictly above, later layers the kh rows ending at the current row of
    features that already see only rows above. The horizontal stack sees the current row up to the pixel."""
    def __init__(self, C, p, k, first, n_classes):
        super().__init__()
        ci, kh = (C if first else p), k // 2 + 1
        self.first = first
        self.v = MaskedConv2d(ci, 2 * p, (kh, k), (k // 2, k // 2, kh, -1) if first else (k // 2, k // 2, kh - 1, 0))
        self.h = MaskedConv2d(ci, 2 * p, (1, kh), (kh - 1, 0, 0, 0), (0, kh - 1), "A" if first else "B", C)
        self.v2h = nn.Conv2d(2 * p, 2 * p, 1)  # rows above may feed every channel of the current row
        self.h2h = pointwise(p, p, C)
        self.cond = nn.Embedding(n_classes, 4 * p) if n_classes else None  # class bias V^T y, eq. (4)

    def bias(self, y, part):
        return 0 if self.cond is None else self.cond(y).chunk(2, dim=1)[part][:, :, None, None]

    def vertical(self, v, y):  # -> pre-activation (for v2h) and output of the vertical stack
        v_pre = self.v(v) + self.bias(y, 0)
        return v_pre, gate(v_pre)

    def horizontal(self, h, v_pre, y):
        out = self.h2h(gate(self.h(h) + self.v2h(v_pre) + self.bias(y, 1)))
        return out if self.first else h + out  # residual connection except where h has C channels


class GatedPixelCNN(nn.Module):
    def __init__(self, C, p, n_layers, k, n_out, n_classes):
        super().__init__()
        self.layers = nn.ModuleList(GatedLayer(C, p, k, i == 0, n_classes) for i in range(n_layers))
        self.head = nn.Sequential(nn.ReLU(), pointwise(p, p, C), nn.ReLU(), pointwise(p, n_out * C, C))
        self.reach = (k // 2 + 1) + (k // 2) * (n_layers - 1)  # rows above that can influence a pixel

    def vertical(self, x, y=None):  # [B, C, H, W] -> v_pre of every layer, [B, 2p, H, W] each
        v, pres = x, []
        for layer in self.layers:
            v_pre, v = layer.vertical(v, y)
            pres.append(v_pre)
        return pres

    def horizontal(self, x, pres, y=None):  # x and pres on the same rows -> [B, n_out * C, rows, W]
        h = x
        for layer, v_pre in zip(self.layers, pres):
            h = layer.horizontal(h, v_pre, y)
        return self.head(h)

    def forward(self, x, y=None):
        return self.horizontal(x, self.vertical(x, y), y)


class PixelCNN(nn.Module):
    """The original: 7x7 mask A, then x + conv1x1(relu(kxk mask B (relu x))) blocks; blind spot up-right."""
    def __init__(self, C, p, n_layers, k, n_out, n_classes):
        super().__init__()
        masked = lambda ci, co, kk, kind: MaskedConv2d(ci, co, kk, (kk // 2,) * 4, (kk // 2, kk // 2), kind, C)
        self.inp = masked(C, p, 7, "A")
        self.convs = nn.ModuleList(masked(p, p, k, "B") for _ in range(n_layers))
        self.outs = nn.ModuleList(pointwise(p, p, C) for _ in range(n_layers))
        self.cond = nn.ModuleList(nn.Embedding(n_classes, p) for _ in range(n_layers)) if n_classes else None
        self.head = nn.Sequential(nn.ReLU(), pointwise(p, p, C), nn.ReLU(), pointwise(p, n_out * C, C))
        self.reach = 3 + (k // 2) * n_layers

    def forward(self, x, y=None):
        h = self.inp(x)
        for i, (conv, out) in enumerate(zip(self.convs, self.outs)):
            a = conv(F.relu(h)) + (0 if self.cond is None else self.cond[i](y)[:, :, None, None])
            h = h + out(F.relu(a))
        return self.head(h)


def logistic_mix_logp(params, v):
    """log P(v) of integers v in 0..255 under a mixture of K logistics discretized into 256 bins on [-1, 1]
    (Salimans et al. 2017, eq. 2; the edge bins take the tails, so the 256 values sum to 1).
    params: [B, 3K, *S] (logits of pi, mu, log s); v: [B, *S] -> [B, *S]."""
    logit_pi, mu, log_s = params.unflatten(1, (3, -1)).unbind(1)  # [B, K, *S] each
    x = (v.to(mu.dtype) / 127.5 - 1).unsqueeze(1)  # bin centres -1, -1 + 2/255, ..., 1
    log_s = log_s.clamp(min=-7.0)
    inv_s = torch.exp(-log_s)
    plus, minus = inv_s * (x - mu + 1 / 255), inv_s * (x - mu - 1 / 255)
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * (x - mu)  # when the bin mass underflows: density at the centre times the width 2/255
    log_pdf_mid = mid - log_s - 2 * F.softplus(mid) - math.log(127.5)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    logp = torch.where(x < -0.999, F.logsigmoid(plus), torch.where(x > 0.999, F.logsigmoid(-minus), log_mid))
    return torch.logsumexp(logp + F.log_softmax(logit_pi, dim=1), dim=1)


def pick(logp, u):
    """Inverse-CDF draw from a categorical: logp [B, L], u [B] uniform in [0, 1) -> value [B] in 0..L-1."""
    cdf = logp.softmax(-1).cumsum(-1)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=logp.shape[-1] - 1)


class Model(nn.Module):
    def __init__(self, cfg, shape, n_classes=10):
        super().__init__()
        self.cfg, self.shape, self.L = cfg, tuple(shape), cfg.levels  # shape: (C, H, W)
        self.n_out = 3 * cfg.n_mix if cfg.output == "logistic_mix" else cfg.levels  # parameters per channel
        net = GatedPixelCNN if cfg.arch == "gated" else PixelCNN
        self.net = net(shape[0], cfg.hidden, cfg.n_layers, cfg.kernel, self.n_out, n_classes if cfg.conditional else 0)

    def quantize(self, x_uint8):  # 0..255 -> 0..L-1
        return x_uint8.long() * self.L // 256

    def to_uint8(self, q):  # 0..L-1 -> the centre of its bucket's range, shown as 0..255
        return (q.float() * 255 / (self.L - 1)).round().to(torch.uint8)

    def net_input(self, q):  # 0..L-1 -> [-1, 1] in the parameters' dtype
        return q.to(self.net.head[-1].weight.dtype) * (2 / (self.L - 1)) - 1

    def logp(self, out, q):
        """out [B, n_out * C, *S] (parameter t of channel c at index t*C + c), q [B, C, *S] -> log p [B, C, *S]."""
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # float32 under bf16 autocast
        out = out.unflatten(1, (self.n_out, self.shape[0]))  # [B, n_out, C, *S]
        if self.cfg.output == "logistic_mix":
            return logistic_mix_logp(out, q)
        return F.log_softmax(out, dim=1).gather(1, q.unsqueeze(1)).squeeze(1)

    def logp_all(self, out):  # out [B, n_out] of one channel of one pixel -> log p of every value, [B, L]
        if self.cfg.output == "logistic_mix":
            v = torch.arange(self.L, device=out.device).expand(len(out), -1)
            return logistic_mix_logp(out[:, :, None].expand(-1, -1, self.L), v)
        return F.log_softmax(out.to(torch.promote_types(out.dtype, torch.float32)), dim=-1)

    def forward(self, x_uint8, y=None):
        """Exact -log2 p(x) / D averaged over the batch (bits per dimension of the quantized data)."""
        q = self.quantize(x_uint8)
        nll = -self.logp(self.net(self.net_input(q), y), q).flatten(1).sum(1)  # nats per image
        bpd = nll / (q[0].numel() * math.log(2))
        return bpd.mean(), {"bpd": bpd.mean().item()}

    @torch.inference_mode()
    def sample(self, n, y=None, generator=None, u=None, fast=True):
        """q [n, C, H, W] in 0..L-1, value by value; the uniform noise u [n, C, H, W] (drawn up front) is used by
        inverse-CDF draws, so fast and naive loops give the same images for the same u. Naive: the whole network
        on the whole image per value. Fast: gated = vertical stack once per row, horizontal stack on the
        current row; pixelcnn = the network on the rows that reach the current one."""
        C, H, W = self.shape
        dev = next(self.parameters()).device
        u = torch.rand(n, C, H, W, device=dev, generator=generator) if u is None else u
        y = torch.arange(n, device=dev) % 10 if y is None and self.cfg.conditional else y
        q = torch.zeros(n, C, H, W, dtype=torch.long, device=dev)
        x = self.net_input(q)  # unsampled values are never seen (masks)
        gated = isinstance(self.net, GatedPixelCNN)
        for i in range(H):
            lo = max(0, i - self.net.reach)  # rows above lo cannot reach row i
            if fast and gated:  # vertical features of row i depend on rows < i only: once per row
                pres = [p[:, :, -1:] for p in self.net.vertical(x[:, :, lo:i + 1], y)]
            for j in range(W):
                for c in range(C):
                    if not fast:
                        out = self.net(x, y)[:, :, i, j]
                    elif gated:
                        out = self.net.horizontal(x[:, :, i:i + 1], pres, y)[:, :, 0, j]
                    else:
                        out = self.net(x[:, :, lo:i + 1], y)[:, :, -1, j]
                    q[:, c, i, j] = pick(self.logp_all(out.unflatten(1, (self.n_out, C))[:, :, c]), u[:, c, i, j])
                    x[:, c, i, j] = self.net_input(q[:, c, i, j])
        return q


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


def random_flip(x, generator):
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator) < 0.5
    return torch.where(flip, x.flip(3), x)


# ----------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def evaluate(model, x_test, y_test, cfg):
    """Exact test bits/dim on the complete test split: -sum log2 p(x) / (N D)."""
    model.eval()
    b = 2 * cfg.batch_size  # small batches: [b, levels, C, H, W] logits stay in cache (500 was 2x slower on CPU)
    ys = y_test.split(b) if cfg.conditional else [None] * math.ceil(len(x_test) / b)
    total = sum(model(xb, yb)[0].item() * len(xb) for xb, yb in zip(x_test.split(b), ys))
    model.train()
    return total / len(x_test)


@torch.inference_mode()
def generate(model, n, cfg, device, seed, batch=500):
    """n uint8 samples [n, C, H, W] and samples/s; conditional: classes 0..9 in equal runs (grid rows)."""
    model.eval()
    g = torch.Generator(device).manual_seed(seed)  # the same noise every time, training RNG untouched
    y = torch.arange(n, device=device) * 10 // n if cfg.conditional else None
    t0 = time.perf_counter()
    imgs = torch.cat([model.to_uint8(model.sample(min(batch, n - s), None if y is None else y[s:s + batch], g,
                                                  fast=cfg.fast_sampler)) for s in range(0, n, batch)])
    model.train()
    return imgs.cpu(), n / (time.perf_counter() - t0)


def save_samples(model, cfg, device):
    n = cfg.n_samples - cfg.n_samples % 10 if cfg.conditional and cfg.n_samples >= 10 else cfg.n_samples
    imgs, rate = generate(model, n, cfg, device, cfg.seed)
    nrow = n // 10 if cfg.conditional and n >= 10 else max(1, int(math.sqrt(n)))
    torchvision.utils.save_image(imgs.float() / 255, os.path.join(cfg.out_dir, "samples.png"), nrow=nrow, padding=1)
    return imgs, rate


# ----------------------------------------------------------------------------- training

def save_checkpoint(path, state):
    torch.save(state, path + ".tmp")  # write then rename: a crash never leaves a half-written ckpt.pt
    os.replace(path + ".tmp", path)


def load_checkpoint(path, cfg):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path} (train first, or check --out_dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = {k: ckpt["config"][k] for k in ARCH_FIELDS}
        ckpt["model"], ckpt["step"]
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


def plot_losses(history, evals, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*history), lw=0.8, label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="test (exact)")
    ax.set(xlabel="step", ylabel="bits / dim")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def train(cfg: Config) -> dict:
    check_config(cfg)
    cfg.out_dir = cfg.out_dir or f"out/pixelcnn-{cfg.dataset}"
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
    torch.manual_seed(cfg.seed + rank)
    x_train, y_train = load_split(cfg.dataset, cfg.data_dir, train=True)
    x_test, y_test = load_split(cfg.dataset, cfg.data_dir, train=False)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    model = Model(cfg, x_train.shape[1:]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
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
    fwd = nn.parallel.DistributedDataParallel(model) if ddp else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    y_of = lambda y: y if cfg.conditional else None

    def checkpoint(results=None):
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        if not finite or (history and not math.isfinite(history[-1][1])):  # never save a diverged model
            fail(f"non-finite loss or weights at step {step}; the last good checkpoint {ckpt_path} is kept")
        if master:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                        "config": asdict(cfg), "results": results, "history": history,
                                        "evals": evals, "rng": g.get_state()})

    kind = "exact" if cfg.levels == 256 else f"exact, quantized to {cfg.levels} levels"
    t_train, n_seen, t0, start_step = 0.0, 0, time.perf_counter(), step
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        idx = torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)
        x = random_flip(x_train[idx], g) if cfg.flip and cfg.dataset in FLIP_OK else x_train[idx]
        for group in opt.param_groups:  # linear warmup, then cosine decay to 10% of lr
            frac = min(1.0, step / max(1, cfg.max_steps))
            warmup = min(200, max(1, cfg.max_steps // 10))
            group["lr"] = cfg.lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * frac))
        with autocast:
            loss, stats = fwd(x, y_of(y_train[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        t_train += time.perf_counter() - t_step
        n_seen += cfg.batch_size
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            history.append((step, loss.item()))
            if not math.isfinite(history[-1][1]):
                fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {loss.item():.4f} bits/dim | {n_seen / t_train:.0f} img/s"
                f" | eta {eta / 60:.1f}m")
        if master and step % cfg.sample_every == 0 and step < cfg.max_steps:
            save_samples(model, cfg, device)
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            if master:
                evals.append((step, evaluate(model, x_test, y_test, cfg)))
                log(f"eval step {step} | test {evals[-1][1]:.4f} bits/dim ({kind})")
            checkpoint()
    if not master:
        dist.destroy_process_group()
        return {}
    if not cfg.eval_only:
        checkpoint()
    res = {"test_bpd": evaluate(model, x_test, y_test, cfg), "test_bpd_kind": kind}
    log(f"eval step {step} | test {res['test_bpd']:.4f} bits/dim ({kind})")
    imgs, res["sample_images_per_s"] = save_samples(model, cfg, device)
    if cfg.fid_samples > 0:  # metrics imported lazily: a copied pixelcnn.py runs alone with --fid_samples 0
        imgs, res["sample_images_per_s"] = generate(model, cfg.fid_samples, cfg, device, cfg.seed + 2)
        import metrics
        res.update(metrics.evaluate(imgs, cfg.dataset, cfg.data_dir, device))
    np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=imgs.numpy())
    res.update(steps=step, wall_s=time.perf_counter() - t0, device=str(device), config=asdict(cfg),
               train_images_per_s=n_seen * (dist.get_world_size() if ddp else 1) / t_train if t_train else None)
    if not cfg.eval_only:
        checkpoint(res)
    if history:
        plot_losses(history, evals + [(step, res["test_bpd"])], os.path.join(cfg.out_dir, "loss.png"))
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={res[k]:.4g}" for k in ("test_bpd", "fid") if isinstance(res.get(k), float))
    log(f"FINAL pixelcnn {cfg.dataset} {shown} steps={step} time={res['wall_s']:.0f}s device={device}")
    log_file.close()
    if ddp:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    train(parse_args())
