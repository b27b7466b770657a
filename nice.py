"""NICE: additive-coupling normalizing flow with an exact log-likelihood, on images and on 2-D toy densities.

Paper: Dinh, Krueger & Bengio 2014, "NICE: Non-linear Independent Components Estimation" (arXiv:1410.8516).
z = exp(s) * g_4(g_3(g_2(g_1(x)))), each g an additive coupling y2 = x2 + m(x1) on interleaved odd/even halves
(log-det 0), s a diagonal scaling (log-det sum(s)); log p(x) = log p_prior(z) + sum(s), logistic prior (paper)
or --prior gaussian. MNIST/fashion: 4 couplings, m = 5 hidden ReLU layers x 1000 units (paper); cifar10: 4 x 2000.
Deviations: Adam(lr 1e-3, betas (0.9, 0.99), eps 1e-4) reads the paper's beta2 = 0.01 in the old 1 - beta2
convention; cifar10 gets no ZCA whitening (paper: ZCA and [-1, 1] scaling), so its bpd is the plain
pixel-space one. Units: y = (x + u) / 256, u ~ U[0,1)^D;
test_bpd = (-log p(y) + D log 256) / (D log 2) (exact, one noise draw); test_loglik_nats = log p(y) per image
on [0,1]^D, the paper's quantity (MNIST 1980.50 nats <=> 4.36 bpd via the same formula, D = 784).
Toy sets and data-dependent init of s (from one batch) are ours. On a 2-core shared CPU, OMP_NUM_THREADS=1:
  python nice.py --dataset 8gaussians    # 3000 steps, 89 s wall (32 s CPU): test_nll_nats=3.185 (moons: 2.539)
  python nice.py --dataset mnist --data_dir ../shared/data --hidden 500 --max_minutes 7 --fid_samples 0
      # 1051 steps, 422 s: test_bpd=5.359 (test_loglik_nats=1435.0); the paper: 4.36 bpd / 1980.50 nats, long runs
Writes to out_dir: ckpt.pt, log.txt, results.json, loss.png; images: samples.png, samples.npz; toy: density.png.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMAGE_SETS = ("fashion", "mnist", "cifar10")
TOY_SETS = ("moons", "circles", "8gaussians", "checkerboard", "spirals")
ARCH = ("dataset", "n_couplings", "hidden", "n_hidden", "prior")  # fields that change the model


@dataclass
class Config:
    dataset: str = "fashion"  # image set or 2-D toy set
    data_dir: str = "./data"  # torchvision root (<data_dir>/MNIST/raw/...)
    out_dir: str = ""  # empty: out/nice-<dataset>
    n_couplings: int = 0  # additive coupling layers; 0: 4 images (paper), 8 toy
    hidden: int = 0  # units per hidden layer of m; 0: 1000 mnist/fashion, 2000 cifar10, 64 toy
    n_hidden: int = 0  # hidden ReLU layers of m; 0: 5 mnist/fashion, 4 cifar10, 3 toy
    prior: str = "logistic"  # factorized prior p_H (paper: logistic)
    max_steps: int = 0  # optimizer steps; 0: 30000 images, 3000 toy
    batch_size: int = 0  # examples per step; 0: 200 images, 512 toy
    lr: float = 0.0  # Adam learning rate; 0: 1e-3 images (paper), 3e-3 toy
    lr_decay: str = "auto"  # cosine (to 0 at max_steps) or none; auto: none images (paper), cosine toy
    beta1: float = 0.9  # Adam momentum (paper)
    beta2: float = 0.99  # Adam beta2 (paper's 0.01 is 1 - beta2)
    eps: float = 1e-4  # Adam epsilon (paper)
    temperature: float = 1.0  # prior scale when sampling
    seed: int = 0  # seeds init, batches, noise
    eval_every: int = 0  # steps between test evaluations; 0: 2000 images, 1000 toy
    sample_every: int = 0  # steps between samples.png / density.png; 0: same as eval_every
    log_every: int = 100  # steps between progress lines
    max_minutes: float = 0.0  # also stop training after this many minutes of wall time (0: no limit)
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "float32"  # float32, or bfloat16 autocast (CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample
    n_samples: int = 64  # images in samples.png
    fid_samples: int = -1  # samples for FID/precision/recall; -1: 10000 images, 0 toy; 0 skips


CHOICES = {"dataset": IMAGE_SETS + TOY_SETS, "lr_decay": ("auto", "cosine", "none"), "prior": ("logistic", "gaussian"),
           "dtype": ("float32", "bfloat16")}


def fail(msg):
    return SystemExit(f"nice.py: error: {msg}")


def resolve(cfg):
    """Fill the 'per dataset' sentinels (0, -1) with the image (paper) or the small toy defaults."""
    toy, cifar = cfg.dataset in TOY_SETS, cfg.dataset == "cifar10"
    auto = dict(n_couplings=8 if toy else 4, lr=3e-3 if toy else 1e-3, hidden=64 if toy else 2000 if cifar else 1000,
                n_hidden=3 if toy else 4 if cifar else 5, max_steps=3000 if toy else 30000,
                batch_size=512 if toy else 200, eval_every=1000 if toy else 2000)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in auto.items() if getattr(cfg, k) == 0})
    return dataclasses.replace(cfg, sample_every=cfg.sample_every or cfg.eval_every,
                               lr_decay=("cosine" if toy else "none") if cfg.lr_decay == "auto" else cfg.lr_decay,
                               fid_samples=(0 if toy else 10000) if cfg.fid_samples < 0 else cfg.fid_samples)


def check_config(cfg):
    if cfg.dataset in TOY_SETS and cfg.fid_samples > 0:
        raise fail(f"--fid_samples applies to image datasets only; {cfg.dataset} is a 2-D toy set (use 0)")
    for k in ("n_couplings", "hidden", "n_hidden", "max_steps", "batch_size", "eval_every", "sample_every",
              "log_every", "n_samples"):
        if getattr(cfg, k) < 1:
            raise fail(f"--{k} must be a positive integer, got {getattr(cfg, k)}")
    for k in ("lr", "eps", "temperature"):  # (after resolve, lr 0 has become the default)
        if not getattr(cfg, k) > 0:
            raise fail(f"--{k} must be > 0, got {getattr(cfg, k)}")
    if cfg.max_minutes < 0:
        raise fail("--max_minutes must be >= 0")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise fail("--beta1 and --beta2 must lie in [0, 1)")
    if cfg.resume and cfg.eval_only:
        raise fail("give --resume or --eval_only, not both")


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(prog="nice.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        kw = dict(default=f.default, help=f"{helps.get(f.name, '')} (default: {f.default!r})")
        if f.type is bool:
            kw.update(type=str2bool, metavar="{true,false}")
        else:
            kw.update(type=f.type, choices=CHOICES.get(f.name))
        p.add_argument(f"--{f.name}", **kw)
    return Config(**vars(p.parse_args(argv)))


def str2bool(s):  # argparse turns the ValueError into "invalid str2bool value"
    if s.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(s)
    return s.lower() in ("true", "1", "yes")


# ----------------------------------------------------------------------------- model
class Coupling(nn.Module):
    """Additive coupling (paper eq. 6-7): y_I2 = x_I2 + m(x_I1), y_I1 = x_I1; log|det| = 0.
    I1/I2 are the even/odd entries of the flattened input, swapped when parity = 1."""

    def __init__(self, D, hidden, n_hidden, parity):
        super().__init__()
        self.parity = parity
        layers = [nn.Linear(D // 2, hidden), nn.ReLU()]
        for _ in range(n_hidden - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.m = nn.Sequential(*layers, nn.Linear(hidden, D // 2))

    def forward(self, x, reverse=False):
        h = x.reshape(len(x), -1, 2)  # [B, D/2, 2]: pairs (even, odd) of the flattened input
        x1, x2 = h[..., self.parity], h[..., 1 - self.parity]
        y2 = x2 - self.m(x1) if reverse else x2 + self.m(x1)  # the inverse is a subtraction (eq. 8)
        return torch.stack((x1, y2) if self.parity == 0 else (y2, x1), dim=-1).reshape(x.shape)


class NICE(nn.Module):
    def __init__(self, D, n_couplings=4, hidden=1000, n_hidden=5, prior="logistic"):
        super().__init__()
        if D % 2:
            raise fail(f"NICE's odd/even partition needs an even input dimension, got D={D}")
        self.D, self.prior = D, prior
        self.couplings = nn.ModuleList(Coupling(D, hidden, n_hidden, i % 2) for i in range(n_couplings))
        self.s = nn.Parameter(torch.zeros(D))  # diagonal scaling layer, z = exp(s) * h (section 3.3)

    @torch.no_grad()
    def init_scale(self, x):
        """Data-dependent init (ours, ActNorm-like): s_d = log(prior std / std of h_d over the batch x)."""
        h = self.forward_flow(x)[0] * (-self.s).exp()  # the couplings' output
        prior_std = math.pi / math.sqrt(3) if self.prior == "logistic" else 1.0
        self.s.copy_(torch.log(prior_std / h.std(0).clamp_min(1e-6)))

    def forward_flow(self, x):
        """x [B, ...] -> z [B, D], logdet [B] = log|det dz/dx| = sum(s)."""
        h = x.reshape(len(x), -1)
        for c in self.couplings:
            h = c(h)
        return h * self.s.exp(), self.s.sum().expand(len(x))

    def inverse(self, z):
        h = z * (-self.s).exp()
        for c in reversed(self.couplings):
            h = c(h, reverse=True)
        return h

    def prior_log_prob(self, z):  # [B, D] -> [B], factorized prior
        if self.prior == "logistic":  # log p(z) = -log(1 + e^z) - log(1 + e^-z)  (eq. after 3.4)
            return -(F.softplus(z) + F.softplus(-z)).sum(1)
        return -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(1)

    def log_prob(self, x):  # change of variables: log p(x) = log p_H(f(x)) + log|det df/dx|, nats [B]
        z, logdet = self.forward_flow(x)
        dt = torch.promote_types(z.dtype, torch.float32)  # bf16 autocast: the sum over D in float32
        return self.prior_log_prob(z.to(dt)) + logdet.to(dt)

    def forward(self, x):
        nll = -self.log_prob(x)  # nats per example
        return nll.mean() / self.D, {"nll_nats": nll.mean().item()}  # loss in nats per dimension

    def sample(self, n, generator=None, temperature=1.0):
        dev = self.s.device
        if self.prior == "logistic":  # inverse CDF of the standard logistic: log u - log(1 - u)
            u = torch.rand(n, self.D, generator=generator, device=dev).clamp(1e-6, 1 - 1e-6)
            z = u.log() - (-u).log1p()
        else:
            z = torch.randn(n, self.D, generator=generator, device=dev)
        return self.inverse(temperature * z)


# ----------------------------------------------------------------------------- data
def load_split(dataset, data_dir, train):
    """-> (x uint8 [N, C, H, W], y int64 [N]) from torchvision's files."""
    cls = {"fashion": torchvision.datasets.FashionMNIST, "mnist": torchvision.datasets.MNIST,
           "cifar10": torchvision.datasets.CIFAR10}[dataset]
    try:
        try:
            ds = cls(data_dir, train=train, download=False)
        except Exception:
            ds = cls(data_dir, train=train, download=True)
    except Exception as e:
        folder = {"fashion": "FashionMNIST/raw/train-images-idx3-ubyte", "mnist": "MNIST/raw/train-images-idx3-ubyte",
                  "cifar10": "cifar-10-batches-py/data_batch_1"}[dataset]
        raise fail(f"cannot load {dataset} from --data_dir {data_dir} (expected {data_dir}/{folder}, ...): "
                   f"{type(e).__name__}") from None
    x = torch.as_tensor(np.asarray(ds.data))
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]  # CIFAR is [N, H, W, C]
    return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


