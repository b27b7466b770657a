"""PixelCNN (van den Oord et al. 2016a) and Gated PixelCNN (2016b): p(x) = prod_i p(x_i | x_<i) in
raster order, R -> G -> B in a pixel, by masked convolutions (type A hides the value itself), so
test_bpd is exact. --arch gated: vertical and horizontal stacks, tanh * sigmoid gates, no blind
spot; --arch pixelcnn: the original, blind spot included. Per channel a softmax over --levels values
or --output logistic_mix (PixelCNN++, Salimans et al. 2017); --conditional: a class bias per layer;
--binarize: binarized MNIST (2 levels, nats/image). Evaluated and sampled with Polyak-averaged weights.
Deviations: a mixture per channel, no PixelCNN++ channel coupling; small nets; no data augmentation.
    python pixelcnn.py --dataset mnist [--levels 4 | --binarize]
"""
import argparse
import copy
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
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps  # torchvision's dependency

# --------------------------------------------------------------------------- model
class MaskedConv2d(nn.Conv2d):  # a conv whose output pixel sees the input pixel at the tap centre
    def __init__(self, ci, co, kernel, centre, mask, C, classes=0):
        super().__init__(ci, co, kernel)
        r, c = centre
        kh, kw = self.kernel_size
        self.pad = (c, kw - 1 - c, r, kh - 1 - r)  # left, right, top, bottom
        m = torch.ones_like(self.weight)  # [co, ci, kh, kw]
        if mask is not None:  # "A" or "B": nothing after the centre in raster order
            m[:, :, r + 1:] = 0
            m[:, :, r, c + 1:] = 0
            group_in = torch.arange(ci) % C  # channel c of every tensor is R, G or B by c % C
            m[:, :, r, c] = torch.arange(co)[:, None] % C >= group_in + (mask == "A")  # A: only <
        self.register_buffer("mask", m)
        self.class_bias = nn.Embedding(classes, co) if classes else None  # V^T y, eq. (4), 2016b
    def forward(self, x, y=None):  # y: the labels [B], if there are classes
        out = F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)
        return out if self.class_bias is None else out + self.class_bias(y)[..., None, None]

def pointwise(ci, co, C):  # a 1x1 conv that keeps R -> G -> B inside a pixel (mask B)
    return MaskedConv2d(ci, co, 1, (0, 0), "B", C)

def gate(x):  # tanh(W_f * x) * sigmoid(W_g * x), eq. (2) of 2016b; the halves keep the R/G/B groups
    x_f, x_g = x.chunk(2, 1)
    return x_f.tanh() * x_g.sigmoid()

class GatedLayer(nn.Module):  # a layer of both stacks, fig. 2 of 2016b
    def __init__(self, p, k, C, classes, first):
        super().__init__()
        ci = C if first else p  # layer 0 reads the image
        half = k // 2  # by the centres: v sees the half + 1 rows up to this one, h the row up to
        self.first = first  # the pixel (v's input is shifted down a row: it sees only rows above)
        self.v = MaskedConv2d(ci, 2 * p, (half + 1, k), (half, half), None, C, classes)
        mask = "A" if first else "B"
        self.h = MaskedConv2d(ci, 2 * p, (1, half + 1), (0, half), mask, C, classes)
        self.v2h = nn.Conv2d(2 * p, 2 * p, 1)  # what the vertical stack saw, into every channel
        self.h2h = pointwise(p, p, C)
    def forward(self, h, v_pre, y):  # the horizontal stack's next features [B, p, H, W]
        out = self.h2h(gate(self.h(h, y) + self.v2h(v_pre)))
        return out if self.first else h + out  # residual, but not from the C input channels

