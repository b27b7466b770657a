"""NICE (Dinh, Krueger & Bengio 2014): z = exp(s) * g_K(... g_1(x)) with additive couplings g (y2 =
x2 + m(x1), x1 and x2 the even and odd entries in turn, m a ReLU MLP): exact log p(x) = log p_H(z) +
sum(s), p_H logistic or gaussian. Adam (paper) with the official code's lr decay; the test split
scores the model that did best on 10,000 held-out training images, as the official code's yaml does.
Ours: no ZCA on cifar10; s set from one batch; a seeded draw, not the last 10,000; 2-D toy sets too.
    python nice.py --dataset mnist    # or --dataset moons (density.png)
"""
import argparse
import dataclasses
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
import torchvision
from PIL import Image, ImageOps  # torchvision's dependency
from matplotlib.figure import Figure

# --------------------------------------------------------------------------- model
class Coupling(nn.Module):  # eq. (6)-(8): y1 = x1, y2 = x2 + m(x1), so x2 = y2 - m(y1); log-det 0
    def __init__(self, cfg, D, parity):
        super().__init__()
        self.parity = parity  # x1 is the even entries of the flat input (0), or the odd ones (1)
        h = cfg.hidden
        layers = [nn.Linear(D // 2, h), nn.ReLU()]
        for _ in range(4):  # m: 5 hidden ReLU layers (the paper's, for MNIST), then a linear one
            layers += [nn.Linear(h, h), nn.ReLU()]
        self.m = nn.Sequential(*layers, nn.Linear(h, D // 2))
    def forward(self, x, reverse=False):  # x [B, D]
        pairs = x.unflatten(1, (-1, 2))  # [B, D/2, 2]: (even, odd) entries
        x1 = pairs[..., self.parity]
        x2 = pairs[..., 1 - self.parity]
        shift = self.m(x1).float()  # the sum in float32, under bf16 autocast too
        y2 = x2 - shift if reverse else x2 + shift
        y = (y2, x1) if self.parity else (x1, y2)
        return torch.stack(y, -1).flatten(1)

class NICE(nn.Module):
    def __init__(self, cfg, D):
        super().__init__()
        self.prior = cfg.prior
        self.D = D
        self.couplings = nn.ModuleList(Coupling(cfg, D, i % 2) for i in range(cfg.n_couplings))
        self.s = nn.Parameter(torch.zeros(D))  # the diagonal scaling z = exp(s) * h (sec. 3.3)
    def forward_flow(self, x):  # x [B, ...] -> z [B, D], logdet [B] = sum(s): the couplings add 0
        h = x.flatten(1)
        for coupling in self.couplings:
            h = coupling(h)
        return h * self.s.exp(), self.s.sum().expand(len(x))
    def inverse(self, z):  # z [B, D] -> x [B, D]
        h = z / self.s.exp()
        for coupling in reversed(self.couplings):
            h = coupling(h, reverse=True)
        return h
    def log_prob(self, x):  # change of variables: log p_H(f(x)) + log|det df/dx|, in nats [B]
        z, logdet = self.forward_flow(x)
        if self.prior == "logistic":  # log p_H(z) = -log(1 + e^z) - log(1 + e^-z) (sec. 3.4)
            return logdet - (nn.functional.softplus(z) + nn.functional.softplus(-z)).sum(1)
        return logdet - 0.5 * (z ** 2 + math.log(2 * math.pi)).sum(1)  # the standard normal
    def forward(self, x):  # the loss -log p(x) in nats per dimension; stats in nats per example
        nll = -self.log_prob(x).mean()
        return nll / self.D, {"nll_nats": nll.detach()}
    def sample(self, n, generator=None):  # x = f^-1(z), z = F^-1(u) by the prior's inverse CDF
        u = torch.rand(n, self.D, generator=generator, device=self.s.device).clamp(1e-6, 0.999999)
        z = torch.logit(u) if self.prior == "logistic" else torch.special.ndtri(u)
        return self.inverse(z)

# --------------------------------------------------------------------------- data, evaluation, samples
def load_split(cfg, train):  # the split as one uint8 tensor [N, C, H, W], labels [N]
    if cfg.dataset in TOY_SETS:  # fixed draws of the 2-D density: float [N, 2], no labels
        return toy_data(cfg.dataset, 100_000 if train else 20_000, 0 if train else 10_000), None
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

def hold_out(x, cfg):  # (train, val): a seeded draw of the training split, the same in every run
    n = min(10_000, len(x) // 5) if cfg.val_images is None else cfg.val_images  # a small split: 1/5
    if n >= len(x):
        fail(f"--val_images {n} must be < the {len(x)} examples of the training split")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # not --seed's
    return x[perm[n:]], x[perm[:n]]

def toy_data(name, n, seed):  # n points [n, 2] of a 2-D density (FFJORD's), within about [-4, 4]^2
    torch.manual_seed(seed)  # torch's global generator: train() reseeds it before the model
    if name == "moons":  # two interleaved half circles
        t = math.pi * torch.rand(n)
        upper = torch.stack([t.cos(), t.sin()], 1)
        x = torch.where(torch.rand(n, 1) < 0.5, upper, torch.tensor([1, 0.5]) - upper)
        return 2 * (x + 0.1 * torch.randn(n, 2)) + torch.tensor([-1, -0.2])
    if name == "8gaussians":  # at 8 angles on a circle of radius 4 / 1.414
        t = math.pi / 4 * torch.randint(0, 8, (n,))
        return (4 * torch.stack([t.cos(), t.sin()], 1) + 0.5 * torch.randn(n, 2)) / 1.414
    x1 = 4 * torch.rand(n) - 2  # checkerboard: x2 in the other colour's squares of x1's column
    x2 = torch.rand(n) - 2 * (torch.rand(n) < 0.5) + x1.floor() % 2
    return 2 * torch.stack([x1, x2], 1)

def to_input(x, cfg, generator):  # uint8 images -> y = (x + u) / 256, u ~ U[0, 1)^D; toy data as is
    if cfg.dataset in TOY_SETS:
        return x
    return (x.float() + torch.rand(x.shape, generator=generator, device=x.device)) / 256

def learning_rate(cfg, step):  # the official exp/nice_*.yaml: pylearn2's ExponentialDecay per step
    if cfg.dataset in TOY_SETS:  # ours: a cosine decay to 0
        return cfg.lr * (0.5 + 0.5 * math.cos(math.pi * step / cfg.max_steps))
    return max(cfg.lr * (1 + cfg.lr_decay) ** -step, cfg.lr * cfg.lr_floor)

@torch.inference_mode()
def evaluate(model, x, cfg, split="test"):  # the exact NLL of a whole split, with the same noise u
    g = torch.Generator(x.device).manual_seed(cfg.seed + 1)
    batches = progress(cfg, f"{split} NLL", x.split(1000))
    nll = -sum(model.log_prob(to_input(b, cfg, g)).sum() for b in batches).item() / len(x)
    if cfg.dataset in TOY_SETS:
        return {f"{split}_nll_nats": nll}
    bpd = nll / model.D / math.log(2) + 8  # 8-bit x: bpd = (-log p(y) + D log 256) / (D log 2)
    # the paper reports log p(y) in nats: MNIST 1980.50, i.e. 4.36 bpd
    return {f"{split}_bpd": bpd, f"{split}_bpd_kind": "exact", f"{split}_loglik_nats": -nll}

@torch.inference_mode()
def save_samples(model, x_test, cfg, n=0):  # samples.png (toy sets: density.png); n -> samples.npz
    g = torch.Generator(x_test.device).manual_seed(cfg.seed + 2)  # the same noise every time
    if cfg.dataset not in TOY_SETS:
        x = model.sample(max(n, cfg.n_samples), g).cpu()
        x = (x * 256).clamp(0, 255).byte().unflatten(1, x_test.shape[1:])  # the 256 bins of [0, 1)
        torchvision.utils.save_image(x[: cfg.n_samples] / 255, f"{cfg.out_dir}/samples.png")
        np.savez_compressed(f"{cfg.out_dir}/samples.npz", images=x.numpy())
        return x[:n]
    box = (-4.5, 4.5)  # density.png shows the square [-4.5, 4.5]^2
    grid = torch.linspace(*box, 200, device=x_test.device)
    xy = torch.cartesian_prod(grid, grid)  # [200 * 200, 2]: x-major
    p = model.log_prob(xy).exp().reshape(200, 200).T  # [y, x]
    ax = Figure((13.5, 4)).subplots(1, 3, subplot_kw=dict(xlim=box, ylim=box))  # square panels
    ax[0].plot(*x_test.T.cpu(), ",")  # a pixel per point
    ax[1].imshow(p.cpu().numpy(), origin="lower", extent=box * 2)
    ax[2].plot(*model.sample(len(x_test), g).T.cpu(), ",")
    ax[0].figure.suptitle("test data  |  learned density p(x)  |  samples")
    ax[0].figure.savefig(f"{cfg.out_dir}/density.png")

@dataclasses.dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10 | stl10 | folder, or a toy set (TOY_SETS)
    data_dir: str = "./data"  # torchvision's root (<data_dir>/MNIST/raw/...), or the folder
    image_size: int = 32  # stl10 and folder images are resized to it once (others keep theirs)
    out_dir: str = "out/nice-{dataset}"  # everything of the run
    prior: str = "logistic"  # p_H: logistic (paper) | gaussian
    n_couplings: int = 0  # additive coupling layers; 0: 4 (paper), 8 on a toy set
    hidden: int = 0  # units of each hidden layer of m; 0: 1000 (paper), 64 on a toy set
    max_steps: int = 0  # optimizer steps; 0: 30000, 3000 on a toy set
    batch_size: int = 0  # examples per step (per process under torchrun); 0: 200, 512 on a toy set
    lr: float = 0.0  # Adam's initial rate; 0: 1e-3 (paper), 3e-3 on a toy set (a cosine decay to 0)
    lr_decay: float = 5e-4  # lr / (1 + lr_decay)^step (official yaml: 1.0005 per step); 0: constant
    lr_floor: float = 0.1  # the decay stops at lr * lr_floor (official MNIST yaml: 1e-4 of 1e-3)
    val_images: int = None  # held out of training to pick the model; None: 10,000 (paper); 0: none
    seed: int = 0
    eval_every: int = 1000  # steps between validation NLLs, pictures and checkpoints
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in samples.png
    fid_samples: int = 10000  # samples for FID / precision / recall (images only); 0 skips them
    def __post_init__(self):  # the fields left at 0 take IMAGES' or TOY's value
        for k, v in (TOY if self.dataset in TOY_SETS else IMAGES).items():
            setattr(self, k, getattr(self, k) or v)

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "stl10": "STL10",
            "folder": None}  # folder: the images under --data_dir
TOY_SETS = ("moons", "8gaussians", "checkerboard")  # toy_data() draws them
IMAGES = dict(n_couplings=4, hidden=1000, max_steps=30000, batch_size=200, lr=1e-3)
TOY = dict(n_couplings=8, hidden=64, max_steps=3000, batch_size=512, lr=3e-3)
CHOICES = {"dataset": (*DATASETS, *TOY_SETS), "prior": ("logistic", "gaussian"),
           "dtype": ("float32", "bfloat16")}
ARCH = ("dataset", "image_size", "prior", "n_couplings", "hidden")  # fixed by ckpt.pt
BY_DEVICE = {}  # Config fields left None: (on CUDA, elsewhere)

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
    toy = cfg.dataset in TOY_SETS
    x_train, x_val = hold_out(load_split(cfg, train=True)[0], cfg)
    cfg.val_images = len(x_val)  # None resolved, for ckpt.pt and results.json
    x_train = x_train.to(device)  # all on the device; batches come from x_train only
    x_test = load_split(cfg, train=False)[0].to(device)
    x_val = x_val.to(device) if cfg.val_images else x_test  # 0: the curve shows test, no selection
    split = "val" if cfg.val_images else "test"
    torch.manual_seed(cfg.seed + RANK)  # DDP gives every rank rank 0's initial weights
    model = NICE(cfg, x_test[0].numel()).to(device)
    betas = (0.9, 0.99)  # paper: momentum 0.9, 1 - beta2 = 0.01; and eps 1e-4
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=betas, eps=1e-4, fused=True)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * RANK)  # batches and the noise u
    step, curves = 0, {"train": [], "test": []}  # curves: (step, NLL) pairs for loss.png
    keys = ["test_nll_nats"] if toy else ["test_bpd", "test_loglik_nats", "fid"]  # the FINAL line's
    if cfg.val_images:  # keys[0]: the eval curve's (loss.png's y label), the one that selects
        keys.insert(0, keys[0].replace("test", "val"))
    best = {"step": 0, "val": {keys[0]: math.inf}, "model": None}  # the selected model
    x = x_train[torch.randint(len(x_train), (2000,), device=device, generator=g)]
    std = math.pi / 3 ** 0.5 if cfg.prior == "logistic" else 1.0  # ours: z starts at the prior's std
    model.s.data += torch.log(std / model.forward_flow(to_input(x, cfg, g))[0].detach().std(0))
    if ckpt:  # its s replaces that one
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, curves = ckpt["step"], ckpt["curves"]
        if "best" not in ckpt:  # written before the model selection
            fail(f"{cfg.out_dir}/ckpt.pt holds no selected model (older code); train anew")
        best = ckpt["best"]  # the selected model's step, validation NLL and weights
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
            group["lr"] = learning_rate(cfg, step)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss, stats = fwd(to_input(x, cfg, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            nll = stats["nll_nats"]  # nats per example; the device syncs at log steps only
            stop_if_diverged(cfg, step, nll)  # on every rank, before a diverged model is saved
            curves["train"].append((step, (nll if toy else nll / model.D / math.log(2) + 8).item()))
            speed = (step - start) * cfg.batch_size * WORLD / t_train
            eta = (cfg.max_steps - step) * t_train / (step - start) / 60
            log(cfg, f"step {step}/{cfg.max_steps} | train {curves['train'][-1][1]:.3f}"
                f" {'nats' if toy else 'bpd'} | {speed:.0f} img/s | eta {eta:.1f}m")
        if RANK == 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            save_samples(model, x_test, cfg)
            watched = evaluate(model, x_val, cfg, split)
            curves["test"].append((step, watched[keys[0]]))
            log(cfg, f"eval step {step} | {keys[0]} {watched[keys[0]]:.4f}")
            if watched[keys[0]] < best["val"][keys[0]] or not cfg.val_images:  # 0: the last
                weights = {k: v.clone() for k, v in model.state_dict().items()}  # on the device
                best = {"step": step, "val": watched, "model": weights}
            save_checkpoint(cfg, step, watched[keys[0]], model=model.state_dict(), best=best,
                            optimizer=opt.state_dict(), curves=curves, rng=g.get_state(),
                            train_images_per_s=speed)
    if WORLD > 1:
        torch.distributed.destroy_process_group()
    if RANK != 0:
        return {}
    model.load_state_dict(best["model"])  # the test split scores the selected model only
    res = best["val"] | evaluate(model, x_test, cfg) | {"selected_step": best["step"]}
    imgs = save_samples(model, x_test, cfg, cfg.fid_samples)
    res |= fid_metrics(imgs, cfg, device) if cfg.fid_samples and not toy else {}
    res |= {"steps": step, "wall_s": time.perf_counter() - t0, "device": str(device)}
    res["train_images_per_s"] = speed if step > start else ckpt["train_images_per_s"]
    return finish(cfg, res, curves, keys)

if __name__ == "__main__":
    main()