def toy_data(name, n, generator):
    """n float32 points [n, 2] of a 2-D toy density (the FFJORD set-ups), values within about [-4, 4]."""
    rand = lambda *s: torch.rand(*s, generator=generator)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=generator)  # noqa: E731
    if name == "moons":
        t, top = math.pi * rand(n), rand(n) < 0.5
        x = torch.where(top[:, None], torch.stack([t.cos(), t.sin()], 1), torch.stack([1 - t.cos(), 0.5 - t.sin()], 1))
        x = (x + 0.1 * randn(n, 2)) * 2 + torch.tensor([-1.0, -0.2])
    elif name == "circles":
        t, r = 2 * math.pi * rand(n), torch.where(rand(n) < 0.5, 1.0, 0.5)
        x = 3 * (r[:, None] * torch.stack([t.cos(), t.sin()], 1) + 0.08 * randn(n, 2))
    elif name == "8gaussians":
        a = 2 * math.pi * torch.randint(0, 8, (n,), generator=generator) / 8
        x = (4 * torch.stack([a.cos(), a.sin()], 1) + 0.5 * randn(n, 2)) / 1.414
    elif name == "checkerboard":
        x1 = 4 * rand(n) - 2
        x2 = rand(n) - 2 * torch.randint(0, 2, (n,), generator=generator) + x1.floor() % 2
        x = 2 * torch.stack([x1, x2], 1)
    else:  # spirals: two interleaved arms
        t = rand(n).sqrt() * 3 * math.pi
        arm = torch.stack([-t.cos() * t, t.sin() * t], 1) + 0.5 * rand(n, 2)
        x = torch.where((rand(n) < 0.5)[:, None], arm, -arm) / 3 + 0.1 * randn(n, 2)
    return x.float()


