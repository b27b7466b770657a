"""VQ-VAE (van den Oord et al. 2017): a residual conv encoder maps an image (28x28 padded to 32x32;
64x64 halved once more) to an 8x8 grid of vectors z, each replaced by the nearest of K codebook
vectors e (straight-through) and a decoder maps the grid back. Loss (eq. 3): MSE + ||sg(z) - e||^2
+ beta ||z - sg(e)||^2; --ema (default) learns e by moving averages instead (app. A.1).
Deviations: MSE on [-1, 1] pixels, warmup and cosine lr, codes unused for 20 steps re-seeded.
prior_transformer.py models its codes.pt.
    python vqvae.py --dataset mnist --data_dir ../shared/data
"""
import argparse
import dataclasses
import inspect
import hashlib
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
class VectorQuantizer(nn.Module):  # nearest of K codes, straight-through, EMA codebook, restarts
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        K = cfg.codebook_size
        codebook = torch.empty(K, cfg.code_dim).uniform_(-1 / K, 1 / K)
        self.codebook = nn.Parameter(codebook, requires_grad=not cfg.ema)  # [K, d]
        self.register_buffer("ema_count", torch.ones(K))  # N_i: moving average of the code's counts
        self.register_buffer("ema_sum", codebook.clone())  # m_i: of the sums of the z given to it
        self.register_buffer("unused_steps", torch.full((K,), 20))  # from 20: first batch seeds
    def nearest(self, z):  # z [..., d] -> index [...] of the nearest code
        dist = torch.cdist(z.flatten(0, -2), self.codebook)  # [M, K]; autocast keeps cdist float32
        return dist.argmin(-1).view(z.shape[:-1])
    def forward(self, z):  # z [B, H, W, d] -> z_q [B, H, W, d], the VQ loss
        codes = self.nearest(z)
        e = self.codebook[codes]  # [B, H, W, d]
        # eq. (3): the codebook loss moves only the codes (a constant under EMA), beta's only z
        loss = F.mse_loss(e, z.detach()) + self.cfg.beta * F.mse_loss(z, e.detach())
        if self.training:
            self.update(z.flatten(0, 2), codes.flatten())
        return z + (e - z).detach(), loss  # straight-through: forward e, backward the identity to z
    @torch.no_grad()
    def update(self, z, codes):  # the EMA codebook step (app. A.1), then dead-code restarts
        onehot = F.one_hot(codes, len(self.codebook)).float()  # [M, K]: which code each z took
        counts = onehot.sum(0)  # n_i
        sums = onehot.t() @ z  # [K, d]: the sum of the z assigned to each code
        new = z[torch.randint(len(z), counts.shape, device=z.device)]  # [K, d]: restart candidates
        if WORLD > 1:  # under torchrun: the same statistics, so the same codebook, on every rank
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
            torch.distributed.broadcast(new, 0)
        if self.cfg.ema:
            self.ema_count.lerp_(counts, 0.01)  # N_i <- gamma N_i + (1 - gamma) n_i, gamma = 0.99
            self.ema_sum.lerp_(sums, 0.01)  # m_i, the same way
            n = self.ema_count.sum()
            N = (self.ema_count + 1e-5) / (n + len(counts) * 1e-5) * n  # Laplace smoothing: N_i > 0
            self.codebook.copy_(self.ema_sum / N[:, None])  # e_i = m_i / N_i
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = self.unused_steps >= 20  # re-seeded from random encoder outputs (where: no sync)
        self.codebook.copy_(torch.where(dead[:, None], new, self.codebook))
        self.ema_sum.copy_(torch.where(dead[:, None], new, self.ema_sum))
        self.ema_count.masked_fill_(dead, 1.0)
        self.unused_steps.masked_fill_(dead, 0)

