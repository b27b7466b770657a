"""NICE (Dinh, Krueger & Bengio 2014, "Non-linear Independent Components Estimation", arXiv:1410.8516): an
additive-coupling normalizing flow with an exact log-likelihood, on images and on 2-D toy densities.
z = exp(s) * g_4(g_3(g_2(g_1(x)))), each g an additive coupling y2 = x2 + m(x1) on interleaved odd/even halves
(log-det 0), s a diagonal scaling (log-det sum(s)); log p(x) = log p_prior(z) + sum(s), logistic prior (paper)
or --prior gaussian. MNIST/fashion: 4 couplings, m = 5 hidden ReLU layers x 1000 units (paper); cifar10: 4 x 2000.
Deviations: Adam(lr 1e-3, betas (0.9, 0.99), eps 1e-4) reads the paper's beta2 = 0.01 in the old 1 - beta2
convention; cifar10 gets no ZCA whitening (paper: ZCA and [-1, 1] scaling), so its bpd is the plain pixel-space one;
ours: the toy sets (with a cosine lr decay) and a data-dependent init of s from one batch.
Units: y = (x + u) / 256, u ~ U[0,1)^D; test_bpd = (-log p(y) + D log 256) / (D log 2) (exact, one noise draw);
test_loglik_nats = log p(y) per image on [0,1]^D, the paper's quantity (MNIST 1980.50 nats <=> 4.36 bpd, D = 784).
Measured on a 2-core shared CPU, OMP_NUM_THREADS=1 (the paper reaches 4.36 bpd on MNIST after long runs):
  python nice.py --dataset 8gaussians    # 3000 steps, 89 s wall (32 s CPU): test_nll_nats=3.185 (moons: 2.539)
  python nice.py --dataset mnist --data_dir ../shared/data --hidden 500 --max_steps 1051 --fid_samples 0
      # 422 s: test_bpd=5.359, test_loglik_nats=1435.0 (measured as a 7-minute budget that stopped at step 1051)
Writes to out_dir: ckpt.pt, log.txt, results.json, loss.png; images: samples.png, samples.npz; toy: density.png.
"""
import argparse
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torchvision
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}
TOY_SETS = ("moons", "circles", "8gaussians", "checkerboard", "spirals")  # 2-D densities generated below
ARCH_FIELDS = ("dataset", "n_couplings", "hidden", "n_hidden", "prior")  # define the network
CHOICES = {"dataset": (*DATASETS, *TOY_SETS), "prior": ("logistic", "gaussian"), "dtype": ("float32", "bfloat16")}


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
    batch_size: int = 0  # examples per step (per process under torchrun); 0: 200 images, 512 toy
    lr: float = 0.0  # Adam learning rate; 0: 1e-3 images, constant (paper), 3e-3 toy, cosine decay to 0
    temperature: float = 1.0  # prior scale when sampling
    seed: int = 0  # seeds init, batches, noise
    eval_every: int = 0  # steps between test evaluations and checkpoints; 0: 2000 images, 1000 toy
    sample_every: int = 0  # steps between samples.png / density.png; 0: same as eval_every
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "float32"  # float32, or bfloat16 autocast (CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample
    n_samples: int = 64  # images in samples.png
    fid_samples: int = -1  # samples for FID/precision/recall; -1: 10000 images, 0 toy; 0 skips


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(Config), re.M))  # the comments above
    as_bool = lambda s: ("false", "0", "no", "true", "1", "yes").index(s.lower()) > 2  # noqa: E731 (ValueError: usage)
    for f in fields(Config):
        p.add_argument(f"--{f.name}", type=as_bool if f.type is bool else f.type, default=f.default,
                       choices=CHOICES.get(f.name), help=f"{helps[f.name]} (default: {f.default!r})")
    return Config(**vars(p.parse_args(argv)))


def fail(msg):
    raise SystemExit(f"nice.py: error: {msg}")