def nats_to_bpd(nll, D):  # -log p(y) in nats per image on [0,1]^D -> bits per 8-bit dimension
    return (nll + D * math.log(256)) / (D * math.log(2))


def dequantize(x, generator):  # uint8 [B, ...] -> y = (x + u) / 256 in [0, 1)
    return (x.float() + torch.rand(x.shape, generator=generator, device=x.device)) / 256


def to_uint8(y):  # inverse of the dequantization: the 256 bins of [0, 1)
    return (y.clamp(0, 1) * 256).floor().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate(model, x_test, cfg, device):
    """Exact test likelihood over the complete test split (fixed dequantization noise)."""
    model.eval()
    g = torch.Generator(device).manual_seed(cfg.seed + 1)
    total = 0.0
    for i in range(0, len(x_test), 1000):
        x = x_test[i:i + 1000]
        y = x if cfg.dataset in TOY_SETS else dequantize(x, g)
        total += -model.log_prob(y).double().sum().item()
    model.train()
    nll, D = total / len(x_test), model.D  # nats per example
    if cfg.dataset in TOY_SETS:
        return {"test_nll_nats": nll}
    return {"test_bpd": nats_to_bpd(nll, D), "test_loglik_nats": -nll}


@torch.inference_mode()
def write_samples(model, cfg, out, shape, device, n):
    """n samples at cfg.temperature, fixed noise -> uint8 [n, C, H, W]; samples.png shows the first n_samples."""
    model.eval()
    g = torch.Generator(device).manual_seed(cfg.seed + 2)
    x = torch.cat([to_uint8(model.sample(min(1000, n - i), g, cfg.temperature)) for i in range(0, n, 1000)])
    model.train()
    x = x.reshape(n, *shape).cpu()
    torchvision.utils.save_image(x[:cfg.n_samples].float() / 255, os.path.join(out, "samples.png"), nrow=8)
    return x


