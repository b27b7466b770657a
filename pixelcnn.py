"""PixelCNN (van den Oord et al. 2016a) and Gated PixelCNN (2016b): p(x) = prod_i p(x_i | x_<i) in raster order,
R -> G -> B inside a pixel, so test_bpd = -log2 p(x) / D is exact. --arch pixelcnn: 7x7 type-A masked conv, then
residual blocks of kxk type-B convs (has the blind spot); --arch gated (default): vertical + horizontal stacks,
tanh * sigmoid gates, no blind spot. Per channel: a softmax over --levels values (x -> floor(x * levels / 256); bpd
exact for the quantized data) or --output logistic_mix (the discretized logistic mixture of PixelCNN++, Salimans et
al. 2017). --conditional: a class bias in every layer. Deviations: the mixture is per channel, ordered by the masks
(no PixelCNN++ linear coupling); small defaults. Fast sampler: the naive loop's images for the same noise, 40x faster
(tests/bench_pixelcnn.py, default network, one 28x28 image, 1 thread of a shared 2-core CPU: 11.4 s vs 460 s).
    python pixelcnn.py --dataset mnist --data_dir ../shared/data [--levels 4]   # default run (GPU); 4 levels: faster
Shared 2-core CPU, OMP_NUM_THREADS=1, --hidden 32 --n_layers 6 --kernel 3 --batch_size 32 --lr 3e-3: 250 steps
-> test 1.222 bits/dim (exact), 955 s; --levels 4, 200 steps -> 0.252 bits/dim (exact, 4 levels), 469 s.
Writes to --out_dir: ckpt.pt, samples.png, samples.npz, loss.png, log.txt, results.json.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}
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


def boolean(s):  # argparse turns the ValueError into a one-line "invalid boolean value" error
    if s.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(s)
    return s.lower() in ("true", "1", "yes")


def parse_args(argv=None) -> Config:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    for f in fields(Config):
        kind = boolean if f.type is bool else f.type
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
    if min(cfg.hidden, cfg.n_layers, cfg.n_mix, cfg.batch_size, cfg.eval_every, cfg.sample_every, cfg.log_every,
           cfg.n_samples) < 1 or cfg.grad_clip < 0:
        fail("--hidden, --n_layers, --n_mix, --batch_size, --*_every, --n_samples must be >= 1, --grad_clip >= 0")
    if cfg.hidden % (C := 3 if cfg.dataset == "cifar10" else 1):
        fail(f"--hidden must be a multiple of {C} on {cfg.dataset} (R/G/B groups); got {cfg.hidden}")
    if cfg.dtype == "bfloat16" and pick_device(cfg.device).type != "cuda":
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
            (r, c), go, gi = centre, torch.arange(co)[:, None] % C, torch.arange(ci)[None, :] % C
            mask[:, :, r + 1:] = 0  # rows below the centre
            mask[:, :, r, c + 1:] = 0  # right of the centre
            mask[:, :, r, c] = (go > gi) if kind == "A" else (go >= gi)
        self.register_buffer("mask", mask)
        self.pad = pad

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


def gate(x):  # tanh(W_f * x) * sigmoid(W_g * x), eq. (2) of 2016b; halves keep the R/G/B groups (p % C == 0)
    return torch.tanh(x.chunk(2, 1)[0]) * torch.sigmoid(x.chunk(2, 1)[1])


def pointwise(ci, co, C):  # 1x1 conv that keeps R -> G -> B inside a pixel (type B)
    return MaskedConv2d(ci, co, 1, (0, 0, 0, 0), (0, 0), "B", C)


class GatedPixelCNN(nn.Module):
    """Layer i of the vertical stack only ever sees rows above the current one: layer 0 takes the kh = k//2+1
    rows strictly above, later layers the kh rows ending at the current row of features that already see only
    rows above. The horizontal stack sees the current row up to the pixel (mask A in layer 0, B later) plus,
    through v2h, everything the vertical stack saw. Both are gated, with the class bias V^T y of eq. (4)."""
    def __init__(self, C, p, n_layers, k, n_out, n_classes):
        super().__init__()
        kh, self.reach = k // 2 + 1, (k // 2 + 1) + (k // 2) * (n_layers - 1)  # rows above that can reach a pixel
        self.v, self.h, self.v2h, self.h2h = (nn.ModuleList() for _ in range(4))
        for i in range(n_layers):
            ci, pad = (C, (k // 2, k // 2, kh, -1)) if i == 0 else (p, (k // 2, k // 2, kh - 1, 0))  # l, r, top, bottom
            self.v.append(MaskedConv2d(ci, 2 * p, (kh, k), pad))
            self.h.append(MaskedConv2d(ci, 2 * p, (1, kh), (kh - 1, 0, 0, 0), (0, kh - 1), "B" if i else "A", C))
            self.v2h.append(nn.Conv2d(2 * p, 2 * p, 1))  # rows above may feed every channel of the current row
            self.h2h.append(pointwise(p, p, C))
        self.cond = nn.ModuleList(nn.Embedding(n_classes, 4 * p) for _ in range(n_layers)) if n_classes else None
        self.head = nn.Sequential(nn.ReLU(), pointwise(p, p, C), nn.ReLU(), pointwise(p, n_out * C, C))

    def bias(self, i, y, part):  # part 0: vertical stack, 1: horizontal stack
        return 0 if self.cond is None else self.cond[i](y).chunk(2, dim=1)[part][:, :, None, None]

    def vertical(self, x, y=None):  # [B, C, H, W] -> pre-activations of every layer (for v2h), [B, 2p, H, W]
        pres, v = [], x
        for i, conv in enumerate(self.v):
            pres.append(conv(v) + self.bias(i, y, 0))
            v = gate(pres[-1])
        return pres

    def horizontal(self, x, pres, y=None):  # x and pres on the same rows -> [B, n_out * C, rows, W]
        h = x
        for i, v_pre in enumerate(pres):
            out = self.h2h[i](gate(self.h[i](h) + self.v2h[i](v_pre) + self.bias(i, y, 1)))
            h = out if i == 0 else h + out  # residual connection except where h has C channels
        return self.head(h)

    def forward(self, x, y=None):
        return self.horizontal(x, self.vertical(x, y), y)


class PixelCNN(nn.Module):
    """The original: 7x7 mask A, then x + conv1x1(relu(kxk mask B (relu x))) blocks; blind spot up-right."""
    def __init__(self, C, p, n_layers, k, n_out, n_classes):
        super().__init__()
        masked = lambda ci, co, kk, kind: MaskedConv2d(ci, co, kk, (kk // 2,) * 4, (kk // 2, kk // 2), kind, C)
        self.inp, self.reach = masked(C, p, 7, "A"), 3 + (k // 2) * n_layers
        self.convs = nn.ModuleList(masked(p, p, k, "B") for _ in range(n_layers))
        self.outs = nn.ModuleList(pointwise(p, p, C) for _ in range(n_layers))
        self.cond = nn.ModuleList(nn.Embedding(n_classes, p) for _ in range(n_layers)) if n_classes else None
        self.head = nn.Sequential(nn.ReLU(), pointwise(p, p, C), nn.ReLU(), pointwise(p, n_out * C, C))

    def forward(self, x, y=None):
        h = self.inp(x)
        for i, (conv, out) in enumerate(zip(self.convs, self.outs)):
            a = conv(F.relu(h)) + (0 if self.cond is None else self.cond[i](y)[:, :, None, None])
            h = h + out(F.relu(a))
        return self.head(h)


def logistic_mix_logp(params, v):
    """log P(v) of integers v in 0..255 under a mixture of K logistics discretized into 256 bins on [-1, 1]
    (Salimans et al. 2017, eq. 2; the edge bins take the tails, so the 256 values sum to 1).
    params: [B, 3K, *S] (logits of pi, mu, log s); v: [B, *S] (or broadcastable to it) -> [B, *S]."""
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

    def to_uint8(self, q):  # 0..L-1 -> evenly spaced over 0..255 (0 and 255 at the ends), for display and FID
        return (q.float() * 255 / (self.L - 1)).round().to(torch.uint8)

    def net_input(self, q):  # 0..L-1 -> [-1, 1] in the parameters' dtype
        return q.to(self.net.head[-1].weight.dtype) * (2 / (self.L - 1)) - 1

    def logp(self, out, q=None):
        """log p of q [B, C, *S] -> [B, C, *S], or (q None) of every value 0..L-1 -> [B, L, C, *S].
        out: [B, n_out * C, *S], parameter t of channel c at index t * C + c."""
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # float32 under bf16 autocast
        out = out.unflatten(1, (self.n_out, self.shape[0]))  # [B, n_out, C, *S]
        if self.cfg.output == "softmax":
            logp = F.log_softmax(out, dim=1)
            return logp if q is None else logp.gather(1, q.unsqueeze(1)).squeeze(1)
        if q is None:  # every value along a new dim 2 of the parameters, [B, 3K, L, C, *S] by broadcasting
            q, out = torch.arange(self.L, device=out.device).view(1, -1, *[1] * (out.dim() - 2)), out.unsqueeze(2)
        return logistic_mix_logp(out, q)

    def forward(self, x_uint8, y=None):
        """Exact -log2 p(x) / D averaged over the batch (bits per dimension of the quantized data)."""
        q = self.quantize(x_uint8)
        nll = -self.logp(self.net(self.net_input(q), y), q).flatten(1).sum(1)  # nats per image
        bpd = (nll / (q[0].numel() * math.log(2))).mean()
        return bpd, {"bpd": bpd.item()}

    @torch.inference_mode()
    def sample(self, n, y=None, generator=None, u=None, fast=True):
        """q [n, C, H, W] in 0..L-1, value by value; the uniform noise u [n, C, H, W] (drawn up front) is used by
        inverse-CDF draws, so fast and naive loops give the same images for the same u. Naive: the whole network
        on the whole image per value. Fast: gated = vertical stack once per row, horizontal stack on the
        current row; pixelcnn = the network on the rows that reach the current one."""
        (C, H, W), dev = self.shape, next(self.parameters()).device
        u = torch.rand(n, C, H, W, device=dev, generator=generator) if u is None else u
        y = torch.arange(n, device=dev) % 10 if y is None and self.cfg.conditional else y
        q = torch.zeros(n, C, H, W, dtype=torch.long, device=dev)
        x, gated = self.net_input(q), isinstance(self.net, GatedPixelCNN)  # unsampled values: never seen (masks)
        for i in range(H):
            lo = max(0, i - self.net.reach)  # rows above lo cannot reach row i
            if fast and gated:  # vertical features of row i depend on rows < i only: once per row
                pres = [p[:, :, -1:] for p in self.net.vertical(x[:, :, lo:i + 1], y)]
            for j in range(W):
                for c in range(C):  # out: [n, n_out * C] at pixel (i, j)
                    if not fast:
                        out = self.net(x, y)[:, :, i, j]
                    elif gated:
                        out = self.net.horizontal(x[:, :, i:i + 1], pres, y)[:, :, 0, j]
                    else:
                        out = self.net(x[:, :, lo:i + 1], y)[:, :, -1, j]
                    q[:, c, i, j] = pick(self.logp(out)[:, :, c], u[:, c, i, j])
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


# ----------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def evaluate(model, x_test, y_test, cfg):
    """Exact test bits/dim on the complete test split: -sum log2 p(x) / (N D). (No dropout or batch norm: no
    model.eval() needed.) Small batches: [b, levels, C, H, W] logits stay in cache (500 was 2x slower on CPU)."""
    b = 2 * cfg.batch_size
    return sum(model(xb, yb)[0].item() * len(xb) for xb, yb in zip(x_test.split(b), y_test.split(b))) / len(x_test)


def generate(model, n, cfg, device, seed, grid=False):
    """n uint8 samples [n, C, H, W], 500 at a time, and samples/s; classes 0..9 in equal runs (if conditional).
    grid: also samples.png, one row per class when conditional (n then rounded down to a multiple of 10)."""
    rows = grid and cfg.conditional and n >= 10
    n, g = n - n % 10 if rows else n, torch.Generator(device).manual_seed(seed)  # same noise, training RNG untouched
    y, t0 = torch.arange(n, device=device) * 10 // n, time.perf_counter()
    imgs = torch.cat([model.to_uint8(model.sample(min(500, n - s), y[s:s + 500], g, fast=cfg.fast_sampler))
                      for s in range(0, n, 500)]).cpu()
    rate = n / (time.perf_counter() - t0)
    if grid:
        torchvision.utils.save_image(imgs.float() / 255, os.path.join(cfg.out_dir, "samples.png"),
                                     nrow=n // 10 if rows else max(1, int(math.sqrt(n))), padding=1)
    return imgs, rate


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


def plot_losses(history, evals, path):
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no GUI backend, no global state
    ax = Figure(figsize=(6, 4)).subplots()
    ax.plot(*zip(*history), lw=0.8, label="train")
    ax.plot(*zip(*evals), "o-", label="test (exact)")
    ax.set(xlabel="step", ylabel="bits / dim"), ax.legend()
    ax.figure.savefig(path, dpi=100, bbox_inches="tight")


def train(cfg: Config) -> dict:
    check_config(cfg)
    cfg.out_dir = cfg.out_dir or f"out/pixelcnn-{cfg.dataset}"
    device, rank, world = setup_distributed(pick_device(cfg.device))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg) if cfg.resume or cfg.eval_only else None
    if cfg.eval_only:  # rebuild the model the checkpoint describes, whatever the command line says
        cfg = replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = make_logger(os.path.join(cfg.out_dir, "log.txt"), master=rank == 0)
    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | processes {world}")
    torch.manual_seed(cfg.seed + rank)
    (x_train, y_train), (x_test, y_test) = [[t.to(device) for t in load_split(cfg.dataset, cfg.data_dir, tr)]
                                            for tr in (True, False)]  # the whole splits on the device, once
    model = Model(cfg, x_train.shape[1:]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)  # batch indices and flips
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
    fwd = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    kind = "exact" if cfg.levels == 256 else f"exact, quantized to {cfg.levels} levels"
    kind += ", conditional on the true class" if cfg.conditional else ""
    warmup = min(200, max(1, cfg.max_steps // 10))

    def checkpoint(results=None):  # never overwrite the last good checkpoint with a diverged model
        if not (math.isfinite(loss.item()) and all(torch.isfinite(p).all() for p in model.parameters())):
            fail(f"non-finite loss or weights at step {step}; the last good checkpoint {ckpt_path} is kept")
        if rank == 0:  # write then rename: a crash never leaves a half-written ckpt.pt
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg),
                        "results": results, "history": history, "evals": evals, "rng": g.get_state()}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)

    t_train, t0, start_step, loss = 0.0, time.perf_counter(), step, torch.zeros(())
    while step < cfg.max_steps and not cfg.eval_only:
        t_step, idx = time.perf_counter(), torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)
        x = x_train[idx]
        if cfg.flip and cfg.dataset in FLIP_OK:  # on the device, half of the batch mirrored left-right
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device, generator=g) < 0.5, x.flip(3), x)
        decay = 0.55 + 0.45 * math.cos(math.pi * step / cfg.max_steps)  # cosine from 1 to 0.1 at max_steps
        opt.param_groups[0]["lr"] = cfg.lr * min(1, (step + 1) / warmup) * decay  # after a linear warmup
        with autocast:
            loss, stats = fwd(x, y_train[idx])  # labels are ignored unless --conditional
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # 0 = off
        opt.step()
        step, t_train = step + 1, t_train + time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            history.append((step, loss.item()))
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {loss.item():.4f} bits/dim | "
                f"{(step - start_step) * cfg.batch_size / t_train:.0f} img/s | eta {eta / 60:.1f}m")
            if not math.isfinite(loss.item()):
                checkpoint()  # fails with its message, the last good checkpoint stays
        if rank == 0 and step % cfg.sample_every == 0 and step < cfg.max_steps:
            generate(model, cfg.n_samples, cfg, device, cfg.seed, grid=True)
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            if rank == 0:
                evals.append((step, evaluate(model, x_test, y_test, cfg)))
                log(f"eval step {step} | test {evals[-1][1]:.4f} bits/dim ({kind})")
            checkpoint()
    if not cfg.eval_only:
        checkpoint()  # before the (long) final evaluation and sampling, so no training is lost
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    res = {"test_bpd": evaluate(model, x_test, y_test, cfg), "test_bpd_kind": kind}
    log(f"eval step {step} | test {res['test_bpd']:.4f} bits/dim ({kind})")
    imgs, res["sample_images_per_s"] = generate(model, cfg.n_samples, cfg, device, cfg.seed, grid=True)
    if cfg.fid_samples > 0:  # metrics imported lazily: a copied pixelcnn.py runs alone with --fid_samples 0
        imgs, res["sample_images_per_s"] = generate(model, cfg.fid_samples, cfg, device, cfg.seed + 2)
        import metrics
        res.update(metrics.evaluate(imgs, cfg.dataset, cfg.data_dir, device))
    np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=imgs.numpy())
    res.update(steps=step, wall_s=time.perf_counter() - t0, device=str(device), config=asdict(cfg),
               train_images_per_s=(step - start_step) * cfg.batch_size * world / t_train if t_train else None)
    if not cfg.eval_only:
        evals.append((step, res["test_bpd"]))
        checkpoint(res)
        plot_losses(history, evals, os.path.join(cfg.out_dir, "loss.png"))
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={res[k]:.4g}" for k in ("test_bpd", "fid") if isinstance(res.get(k), float))
    log(f"FINAL pixelcnn {cfg.dataset} {shown} steps={step} time={res['wall_s']:.0f}s device={device}")
    return res


if __name__ == "__main__":
    train(parse_args())
