"""Variational autoencoder (Kingma & Welling 2014) with beta-VAE (Higgins et al. 2017) and the IWAE
bound (Burda et al. 2016). q(z|x) = N(mu, diag(sigma^2)) is a small CNN, p(x|z) a transposed CNN with
one of four likelihoods (--likelihood): bernoulli (with --binarize: binarized data), gaussian_fixed_sigma,
gaussian_learned_sigma (Rybkin et al. 2021) or logistic (default), 256 discretized logistic bins, so that
-ELBO / (D log 2) bounds the bits/dim. Deviations: conv nets, not MLPs; pictures show decoder means.
    python vae.py --dataset fashion
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
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps  # torchvision's dependency

# --------------------------------------------------------------------------- model
class VAE(nn.Module):
    def __init__(self, cfg, channels, size):
        super().__init__()
        self.cfg = cfg
        h, s = cfg.hidden, size // 4  # two stride-2 convs: 28 -> 14 -> 7, 32 -> 16 -> 8
        n_out = 2 if cfg.likelihood == "logistic" else 1  # logistic: a mean and a log-scale per pixel
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, h, 4, 2, 1), nn.SiLU(), nn.Conv2d(h, 2 * h, 4, 2, 1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * h * s * s, 512), nn.SiLU(),
            nn.Linear(512, 2 * cfg.latent_dim))  # one head: mu and log sigma^2
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dim, 512), nn.SiLU(), nn.Linear(512, 2 * h * s * s), nn.SiLU(),
            nn.Unflatten(1, (2 * h, s, s)), nn.ConvTranspose2d(2 * h, h, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(h, channels * n_out, 4, 2, 1))
        log_sigma = torch.full((channels, 1, 1), math.log(cfg.sigma))  # the Gaussians' std per channel
        self.log_sigma = nn.Parameter(log_sigma, requires_grad=cfg.likelihood == "gaussian_learned_sigma")
    def encode(self, x):  # x: float [B, C, H, W] in [0, 1]
        return self.encoder(2 * x - 1).chunk(2, dim=1)  # mu, logvar: [B, latent] each
    def log_px_given_z(self, x, out):  # log p(x|z) in nats per image; out = decoder(z)
        if self.cfg.likelihood == "bernoulli":  # a proper likelihood when x is binary
            logp = -F.binary_cross_entropy_with_logits(out, x, reduction="none")
        elif self.cfg.likelihood == "logistic":  # out: a mean and a log-scale per pixel
            logp = discretized_logistic_logp(x, *out.chunk(2, dim=1))
        else:  # log N(x; sigmoid(out), sigma^2)
            u = (x - torch.sigmoid(out)) / self.log_sigma.exp()
            logp = -0.5 * u ** 2 - self.log_sigma - 0.5 * math.log(2 * math.pi)
        return logp.flatten(1).sum(1)
    def decode(self, z):  # the decoder's mean image in [0, 1]: what the pictures show
        out = self.decoder(z)
        if self.cfg.likelihood == "logistic":  # its mean is on [-1, 1]
            return (out.chunk(2, dim=1)[0].clamp(-1, 1) + 1) / 2
        return torch.sigmoid(out)
    def forward(self, x, generator=None):  # -beta-ELBO, and its terms at beta = 1, nats per image
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, device=mu.device, generator=generator)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterization (sec. 2.4)
        rec = self.log_px_given_z(x, self.decoder(z).float())  # float32 under autocast
        kl = gaussian_kl(mu.float(), logvar.float())
        loss = (self.cfg.beta * kl - rec).mean()
        return loss, {"rec": -rec.mean().detach(), "kl": kl.mean().detach()}
    def log_weights(self, x, eps):  # IWAE's log w_k = log p(x|z_k) p(z_k) / q(z_k|x): [K, B]
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps  # eps [K, B, latent]
        rec = self.log_px_given_z(x.repeat(len(eps), 1, 1, 1), self.decoder(z.flatten(0, 1)))
        log_pz_over_qz = 0.5 * (eps ** 2 + logvar - z ** 2).sum(-1)  # the log(2 pi) terms cancel
        return rec.view(eps.shape[:2]) + log_pz_over_qz
    @torch.inference_mode()
    def sample(self, n, generator=None):  # n decoder means in [0, 1] from z ~ N(0, I)
        z = torch.randn(n, self.cfg.latent_dim, device=self.log_sigma.device, generator=generator)
        return self.decode(z)

def gaussian_kl(mu, logvar):  # KL(N(mu, sigma^2) || N(0, I)), summed over latents (app. B)
    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)

def discretized_logistic_logp(x, mean, log_scale):  # of 8-bit x in [0, 1] (Salimans et al., eq. 2)
    x = 2 * x - 1  # 256 bins centred on -1, -1 + 2/255, ..., 1; the edge bins take the tails
    log_scale = log_scale.clamp(min=-7.0)
    inv_s = torch.exp(-log_scale)
    plus = inv_s * (x - mean + 1 / 255)  # the bin's upper edge
    minus = inv_s * (x - mean - 1 / 255)  # and its lower edge
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * (x - mean)  # where the bin mass underflows: density at the centre times 2/255
    log_pdf_mid = mid - log_scale - 2 * F.softplus(mid) - math.log(127.5)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    log_inner = torch.where(x > 0.999, F.logsigmoid(-minus), log_mid)  # bin 255 takes [edge, inf)
    return torch.where(x < -0.999, F.logsigmoid(plus), log_inner)  # bin 0 takes (-inf, edge]

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

def to_input(x, cfg, generator=None):  # uint8 -> [0, 1]; --binarize: a fresh Bernoulli draw
    x = x.float() / 255
    return torch.bernoulli(x, generator=generator) if cfg.binarize else x

@torch.inference_mode()
def evaluate(model, x_test, cfg, iwae_k=0):  # test -ELBO terms (beta = 1), active units, IWAE
    g = torch.Generator(x_test.device).manual_seed(cfg.seed + 1)
    rec = kl = 0.0
    mus = []
    for xb in progress(cfg, "test ELBO", x_test.split(500)):
        x = to_input(xb, cfg, g)
        stats = model(x, g)[1]
        rec += stats["rec"].item() * len(x) / len(x_test)
        kl += stats["kl"].item() * len(x) / len(x_test)
        mus.append(model.encode(x)[0])
    res = {"test_rec_nats": rec, "test_kl_nats": kl, "test_elbo_nats": rec + kl}
    res["active_units"] = int((torch.cat(mus).var(0) > 0.01).sum())  # Burda et al. sec. 5.2
    nll = res["test_elbo_nats"]  # -ELBO: an upper bound on -log p(x)
    if iwae_k > 0:  # -log p(x) ~ -log (1/K) sum_k w_k (Burda et al. 2016, eq. 8)
        xs = x_test[: cfg.iwae_images or len(x_test)]
        nll = 0.0
        batches = xs.split(max(1, 4096 // iwae_k))  # about 4096 decoder passes at a time
        for xb in progress(cfg, f"IWAE-{iwae_k}", batches):
            x = to_input(xb, cfg, g)
            eps = torch.randn(iwae_k, len(x), cfg.latent_dim, device=x.device, generator=g)
            log_px = torch.logsumexp(model.log_weights(x, eps), 0) - math.log(iwae_k)
            nll -= log_px.sum().item() / len(xs)
        res |= {f"test_iwae{iwae_k}_nats": nll, "iwae_test_images": len(xs)}
    if cfg.likelihood == "logistic":  # a discrete likelihood of the 8-bit data
        res["test_bpd"] = nll / (x_test[0].numel() * math.log(2))
        res["test_bpd_kind"] = f"iwae-{iwae_k}" if iwae_k else "elbo"
    return res

@torch.inference_mode()
def save_samples(model, x_test, cfg, n=0):  # recon.png, samples.png; n more -> samples.npz
    g = torch.Generator(x_test.device).manual_seed(cfg.seed)
    x = to_input(x_test[: max(1, cfg.n_samples // 2)], cfg, g)
    recon = model.decode(model.encode(x)[0])  # through the posterior mean
    torchvision.utils.save_image(torch.cat([x, recon]), f"{cfg.out_dir}/recon.png")
    torchvision.utils.save_image(model.sample(cfg.n_samples, g), f"{cfg.out_dir}/samples.png")
    t0 = time.perf_counter()
    imgs = (model.sample(n, g) * 255).round().to(torch.uint8).cpu()
    if n > 0:
        np.savez_compressed(f"{cfg.out_dir}/samples.npz", images=imgs.numpy())
    return imgs, n / (time.perf_counter() - t0)  # and samples per second

@dataclasses.dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10 | stl10 | folder
    data_dir: str = "./data"  # torchvision's root (<data_dir>/MNIST/raw/...), or the folder
    image_size: int = 32  # stl10 and folder images are resized to it once (others keep theirs)
    out_dir: str = "out/vae-{dataset}"  # everything of the run
    likelihood: str = "logistic"  # p(x|z), see the docstring
    binarize: bool = False  # binarize every batch anew (with bernoulli: binarized MNIST)
    sigma: float = 0.1  # decoder std on [0, 1] pixels: fixed, or the start of a learned one
    beta: float = 1.0  # weight of the KL term; evaluation reports the beta = 1 ELBO
    latent_dim: int = 32  # dimensions of z
    hidden: int = 64  # channels of the first conv (the second has twice as many)
    max_steps: int = 20000  # optimizer steps
    batch_size: int = 128  # images per step (per process under torchrun)
    lr: float = 1e-3  # Adam, after the warmup
    warmup_steps: int = 200  # linear learning-rate warmup
    seed: int = 0
    eval_every: int = 2000  # steps between test ELBOs, pictures and checkpoints
    log_every: int = 100  # steps between progress lines
    iwae_k: int = 1000  # importance samples of the final IWAE bound; 0 skips it
    iwae_images: int = None  # first N test images for the IWAE bound; 0: all
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in samples.png
    fid_samples: int = 10000  # samples for FID / precision / recall; 0 skips them

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "stl10": "STL10",
            "folder": None}  # folder: the images under --data_dir
CHOICES = {"dataset": tuple(DATASETS), "dtype": ("float32", "bfloat16"),
           "likelihood": ("bernoulli", "gaussian_fixed_sigma", "gaussian_learned_sigma", "logistic")}
ARCH = ("dataset", "image_size", "likelihood", "binarize", "sigma", "latent_dim",
        "hidden")  # fixed by ckpt.pt
BY_DEVICE = {"iwae_images": (0, 500)}  # Config fields left None: (on CUDA, elsewhere)

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
    if cfg.dataset in ("stl10", "folder") and cfg.image_size % 4:
        fail(f"--image_size must be a multiple of 4 (two stride-2 convolutions), not {cfg.image_size}")
    x_train = load_split(cfg, train=True)[0].to(device)  # all on the device
    x_test = load_split(cfg, train=False)[0].to(device)
    if cfg.binarize:  # the test split binarized once, with a fixed seed: the same in every run
        x_test = (to_input(x_test, cfg, torch.Generator(device).manual_seed(0)) * 255).byte()
    torch.manual_seed(cfg.seed + RANK)  # DDP gives every rank rank 0's initial weights
    model = VAE(cfg, *x_train.shape[1:3]).to(device)  # channels, size
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * RANK)  # batches and binarization
    step, curves = 0, {"train": [], "test": []}  # curves: (step, loss) pairs for loss.png
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
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss, stats = fwd(to_input(x, cfg, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            curves["train"].append((step, loss.item()))  # the device syncs at log steps only
            stop_if_diverged(cfg, step, loss.detach())  # on every rank, before a diverged model is saved
            speed = (step - start) * cfg.batch_size * WORLD / t_train
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start) / 60
            log(cfg, f"step {step}/{cfg.max_steps} | loss {loss.item():.2f} | rec {stats['rec'].item():.2f}"
                f" | kl {stats['kl'].item():.2f} nats | {speed:.0f} img/s | eta {eta:.1f}m")
        if RANK == 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            save_samples(model, x_test, cfg)
            curves["test"].append((step, evaluate(model, x_test, cfg)["test_elbo_nats"]))
            log(cfg, f"eval step {step} | test -ELBO {curves['test'][-1][1]:.2f} nats")
            save_checkpoint(cfg, step, curves["test"][-1][1], model=model.state_dict(),
                            optimizer=opt.state_dict(), curves=curves, rng=g.get_state(),
                            train_images_per_s=speed)
    if WORLD > 1:
        torch.distributed.destroy_process_group()
    if RANK != 0:
        return {}
    res = evaluate(model, x_test, cfg, iwae_k=cfg.iwae_k)
    imgs, res["sample_images_per_s"] = save_samples(model, x_test, cfg, n=cfg.fid_samples)
    res |= fid_metrics(imgs, cfg, device) if cfg.fid_samples else {}
    res |= {"steps": step, "wall_s": time.perf_counter() - t0, "device": str(device)}
    res["train_images_per_s"] = speed if step > start else ckpt["train_images_per_s"]
    return finish(cfg, res, curves, ["test_elbo_nats", "test_bpd", "fid"])

if __name__ == "__main__":
    main()