@torch.inference_mode()
def plot_density(model, x_test, cfg, path, title):
    """Three panels: test data, learned density exp(log p(x)) on a grid, samples (as 2-D histograms)."""
    model.eval()
    g = torch.Generator(x_test.device).manual_seed(cfg.seed + 2)
    L, n = 4.5, 200
    grid = torch.linspace(-L, L, n, device=x_test.device)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    density = model.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().reshape(n, n).cpu()
    samples = model.sample(len(x_test), g, cfg.temperature).cpu()
    model.train()
    fig, ax = plt.subplots(1, 3, figsize=(13.5, 4.5))
    ax[0].hist2d(*x_test.cpu().T.numpy(), bins=n, range=[[-L, L]] * 2, cmap="magma")
    ax[1].imshow(density.numpy(), origin="lower", extent=[-L, L, -L, L], cmap="magma",
                 vmax=density.quantile(0.999).item())  # a few thin ReLU ridges would saturate the colour scale
    ax[2].hist2d(*samples.T.numpy(), bins=n, range=[[-L, L]] * 2, cmap="magma")
    for a, t in zip(ax, ("test data", f"learned density p(x), {title}", f"samples (T={cfg.temperature})")):
        a.set_title(t, fontsize=10), a.set_aspect("equal"), a.set_xticks([]), a.set_yticks([])
    fig.suptitle(f"NICE on {cfg.dataset}")
    fig.tight_layout(), fig.savefig(path, dpi=90), plt.close(fig)