def resolve(cfg):
    """Fill the per-dataset sentinels (0, "", -1) with the paper's image settings or the small toy ones."""
    toy, cifar = cfg.dataset in TOY_SETS, cfg.dataset == "cifar10"
    auto = dict(n_couplings=8 if toy else 4, hidden=64 if toy else 2000 if cifar else 1000,
                n_hidden=3 if toy else 4 if cifar else 5, max_steps=3000 if toy else 30000,
                batch_size=512 if toy else 200, lr=3e-3 if toy else 1e-3, eval_every=1000 if toy else 2000,
                out_dir=f"out/nice-{cfg.dataset}")
    cfg = replace(cfg, **{k: v for k, v in auto.items() if not getattr(cfg, k)})
    return replace(cfg, sample_every=cfg.sample_every or cfg.eval_every,
                   fid_samples=(0 if toy else 10000) if cfg.fid_samples < 0 else cfg.fid_samples)


def check_config(cfg):
    if cfg.dataset in TOY_SETS and cfg.fid_samples > 0:
        fail(f"--fid_samples applies to image datasets only; {cfg.dataset} is a 2-D toy set (use 0)")
    for k in ("n_couplings", "hidden", "n_hidden", "max_steps", "batch_size", "eval_every", "sample_every", "log_every",
              "n_samples", "lr", "temperature"):  # (after resolve(), 0 means the default)
        if not getattr(cfg, k) > 0:
            fail(f"--{k} must be > 0, got {getattr(cfg, k)}")
    if cfg.resume and cfg.eval_only:
        fail("give --resume or --eval_only, not both")
    if cfg.dtype == "bfloat16" and pick_device(cfg.device).type != "cuda":
        fail("--dtype bfloat16 is autocast on CUDA; use --dtype float32 on this device")