class ResBlock(nn.Sequential):  # x + conv1x1(relu(conv3x3(relu(x)))), the paper's residual block
    def __init__(self, c, h):  # c channels, h inside
        super().__init__(nn.ReLU(), nn.Conv2d(c, h, 3, 1, 1), nn.ReLU(), nn.Conv2d(h, c, 1))
    def forward(self, x):
        return x + super().forward(x)

class VQVAE(nn.Module):  # encoder -> VectorQuantizer -> decoder, on uint8 images
    def __init__(self, cfg):
        super().__init__()
        grey = cfg.dataset in ("mnist", "fashion")
        channels = 1 if grey else 3
        self.pad = 2 if grey else 0  # 28x28 is padded to 32x32
        size = 32 if grey or cfg.dataset == "cifar10" else cfg.image_size  # after the padding
        h, r = cfg.hidden, cfg.res_hidden
        down = [nn.Conv2d(channels, h, 4, 2, 1), nn.ReLU()]
        up = [nn.ReLU(), nn.ConvTranspose2d(h, channels, 4, 2, 1)]
        for _ in range(int(math.log2(size // 8)) - 1):  # halved to 8x8: twice at 32, 3x at 64
            down += [nn.Conv2d(h, h, 4, 2, 1), nn.ReLU()]
            up = [nn.ReLU(), nn.ConvTranspose2d(h, h, 4, 2, 1)] + up  # 8x8 -> 16x16 -> ...
        self.encoder = nn.Sequential(*down, nn.Conv2d(h, h, 3, 1, 1), ResBlock(h, r),
                                     ResBlock(h, r), nn.ReLU(), nn.Conv2d(h, cfg.code_dim, 1))
        self.decoder = nn.Sequential(nn.Conv2d(cfg.code_dim, h, 3, 1, 1), ResBlock(h, r),
                                     ResBlock(h, r), *up)
        self.vq = VectorQuantizer(cfg)
    def encode(self, x):  # uint8 [B, C, h, w] -> z [B, 8, 8, d]; padded black, pixels on [-1, 1]
        z = self.encoder(F.pad(x, [self.pad] * 4).float() / 127.5 - 1)
        return z.permute(0, 2, 3, 1).float()  # a vector per grid position, float32 under bf16
    def decode(self, z_q):  # [B, 8, 8, d] -> [B, C, h, w] on [-1, 1] (unclamped), padding cropped
        return F.pad(self.decoder(z_q.permute(0, 3, 1, 2)), [-self.pad] * 4)  # a negative pad crops
    def forward(self, x):  # eq. (3) for uint8 x [B, C, h, w]; stats: mse on [0, 1] pixels
        z_q, vq_loss = self.vq(self.encode(x))
        mse = F.mse_loss(self.decode(z_q).float(), x / 127.5 - 1)  # on [-1, 1]: 4x larger
        return mse + vq_loss, {"mse": mse.detach() / 4}
    def encode_codes(self, x):  # uint8 [N, C, h, w] -> the nearest codes [N, 8, 8]
        return torch.cat([self.vq.nearest(self.encode(xb)) for xb in x.split(500)])
    @torch.no_grad()
    def decode_codes(self, codes):  # int [N, 8, 8] -> images [N, C, h, w] in [0, 1]
        x = torch.cat([self.decode(self.vq.codebook[c.long()]) for c in codes.split(500)])
        return (x / 2 + 0.5).clamp(0, 1)
    def sample(self, n, codes, generator=None):  # no prior: each position's code drawn on its own,
        i = torch.randint(len(codes), (n, 8, 8), device=codes.device, generator=generator)
        return self.decode_codes(codes.gather(0, i))  # from that position of a random grid in codes

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
def evaluate(model, x_test, cfg, n=0):  # the whole split; recon.png, samples_independent.png, npz
    n = min(n, len(x_test))  # FID images: as many reconstructions as there are test images
    batches = progress(cfg, "test reconstructions", x_test.split(2000))
    codes = torch.cat([model.encode_codes(xb) for xb in batches])  # [N, 8, 8]
    recon = model.decode_codes(codes)  # [N, C, h, w] in [0, 1]
    mse = F.mse_loss(recon, x_test / 255).item()
    usage = torch.bincount(codes.flatten(), minlength=cfg.codebook_size)
    p = usage / codes.numel()  # how often each code is used
    res = {"test_mse": mse, "test_psnr_db": -10 * math.log10(mse)}
    res["codes_used"] = int((p > 0).sum())
    res["code_perplexity"] = torch.special.entr(p).sum().exp().item()  # exp(entropy of the usage)
    torchvision.utils.save_image(torch.cat([x_test[:32] / 255, recon[:32]]), f"{cfg.out_dir}/recon.png")
    g = torch.Generator(x_test.device).manual_seed(cfg.seed)  # the same draws at every eval
    independent = model.sample(max(n, cfg.n_samples), codes, g)  # they show why a prior is needed
    torchvision.utils.save_image(independent[:cfg.n_samples], f"{cfg.out_dir}/samples_independent.png")
    imgs = (torch.stack([recon[:n], independent[:n]]) * 255).round().byte().cpu()  # n each, for FID
    np.savez_compressed(f"{cfg.out_dir}/samples.npz", images=imgs[0], independent=imgs[1])
    return res, imgs

def write_codes(model, cfg, x_train, x_test):  # codes.pt, what prior_transformer.py learns from
    small = torch.int16 if cfg.codebook_size <= 32767 else torch.int32
    def encode(x):  # uint8 [N, C, H, W] -> int16 codes [N, 8, 8] (int32 if K > 32767)
        batches = progress(cfg, f"codes of {len(x)} images", x.split(5000))
        codes = [model.encode_codes(xb) for xb in batches]
        return torch.cat(codes).to("cpu", small)
    ckpt = f"{cfg.out_dir}/ckpt.pt"
    codes = {"format": "vqvae-codes-v1", "dataset": cfg.dataset, "codebook_size": cfg.codebook_size,
             "grid": [8, 8], "train": encode(x_train), "test": encode(x_test),
             "train_flip": None if cfg.dataset == "mnist" else encode(x_train.flip(-1)),  # mirrored
             "train_labels": load_split(cfg, train=True)[1],  # int64 [N]
             "test_labels": load_split(cfg, train=False)[1],
             "vqvae_ckpt": os.path.abspath(ckpt), "vqvae_sha256": file_fingerprint(ckpt)}
    torch.save(codes, f"{cfg.out_dir}/codes.tmp")
    os.replace(f"{cfg.out_dir}/codes.tmp", f"{cfg.out_dir}/codes.pt")  # never half-written

def file_fingerprint(path):  # sha256 hex of a file's bytes: ties codes.pt to its checkpoint
    with open(path, "rb") as f:  # read whole: a checkpoint is a few MB, and torch.load reads it all
        return hashlib.sha256(f.read()).hexdigest()

def load_vqvae(ckpt_path, device="cpu"):  # for prior_transformer.py: ckpt.pt's model, in eval mode
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model = VQVAE(Config(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # missing, corrupt or not from vqvae.py
        fail(f"cannot load the VQ-VAE checkpoint {ckpt_path} ({type(e).__name__})")
    return model.to(device).eval()

@dataclasses.dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10 | stl10 | folder
    data_dir: str = "./data"  # torchvision's root (<data_dir>/MNIST/raw/...), or the folder
    image_size: int = 32  # stl10 and folder images are resized to it once (others keep theirs)
    out_dir: str = "out/vqvae-{dataset}"  # everything of the run
    hidden: int = 128  # channels of the convolutions
    res_hidden: int = 64  # channels inside a residual block
    codebook_size: int = 512  # K codes
    code_dim: int = 64  # d, the size of one code vector
    beta: float = 0.25  # commitment weight, on the encoder side
    ema: bool = True  # codebook by moving averages (decay 0.99) instead of the codebook loss
    max_steps: int = 20000  # optimizer steps
    batch_size: int = 128  # images per step (per process under torchrun)
    lr: float = 1e-3  # Adam, after min(200, max_steps/10) warmup steps; cosine to lr/10
    seed: int = 0
    eval_every: int = 2000  # steps between test evaluations, pictures and checkpoints
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only; the quantizer stays float32)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    write_codes: bool = False  # with --eval_only: also write codes.pt (training always does)
    n_samples: int = 64  # images in samples_independent.png
    fid_samples: int = 10000  # test reconstructions (and independent samples) scored; 0 skips

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "stl10": "STL10",
            "folder": None}  # folder: the images under --data_dir
CHOICES = {"dataset": tuple(DATASETS), "dtype": ("float32", "bfloat16")}
ARCH = ("dataset", "image_size", "hidden", "res_hidden", "codebook_size", "code_dim",
        "ema")  # fixed by ckpt.pt
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
    if cfg.dataset in ("stl10", "folder") and cfg.image_size not in (16, 32, 64, 128):
        fail(f"--image_size must be 16, 32, 64 or 128 (halved to an 8x8 grid), not {cfg.image_size}")
    x_train = load_split(cfg, train=True)[0].to(device)  # all on the device
    x_test = load_split(cfg, train=False)[0].to(device)
    torch.manual_seed(cfg.seed + RANK)  # DDP gives every rank rank 0's initial weights
    model = VQVAE(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # the EMA codebook has no gradient
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * RANK)  # batches and flips
    step, curves = 0, {"train": [], "test": []}  # curves: (step, mse on [0, 1] pixels) for loss.png
    if ckpt:
        model.load_state_dict(ckpt["model"])
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
        if cfg.dataset != "mnist":  # horizontal flips (digits are not mirror-symmetric)
            flip = torch.rand(len(x), 1, 1, 1, device=device, generator=g) < 0.5
            x = torch.where(flip, x.flip(3), x)
        warmup = min(1.0, (step + 1) / min(200, cfg.max_steps // 10 + 1))  # or codes get stranded
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup * (0.55 + 0.45 * math.cos(math.pi * step / cfg.max_steps))
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss, stats = fwd(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            curves["train"].append((step, stats["mse"].item()))  # the device syncs at log steps
            stop_if_diverged(cfg, step, loss.detach())  # on every rank, before a diverged model is saved
            speed = (step - start) * cfg.batch_size * WORLD / t_train
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start) / 60
            log(cfg, f"step {step}/{cfg.max_steps} | loss {loss.item():.4f} | mse {stats['mse'].item():.5f}"
                f" | {speed:.0f} img/s | eta {eta:.1f}m")
        if RANK == 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            res = evaluate(model, x_test, cfg)[0]
            curves["test"].append((step, res["test_mse"]))
            log(cfg, f"eval step {step} | test mse {res['test_mse']:.5f} | {res['codes_used']} codes")
            save_checkpoint(cfg, step, curves["test"][-1][1], model=model.state_dict(),
                            optimizer=opt.state_dict(), curves=curves, rng=g.get_state(),
                            train_images_per_s=speed)
    if WORLD > 1:
        torch.distributed.destroy_process_group()
    if RANK != 0:
        return {}
    if not cfg.eval_only or cfg.write_codes:  # first: a kill in the slow metrics keeps them in step
        write_codes(model, cfg, x_train, x_test)
    res, imgs = evaluate(model, x_test, cfg, n=cfg.fid_samples)
    if cfg.fid_samples:  # the reconstructions' FID: the best any prior over these codes can reach
        res |= fid_metrics(imgs[0], cfg, device)
        res["fid_independent"] = fid_metrics(imgs[1], cfg, device).get("fid")
    res |= {"steps": step, "wall_s": time.perf_counter() - t0, "device": str(device)}
    res["train_images_per_s"] = speed if step > start else ckpt["train_images_per_s"]
    return finish(cfg, res, curves, ["test_mse", "codes_used", "code_perplexity", "fid"])

if __name__ == "__main__":
    main()