# ----------------------------------------------------------------------------- checkpoints
def load_ckpt(path):
    if not os.path.exists(path):
        raise fail(f"no checkpoint at {path} (train first, or drop --resume/--eval_only)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ck, dict) and {"model", "optimizer", "step", "config"} <= ck.keys(), "missing keys"
        return ck
    except Exception as e:
        raise fail(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None


def save_ckpt(path, model, opt, sched, step, cfg, results, gen):
    if not all(torch.isfinite(p).all() for p in model.parameters()):  # never replace a good checkpoint by a NaN one
        raise fail(f"non-finite weights at step {step}; the last good checkpoint {path} is kept")
    ck = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step,
              config=asdict(cfg), results=results, rng=gen.get_state())
    torch.save(ck, path + ".tmp")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- training
def train(cfg: Config) -> dict:
    cfg = resolve(cfg)
    check_config(cfg)
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available()
                          else "mps" if torch.backends.mps.is_available() else "cpu")
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if device.type == "cuda" else device
    if cfg.dtype == "bfloat16" and device.type != "cuda":
        raise fail("--dtype bfloat16 needs a CUDA device")
    out = cfg.out_dir or os.path.join("out", f"nice-{cfg.dataset}")
    ckpt_path = os.path.join(out, "ckpt.pt")
    ck = load_ckpt(ckpt_path) if cfg.resume or cfg.eval_only else None
    if ck is not None:
        saved = ck["config"]
        if cfg.eval_only:  # rebuild the model from the checkpoint's own config
            cfg = dataclasses.replace(cfg, **{k: saved[k] for k in ARCH})
        bad = [k for k in ARCH if saved.get(k) != getattr(cfg, k)]
        if bad:
            raise fail(f"checkpoint {ckpt_path} has --{bad[0]} {saved.get(bad[0])}, not {getattr(cfg, bad[0])}")
    master = rank == 0
    os.makedirs(out, exist_ok=True)
    logf = open(os.path.join(out, "log.txt"), "a") if master else None

    def log(msg):
        if master:
            print(msg, flush=True)
            logf.write(msg + "\n"), logf.flush()

    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | config {asdict(cfg)}")
    toy = cfg.dataset in TOY_SETS
    if toy:  # fixed train and test draws of the toy density
        x_train = toy_data(cfg.dataset, 100_000, torch.Generator().manual_seed(cfg.seed)).to(device)
        x_test = toy_data(cfg.dataset, 20_000, torch.Generator().manual_seed(cfg.seed + 10_000)).to(device)
    else:
        x_train = load_split(cfg.dataset, cfg.data_dir, True)[0].to(device)
        x_test = load_split(cfg.dataset, cfg.data_dir, False)[0].to(device)
    shape = tuple(x_train.shape[1:])
    torch.manual_seed(cfg.seed)
    model = NICE(math.prod(shape), cfg.n_couplings, cfg.hidden, cfg.n_hidden, cfg.prior).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    cosine = cfg.lr_decay == "cosine"
    factor = lambda i: 0.5 * (1 + math.cos(math.pi * min(i / cfg.max_steps, 1))) if cosine else 1  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)  # the paper keeps lr constant; toy sets decay it
    gen = torch.Generator(device).manual_seed(cfg.seed + 100 * rank)  # batch indices and dequantization noise
    step, results = 0, {}
    if ck is not None:
        try:
            model.load_state_dict(ck["model"])
            if not cfg.eval_only:
                opt.load_state_dict(ck["optimizer"]), sched.load_state_dict(ck["scheduler"])
                sched.base_lrs = [cfg.lr] * len(opt.param_groups)  # a resumed run may change --lr
                for grp in opt.param_groups:
                    grp["lr"] = cfg.lr * factor(ck["step"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise fail(f"checkpoint {ckpt_path} does not fit this model ({str(e).splitlines()[0][:100]})") from None
        step, results = ck["step"], ck.get("results") or {}
        if "rng" in ck and not cfg.eval_only:
            gen.set_state(ck["rng"])
        log(f"loaded {ckpt_path} at step {step}")
    log(f"NICE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, D={model.D}")
    if ck is None:  # z starts at the prior's scale, instead of ~1000 steps of Adam moving s (10 bpd at step 0)
        idx = torch.randint(len(x_train), (min(len(x_train), 2000),), generator=gen, device=device)
        model.init_scale(x_train[idx] if toy else dequantize(x_train[idx], gen))
    fwd = torch.compile(model) if cfg.compile else model
    fwd = nn.parallel.DistributedDataParallel(fwd) if ddp else fwd
    unit = "nats" if toy else "bpd"
    to_unit = (lambda nll: nll) if toy else (lambda nll: nats_to_bpd(nll, model.D))

    history, evals, train_time, t0, seen = [], [], 0.0, time.time(), 0
    while step < cfg.max_steps and not cfg.eval_only:
        if cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes:
            log(f"stopping at step {step}: --max_minutes {cfg.max_minutes} reached")
            break
        t = time.time()
        idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen, device=device)
        x = x_train[idx]
        if cfg.dataset in ("fashion", "cifar10"):  # random horizontal flips, on the device
            flip = torch.rand(len(x), generator=gen, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = x if toy else dequantize(x, gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss, stats = fwd(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
        step += 1
        train_time, seen = train_time + time.time() - t, seen + len(x)
        history.append((step, to_unit(stats["nll_nats"])))
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if not math.isfinite(loss.item()):
                raise fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
            eta = train_time / seen * cfg.batch_size * (cfg.max_steps - step)
            log(f"step {step}/{cfg.max_steps} | loss {history[-1][1]:.3f} {unit} | {seen / train_time:.0f} img/s"
                f" | eta {eta / 60:.1f}m")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            results = evaluate(model, x_test, cfg, device)
            evals.append((step, results.get("test_bpd", results.get("test_nll_nats"))))
            log(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
            if master:
                save_ckpt(ckpt_path, model, opt, sched, step, cfg, results, gen)
        if master and toy and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            plot_density(model, x_test, cfg, os.path.join(out, "density.png"), f"step {step}")
        elif master and step % cfg.sample_every == 0 and step < cfg.max_steps:
            write_samples(model, cfg, out, shape, device, cfg.n_samples)

    if not evals or evals[-1][0] != step:  # (the loop's last eval is reused)
        results = evaluate(model, x_test, cfg, device)
    res = dict(test_bpd=None, test_bpd_kind=None if toy else "exact", fid=None, precision=None, recall=None,
               fid_features=None,
               train_images_per_s=seen / train_time if seen else None, sample_images_per_s=None,
               steps=step, wall_s=time.time() - t0, device=str(device), config=asdict(cfg))
    res.update(results)  # test_bpd and test_loglik_nats (images) or test_nll_nats (toy)
    if master:
        t = time.time()
        n = max(cfg.n_samples, cfg.fid_samples, 1000 if toy else cfg.n_samples)
        if toy:
            plot_density(model, x_test, cfg, os.path.join(out, "density.png"),
                         f"test NLL {results['test_nll_nats']:.3f} nats")
        else:
            images = write_samples(model, cfg, out, shape, device, n)
            np.savez_compressed(os.path.join(out, "samples.npz"), images=images.numpy())
        res["sample_images_per_s"] = n / (time.time() - t)
        if cfg.fid_samples > 0:
            try:
                import metrics
            except ImportError:
                raise fail("--fid_samples > 0 needs metrics.py next to nice.py (or use --fid_samples 0)") from None
            m = metrics.evaluate(images[:cfg.fid_samples], cfg.dataset, cfg.data_dir, device)
            res.update({k: m[k] for k in ("fid", "precision", "recall", "fid_features")})
        if history:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(*zip(*history), lw=0.5, label="train (batch)")
            ax.plot(*zip(*evals), "o-", label="test")
            ax.set_xlabel("step"), ax.set_ylabel(f"NLL ({unit})"), ax.legend(), fig.tight_layout()
            fig.savefig(os.path.join(out, "loss.png"), dpi=90), plt.close(fig)
        if not cfg.eval_only:
            save_ckpt(ckpt_path, model, opt, sched, step, cfg, results, gen)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(res, f, indent=2)
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        log(f"FINAL nice {cfg.dataset} test_bpd={fmt(res['test_bpd'])} "
            + (f"test_nll_nats={fmt(res['test_nll_nats'])} " if toy else "")
            + f"fid={fmt(res['fid'])} steps={step} time={res['wall_s']:.1f}s device={device}")
        logf.close()
    if ddp:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    train(parse_args())