class GatedPixelCNN(nn.Module):
    def __init__(self, C, p, n_layers, k, classes):  # classes: 0 unless conditional
        super().__init__()
        self.layers = nn.ModuleList(GatedLayer(p, k, C, classes, first=i == 0)
                                    for i in range(n_layers))
        self.reach = (k // 2) * n_layers + 1  # the rows above a pixel that can reach it
    def vertical(self, x, y):  # [B, C, H, W] -> the layers' vertical pre-activations [B, 2p, H, W]
        pres = []
        v = F.pad(x, (0, 0, 1, -1))  # shifted down a row: the vertical stack sees only rows above
        for layer in self.layers:
            pres.append(layer.v(v, y))
            v = gate(pres[-1])
        return pres
    def horizontal(self, h, pres, y):  # x and pres on the same rows -> features [B, p, rows, W]
        for layer, v_pre in zip(self.layers, pres):
            h = layer(h, v_pre, y)
        return h
    def forward(self, x, y):  # [B, C, H, W] in [-1, 1] -> features [B, p, H, W]
        return self.horizontal(x, self.vertical(x, y), y)

class PixelCNN(nn.Module):  # the original of 2016a; its masks leave a blind spot up-right
    def __init__(self, C, p, n_layers, k, classes):
        super().__init__()
        self.inp = MaskedConv2d(C, p, 7, (3, 3), "A", C)
        self.convs = nn.ModuleList(MaskedConv2d(p, p, k, (k // 2, k // 2), "B", C, classes)
                                   for _ in range(n_layers))
        self.outs = nn.ModuleList(pointwise(p, p, C) for _ in range(n_layers))
        self.reach = 3 + (k // 2) * n_layers
    def forward(self, x, y):  # [B, C, H, W] in [-1, 1] -> features [B, p, H, W]
        h = self.inp(x)
        for conv, out in zip(self.convs, self.outs):  # residual blocks, after fig. 5 of 2016a
            h = h + out(conv(h.relu(), y).relu())
        return h

def logistic_mix_logp(params, v):  # log P(v) of v in 0..255 [B, *S]; params [B, 3K, *S] -> [B, *S]
    params = params.unflatten(1, (3, -1))  # [B, 3, K, *S]: the logits of pi, mu and log s
    mu = params[:, 1]  # K logistics, discretized into 256 bins on [-1, 1] (Salimans et al., eq. 2)
    log_s = params[:, 2].clamp(min=-7.0)
    x = v.unsqueeze(1) / 127.5 - 1  # the bin centres -1, -1 + 2/255, ..., 1
    inv_s = (-log_s).exp()
    mid = inv_s * (x - mu)  # where the bin mass underflows: the density at the centre times 2/255
    plus = mid + inv_s / 255  # the bin's upper edge
    minus = mid - inv_s / 255  # and its lower edge
    cdf_delta = plus.sigmoid() - minus.sigmoid()
    log_pdf_mid = mid - log_s - 2 * F.softplus(mid) - math.log(127.5)
    log_mid = torch.where(cdf_delta > 1e-5, cdf_delta.clamp(min=1e-12).log(), log_pdf_mid)
    log_inner = torch.where(x > 0.999, F.logsigmoid(-minus), log_mid)  # bin 255: [edge, inf)
    logp = torch.where(x < -0.999, F.logsigmoid(plus), log_inner)  # bin 0: (-inf, edge]
    return (logp + params[:, 0].log_softmax(1)).logsumexp(1)

def pick(logp, u):  # inverse-CDF draws: logp [B, L], u [B] uniform in [0, 1) -> [B] in 0..L-1
    cdf = logp.softmax(-1).cumsum(-1)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1)  # scaled by cdf[-1]: never past L - 1

class Model(nn.Module):  # the network, its head and the distribution of L = --levels values
    def __init__(self, cfg, shape, classes=10):  # shape: (C, H, W); classes: of the labels
        super().__init__()
        self.cfg = cfg
        self.shape = shape
        self.classes = classes if cfg.conditional else 0
        self.L = cfg.levels
        n_out = 3 * cfg.n_mix if cfg.output == "logistic_mix" else cfg.levels  # per channel
        C, p = shape[0], cfg.hidden
        net = GatedPixelCNN if cfg.arch == "gated" else PixelCNN
        self.net = net(C, p, cfg.n_layers, cfg.kernel, self.classes)
        head = [nn.ReLU(), pointwise(p, p, C), nn.ReLU(), pointwise(p, n_out * C, C)]
        self.head = nn.Sequential(*head)  # parameter t of channel c at index t * C + c
    def quantize(self, x):  # uint8 0..255 -> 0..L-1
        return x.long() * self.L // 256
    def net_input(self, q):  # 0..L-1 -> [-1, 1]
        return q * (2 / (self.L - 1)) - 1
    def logp(self, out, q=None):  # out [B, n_out * C, H, W] -> log p of q [B, C, H, W], or of all
        out = out.to(torch.get_default_dtype())  # float32 (float64 in tests), also under autocast
        out = out.unflatten(1, (-1, self.shape[0]))  # [B, n_out, C, H, W]
        if self.cfg.output == "softmax":
            logp = out.log_softmax(1)  # every value: [B, L, C, H, W]
            return logp if q is None else logp.gather(1, q.unsqueeze(1)).squeeze(1)
        if q is None:  # every value along a new dim 2: [B, 3K, L, C, H, W] by broadcasting
            q = torch.arange(self.L, device=out.device).view(1, -1, 1, 1, 1)
            out = out.unsqueeze(2)
        return logistic_mix_logp(out, q)
    def forward(self, x, y):  # uint8 x [B, C, H, W], labels y [B] -> exact -log2 p(x) / D
        q = self.quantize(x)
        out = self.head(self.net(self.net_input(q), y))  # [B, n_out * C, H, W]
        bpd = -self.logp(out, q).mean() / math.log(2)  # log p: nats [B, C, H, W]
        return bpd, {"bpd": bpd.detach()}
    @torch.inference_mode()
    def sample(self, n, generator):  # n uint8 images [n, C, H, W], of the classes in turn
        u = torch.rand(n, *self.shape, device=generator.device, generator=generator)
        y = torch.arange(n, device=u.device) % max(1, self.classes)
        x = torch.full_like(u, -1.0)  # the values not drawn yet (never seen, by the masks)
        gated = isinstance(self.net, GatedPixelCNN)
        for i in range(self.shape[1]):
            rows = x[:, :, max(0, i - self.net.reach):i + 1]  # a view: the rows that reach row i
            if gated:  # its vertical stack sees only rows above: once per row
                pres = [v_pre[:, :, -1:] for v_pre in self.net.vertical(rows, y)]
                rows = rows[:, :, -1:]  # and its horizontal stack only row i
            for j in range(self.shape[2]):
                for c in range(self.shape[0]):  # value by value, by inverse-CDF draws from u
                    h = self.net.horizontal(rows, pres, y) if gated else self.net(rows, y)
                    out = self.head(h[:, :, -1:, j:j + 1])  # the parameters at pixel (i, j)
                    logp = self.logp(out)[:, :, c, 0, 0]  # [n, L]
                    x[:, c, i, j] = self.net_input(pick(logp, u[:, c, i, j]))
        return ((x + 1) * 127.5).round().to(torch.uint8)  # level q at 255 q / (L - 1)

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

def binarize(x, generator):  # uint8 images -> 0 or 255, with P(255) = pixel / 255 (binarized MNIST)
    u = torch.rand(x.shape, device=x.device, generator=generator)
    return (u < x / 255).to(torch.uint8) * 255

@torch.inference_mode()
def evaluate(model, x_test, y_test, cfg):  # the exact test bits/dim, and samples.png
    n = cfg.test_images or len(x_test)  # the first n test images; 0: all of them
    batches = progress(cfg, "test bits/dim", list(zip(x_test[:n].split(128), y_test[:n].split(128))))
    bits = sum(model(x, y)[0].item() * len(x) for x, y in batches)  # small: the logits stay in cache
    imgs, rate = draw(model, cfg.n_samples, cfg, cfg.seed)
    nrow = model.classes or 8  # conditional: a column per class
    torchvision.utils.save_image(imgs / 255, f"{cfg.out_dir}/samples.png", nrow=nrow)
    kind = "exact" if cfg.levels == 256 else f"exact, quantized to {cfg.levels} levels"
    kind = "exact, binarized (the test split once, seed 0)" if cfg.binarize else kind
    kind += ", conditional on the true class" if cfg.conditional else ""
    kind += f", the first {n} test images" if n < len(x_test) else ""
    nats = bits / n * x_test[0].numel() * math.log(2)  # -log p(x) per image, as binarized MNIST's papers
    return {"test_bpd": bits / n, "test_nats": nats, "test_bpd_kind": kind, "test_images": n,
            "sample_images_per_s": rate}

def draw(model, n, cfg, seed):  # n uint8 samples [n, C, H, W] -> samples.npz; and images/s
    g = torch.Generator(model.head[-1].weight.device).manual_seed(seed)  # training's untouched
    t0 = time.perf_counter()
    chunk = 500 if g.device.type == "cuda" else 50  # a progress line per chunk on a slow device
    starts = progress(cfg, f"{n} samples", range(0, n, chunk))
    imgs = torch.cat([model.sample(min(chunk, n - i), g) for i in starts]).cpu()
    np.savez_compressed(f"{cfg.out_dir}/samples.npz", images=imgs.numpy())
    return imgs, n / (time.perf_counter() - t0)

@dataclasses.dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10 | stl10 | folder
    data_dir: str = "./data"  # torchvision's root (<data_dir>/MNIST/raw/...), or the folder
    image_size: int = 32  # stl10 and folder images are resized to it once (others keep theirs)
    out_dir: str = "out/pixelcnn-{dataset}"  # everything of the run
    arch: str = "gated"  # gated (vertical and horizontal stacks) | pixelcnn (the original)
    output: str = "softmax"  # softmax over --levels values per channel | logistic_mix (levels 256)
    levels: int = 256  # intensity levels per channel, 2..256: x -> x * levels // 256
    binarize: bool = False  # x ~ Bernoulli(pixel / 255), fresh each batch, test split once; sets levels 2
    n_mix: int = 5  # logistic mixture components (logistic_mix)
    conditional: bool = False  # a learned class bias in every layer; samples.png: class by column
    hidden: int = 96  # channels p of each stack (on RGB a multiple of 3: the R/G/B groups)
    n_layers: int = 12  # gated layers (gated) or residual blocks (pixelcnn)
    kernel: int = 5  # k of the k x k masked convs (odd); pixelcnn's first conv is 7x7
    max_steps: int = 20000  # optimizer steps
    batch_size: int = 64  # images per step (per process under torchrun)
    lr: float = 1e-3  # Adam, after a warmup of min(200, max_steps / 10) steps; cosine to lr / 10
    ema: float = 0.9995  # Polyak averaging: the decay of the weights' average that is evaluated; 0: off
    seed: int = 0
    eval_every: int = 2000  # steps between exact test bits/dim, pictures and checkpoints
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in samples.png
    test_images: int = None  # the first N test images for test_bpd; 0: all
    fid_samples: int = None  # samples for FID / precision / recall; 0 skips them

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "stl10": "STL10",
            "folder": None}  # folder: the images under --data_dir
CHOICES = {"dataset": tuple(DATASETS), "dtype": ("float32", "bfloat16"),
           "arch": ("gated", "pixelcnn"), "output": ("softmax", "logistic_mix")}
ARCH = ("dataset", "image_size", "arch", "output", "levels", "binarize", "n_mix", "conditional",
        "hidden", "n_layers", "kernel")
# Config fields left None: (on CUDA, elsewhere)
BY_DEVICE = {"test_images": (0, 1000), "fid_samples": (2000, 200)}

def check(cfg):  # what setup's generic checks cannot know: each would give wrong numbers
    if cfg.binarize:
        cfg.levels = 2  # black or white: a Bernoulli per pixel, as a 2-way softmax
    if not 2 <= cfg.levels <= 256 or (cfg.output == "logistic_mix" and cfg.levels != 256):
        fail(f"--levels must be in 2..256, and 256 for --output logistic_mix; got {cfg.levels}")
    if cfg.dataset not in ("mnist", "fashion") and cfg.hidden % 3:
        fail(f"--hidden must be a multiple of 3 on RGB images (the R/G/B groups), got {cfg.hidden}")
    if cfg.n_samples < 1:
        fail(f"--n_samples must be >= 1, got {cfg.n_samples}")

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
    check(cfg)
    x_train, y_train = (t.to(device) for t in load_split(cfg, train=True))
    x_test, y_test = (t.to(device) for t in load_split(cfg, train=False))
    if cfg.binarize:  # the test split binarized once, with a fixed seed: the same in every run
        x_test = binarize(x_test, torch.Generator(device).manual_seed(0))
    torch.manual_seed(cfg.seed + RANK)  # DDP gives every rank rank 0's initial weights
    model = Model(cfg, x_train.shape[1:], int(y_train.max()) + 1).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  # the Polyak average (both official codes)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * RANK)  # the batches
    step, curves = 0, {"train": [], "test": []}  # curves: (step, bits/dim) pairs for loss.png
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt.get("ema", ckpt["model"]))  # older files: the average starts anew
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
    res = {}  # the last evaluation
    worst = 2 * math.log2(cfg.levels)  # twice a uniform model's bits/dim: diverged, if finite
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        idx = torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)
        warmup = min(1, (step + 1) / min(200, max(1, cfg.max_steps // 10)))  # linear
        decay = 0.55 + 0.45 * math.cos(math.pi * step / cfg.max_steps)  # cosine from 1 to 0.1
        opt.param_groups[0]["lr"] = cfg.lr * warmup * decay
        x = binarize(x_train[idx], g) if cfg.binarize else x_train[idx]  # dynamic binarization
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss, _ = fwd(x, y_train[idx])  # bits/dim; labels matter if conditional
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # a short run averages over fewer steps
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)  # ema += (1 - decay) (w - ema)
        step += 1
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            curves["train"].append((step, loss.item()))  # the device syncs at log steps only
            stop_if_diverged(cfg, step, loss.detach(), worst=worst)  # every rank, before it is saved
            speed = (step - start) * cfg.batch_size * WORLD / t_train
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start) / 60
            log(cfg, f"step {step}/{cfg.max_steps} | loss {loss.item():.4f} bits/dim"
                f" | {speed:.0f} img/s | eta {eta:.1f}m")
        if RANK == 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            res = evaluate(ema, x_test, y_test, cfg)  # and samples.png
            curves["test"].append((step, res["test_bpd"]))
            log(cfg, f"eval step {step} | test {res['test_bpd']:.4f} bits/dim (ema)")
            save_checkpoint(cfg, step, curves["test"][-1][1], worst, model=model.state_dict(),
                            ema=ema.state_dict(), optimizer=opt.state_dict(), curves=curves,
                            rng=g.get_state(), train_images_per_s=speed)
    if WORLD > 1:
        torch.distributed.destroy_process_group()
    if RANK != 0:
        return {}
    res = res or evaluate(ema, x_test, y_test, cfg)  # --eval_only: not evaluated yet
    if cfg.fid_samples:
        imgs, res["sample_images_per_s"] = draw(ema, cfg.fid_samples, cfg, cfg.seed + 2)
        res |= fid_metrics(imgs, cfg, device)
    res |= {"steps": step, "wall_s": time.perf_counter() - t0, "device": str(device)}
    res["train_images_per_s"] = speed if step > start else ckpt["train_images_per_s"]
    return finish(cfg, res, curves, ["test_bpd", "fid"])

if __name__ == "__main__":
    main()