# ----------------------------------------------------------------------------- model
class Coupling(nn.Module):
    """Additive coupling (paper eq. 6-7): y_I2 = x_I2 + m(x_I1), y_I1 = x_I1; log|det| = 0.
    I1/I2 are the even/odd entries of the flattened input, swapped when parity = 1."""

    def __init__(self, D, hidden, n_hidden, parity):
        super().__init__()
        self.parity = parity
        layers = [nn.Linear(D // 2, hidden)] + [nn.Linear(hidden, hidden) for _ in range(n_hidden - 1)]
        self.m = nn.Sequential(*[m for lin in layers for m in (lin, nn.ReLU())], nn.Linear(hidden, D // 2))

    def forward(self, x, reverse=False):
        h = x.reshape(len(x), -1, 2)  # [B, D/2, 2]: pairs (even, odd) of the flattened input
        x1, x2 = h[..., self.parity], h[..., 1 - self.parity]
        y2 = x2 - self.m(x1) if reverse else x2 + self.m(x1)  # the inverse is a subtraction (eq. 8)
        return torch.stack((x1, y2) if self.parity == 0 else (y2, x1), dim=-1).reshape(x.shape)


class NICE(nn.Module):
    def __init__(self, D, n_couplings=4, hidden=1000, n_hidden=5, prior="logistic"):
        super().__init__()
        if D % 2:
            fail(f"NICE's odd/even partition needs an even input dimension, got D={D}")
        self.D, self.prior = D, prior
        self.couplings = nn.ModuleList(Coupling(D, hidden, n_hidden, i % 2) for i in range(n_couplings))
        self.s = nn.Parameter(torch.zeros(D))  # diagonal scaling layer, z = exp(s) * h (section 3.3)

    @torch.no_grad()
    def init_scale(self, x):
        """Data-dependent init (ours, ActNorm-like): s_d = log(prior std / std of h_d over the batch x)."""
        h = self.forward_flow(x)[0] * (-self.s).exp()  # the couplings' output; the logistic's std is pi / sqrt(3)
        self.s.copy_(torch.log((math.pi / 3 ** 0.5 if self.prior == "logistic" else 1.0) / h.std(0).clamp_min(1e-6)))

    def forward_flow(self, x):
        """x [B, ...] -> z [B, D], logdet [B] = log|det dz/dx| = sum(s) (the couplings add 0)."""
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
            return -(nn.functional.softplus(z) + nn.functional.softplus(-z)).sum(1)
        return -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(1)

    def log_prob(self, x):  # change of variables: log p(x) = log p_H(f(x)) + log|det df/dx|, nats [B]
        z, logdet = self.forward_flow(x)
        dt = torch.promote_types(z.dtype, torch.float32)  # bf16 autocast: the sum over D in float32
        return self.prior_log_prob(z.to(dt)) + logdet.to(dt)

    def forward(self, x):
        nll = -self.log_prob(x)  # nats per example
        return nll.mean() / self.D, {"nll_nats": nll.mean().item()}  # loss in nats per dimension

    def sample(self, n, generator=None, temperature=1.0):
        u = torch.rand(n, self.D, generator=generator, device=self.s.device).clamp(1e-6, 1 - 1e-6)
        # z = F^-1(u), the prior's inverse CDF: logistic log u - log(1 - u), Gaussian sqrt(2) erfinv(2u - 1)
        z = u.log() - (-u).log1p() if self.prior == "logistic" else math.sqrt(2) * torch.erfinv(2 * u - 1)
        return self.inverse(temperature * z)


# ----------------------------------------------------------------------------- data
def load_split(dataset, data_dir, train):
    """The whole split as one uint8 tensor [N, C, H, W] and int64 labels [N] (no per-image PIL work)."""
    cls = getattr(torchvision.datasets, DATASETS[dataset])
    try:
        try:
            ds = cls(data_dir, train=train, download=False)
        except Exception:
            ds = cls(data_dir, train=train, download=True)
    except Exception as e:
        where = "cifar-10-batches-py/" if dataset == "cifar10" else f"{DATASETS[dataset]}/raw/train-images-idx3-ubyte"
        fail(f"cannot load {dataset} from --data_dir {data_dir} (expected {data_dir}/{where}, ...): {type(e).__name__}")
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
        x1 = 4 * rand(n) - 2  # x2 in the squares of the other colour: x1's column parity picks the row
        x = 2 * torch.stack([x1, rand(n) - 2 * torch.randint(0, 2, (n,), generator=generator) + x1.floor() % 2], 1)
    else:  # spirals: two interleaved arms
        t = rand(n).sqrt() * 3 * math.pi
        arm = torch.stack([-t.cos() * t, t.sin() * t], 1) + 0.5 * rand(n, 2)
        x = torch.where((rand(n) < 0.5)[:, None], arm, -arm) / 3 + 0.1 * randn(n, 2)
    return x.float()


def nats_to_bpd(nll, D):  # -log p(y) in nats per image on [0,1]^D -> bits per 8-bit dimension
    return (nll + D * math.log(256)) / (D * math.log(2))


def dequantize(x, generator):  # uint8 [B, ...] -> y = (x + u) / 256 in [0, 1), u ~ U[0, 1)
    return (x.float() + torch.rand(x.shape, generator=generator, device=x.device)) / 256


# ----------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate(model, x_test, cfg):
    """Exact test likelihood over the complete test split (fixed dequantization noise; NICE has no train/eval mode)."""
    g, toy = torch.Generator(x_test.device).manual_seed(cfg.seed + 1), cfg.dataset in TOY_SETS
    logp = sum(model.log_prob(x if toy else dequantize(x, g)).double().sum().item() for x in x_test.split(1000))
    nll = -logp / len(x_test)  # nats per example
    return {"test_nll_nats": nll} if toy else {"test_bpd": nats_to_bpd(nll, model.D), "test_loglik_nats": -nll}


@torch.inference_mode()
def save_pictures(model, x_test, cfg, n, title=""):
    """n samples at cfg.temperature from fixed noise -> density.png (toy) or samples.png (first n_samples).
    Returns the samples (uint8 [n, C, H, W] for images, on the CPU) and the samples drawn per second."""
    t, g = time.time(), torch.Generator(x_test.device).manual_seed(cfg.seed + 2)
    x = torch.cat([model.sample(min(1000, n - i), g, cfg.temperature) for i in range(0, n, 1000)])
    if cfg.dataset not in TOY_SETS:  # back to 8 bits: the 256 bins of [0, 1)
        x = (x.clamp(0, 1) * 256).floor().clamp(0, 255).to(torch.uint8).reshape(n, *x_test.shape[1:]).cpu()
        torchvision.utils.save_image(x[:cfg.n_samples] / 255, os.path.join(cfg.out_dir, "samples.png"), nrow=8)
        return x, n / (time.time() - t)
    x, speed = x.cpu(), n / (time.time() - t)
    L, bins = 4.5, 200  # density.png: test data, the learned density exp(log p(x)) on a grid, samples
    grid = torch.linspace(-L, L, bins, device=x_test.device)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    density = model.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().reshape(bins, bins).cpu()
    ax = Figure(figsize=(13.5, 4.5)).subplots(1, 3)
    ax[0].hist2d(*x_test.cpu().T.numpy(), bins=bins, range=[[-L, L]] * 2, cmap="magma")
    ax[1].imshow(density.numpy(), origin="lower", extent=[-L, L, -L, L], cmap="magma",
                 vmax=density.quantile(0.999).item())  # a few thin ReLU ridges would saturate the colour scale
    ax[2].hist2d(*x.T.numpy(), bins=bins, range=[[-L, L]] * 2, cmap="magma")
    for a, t in zip(ax, ("test data", f"learned density p(x), {title}", f"samples (T={cfg.temperature})")):
        a.set_title(t, fontsize=10), a.set_aspect("equal"), a.set_xticks([]), a.set_yticks([])
    ax[0].figure.suptitle(f"NICE on {cfg.dataset}"), ax[0].figure.tight_layout()
    ax[0].figure.savefig(os.path.join(cfg.out_dir, "density.png"), dpi=90)
    return x, speed


# ----------------------------------------------------------------------------- training
def load_checkpoint(path, cfg):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path} (train first, or drop --resume/--eval_only)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = {k: ckpt["config"][k] for k in ARCH_FIELDS}
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]})")
    bad = [k for k in ARCH_FIELDS if cfg.resume and saved[k] != getattr(cfg, k)]
    if bad:
        fail(f"checkpoint {path} has --{bad[0]} {saved[bad[0]]}, not {getattr(cfg, bad[0])}; use another --out_dir")
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
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def train(cfg: Config) -> dict:
    cfg = resolve(cfg)
    check_config(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg) if cfg.resume or cfg.eval_only else None
    if cfg.eval_only:  # rebuild the model the checkpoint describes, whatever the command line says
        cfg = replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
        cfg.fid_samples *= cfg.dataset not in TOY_SETS  # (a toy checkpoint: no FID, whatever the image default)
    device, rank, world = setup_distributed(pick_device(cfg.device))
    os.makedirs(cfg.out_dir, exist_ok=True)

    def log(msg):  # only rank 0 prints and writes
        if rank == 0:
            with open(os.path.join(cfg.out_dir, "log.txt"), "a") as f:
                print(msg, flush=True), f.write(msg + "\n")

    toy = cfg.dataset in TOY_SETS
    if toy:  # fixed train and test draws of the toy density, float [N, 2]
        x_train = toy_data(cfg.dataset, 100_000, torch.Generator().manual_seed(cfg.seed)).to(device)
        x_test = toy_data(cfg.dataset, 20_000, torch.Generator().manual_seed(cfg.seed + 10_000)).to(device)
    else:  # the whole split on the device, uint8 [N, C, H, W]
        x_train, x_test = (load_split(cfg.dataset, cfg.data_dir, train)[0].to(device) for train in (True, False))
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = NICE(x_test[0].numel(), cfg.n_couplings, cfg.hidden, cfg.n_hidden, cfg.prior).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-4)  # the paper's (see above)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)  # batch indices, flips, dequantization noise
    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | processes {world} | {asdict(cfg)}\n"
        f"NICE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, D={model.D}")
    step, history, evals = 0, [], []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
            g.set_state(ckpt["rng"]) if rank == 0 else g.manual_seed(cfg.seed + 1000 * rank + ckpt["step"])
            step, history, evals = ckpt["step"], ckpt["history"], ckpt["evals"]
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint {ckpt_path} does not fit this model ({str(e).splitlines()[0][:100]})")
        log(f"loaded {ckpt_path} at step {step}")
    else:  # z starts at the prior's scale, instead of ~1000 steps of Adam moving s (10 bpd at step 0)
        x = x_train[torch.randint(len(x_train), (2000,), generator=g, device=device)]
        model.init_scale(x if toy else dequantize(x, g))
    fwd = nn.parallel.DistributedDataParallel(model) if world > 1 else model  # (broadcasts rank 0's weights)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    unit, key = ("nats", "test_nll_nats") if toy else ("bpd", "test_bpd")

    def checkpoint(results):
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # never replace a good checkpoint by a NaN one
            fail(f"non-finite weights at step {step}; the last good checkpoint {ckpt_path} is kept")
        if rank == 0:  # write, then rename: a crash never leaves a half-written ckpt.pt
            torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, config=asdict(cfg),
                            results=results, history=history, evals=evals, rng=g.get_state()), ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)

    t_train, t0, start_step = 0.0, time.time(), step
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.time()
        x = x_train[torch.randint(len(x_train), (cfg.batch_size,), generator=g, device=device)]
        if cfg.dataset in ("fashion", "cifar10"):  # half of the batch mirrored left-right (never digits)
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g, device=device) < 0.5, x.flip(3), x)
        for group in opt.param_groups:  # the paper keeps lr constant; toy sets decay it (cosine, to 0)
            group["lr"] = cfg.lr * (0.5 + 0.5 * math.cos(math.pi * step / cfg.max_steps) if toy else 1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss, stats = fwd(x if toy else dequantize(x, g))  # nats per dimension
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step, t_train = step + 1, t_train + time.time() - t_step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if not math.isfinite(loss.item()):
                fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
            history.append((step, stats["nll_nats"] if toy else nats_to_bpd(stats["nll_nats"], model.D)))
            eta = (cfg.max_steps - step) * t_train / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {history[-1][1]:.3f} {unit} | "
                f"{(step - start_step) * cfg.batch_size * world / t_train:.0f} img/s | eta {eta / 60:.1f}m")
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            results = evaluate(model, x_test, cfg)  # (in every process: the others would wait for rank 0 anyway)
            evals.append((step, results[key]))
            log(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
            checkpoint(results)
        if rank == 0 and step % cfg.sample_every == 0 and step < cfg.max_steps:
            save_pictures(model, x_test, cfg, len(x_test) if toy else cfg.n_samples, f"step {step}")
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return {}
    results = evaluate(model, x_test, cfg)  # test_bpd and test_loglik_nats (images) or test_nll_nats (toy)
    res = {"test_bpd": None, "test_bpd_kind": None if toy else "exact (dequantized density, 1 noise draw)", "fid": None, "precision": None,
           "recall": None, "fid_features": None, **results}
    n = len(x_test) if toy else max(cfg.n_samples, cfg.fid_samples)
    images, res["sample_images_per_s"] = save_pictures(model, x_test, cfg, n, f"test NLL {res[key]:.3f} {unit}")
    if not toy:
        np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=images.numpy())
    if cfg.fid_samples > 0:
        import metrics  # lazily: a copied nice.py runs alone with --fid_samples 0
        res.update(metrics.evaluate(images[:cfg.fid_samples], cfg.dataset, cfg.data_dir, device))
    res.update(steps=step, wall_s=time.time() - t0, device=str(device), config=asdict(cfg),
               train_images_per_s=(step - start_step) * cfg.batch_size * world / t_train if t_train else None)
    if not cfg.eval_only:
        evals.append((step, res[key]))
        checkpoint(results)
        ax = Figure(figsize=(6, 4)).subplots()  # loss.png
        ax.plot(*zip(*history), lw=0.8, label="train (batch)"), ax.plot(*zip(*evals), "o-", label="test")
        ax.set(xlabel="step", ylabel=f"NLL ({unit})"), ax.legend()
        ax.figure.tight_layout(), ax.figure.savefig(os.path.join(cfg.out_dir, "loss.png"), dpi=90)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={'n/a' if res[k] is None else f'{res[k]:.4f}'}" for k in dict.fromkeys(("test_bpd", key, "fid")))
    log(f"FINAL nice {cfg.dataset} {shown} steps={step} time={res['wall_s']:.1f}s device={device}")
    return res


if __name__ == "__main__":
    train(parse_args())
