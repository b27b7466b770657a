"""Variational autoencoder (Kingma & Welling 2014) with beta-VAE (Higgins et al. 2017) and the IWAE
bound (Burda et al. 2016), in one file: model, training, sampling, evaluation.

The encoder q(z|x) = N(mu, diag(sigma^2)) is a small CNN whose last layer gives mu and log sigma^2 in one
head; the decoder p(x|z) is a transposed CNN with one of four likelihoods (--likelihood): `bernoulli` (with
--binarize: dynamically binarized data as in the literature), `gaussian_fixed_sigma`,
`gaussian_learned_sigma` (one learned sigma per channel, the sigma-VAE of Rybkin et al. 2021) and
`logistic` (a discretized logistic over the 256 pixel values, so -ELBO / (D log 2) is an upper bound on the
bits/dim of the 8-bit data, comparable with flows and PixelCNN). Deviations from the paper: conv nets
instead of MLPs; images show decoder means, not noisy draws.

    python vae.py --dataset fashion                                      # the default run (GPU minutes)
    python vae.py --dataset mnist --data_dir ../shared/data --device cpu # offline; numbers in README.md

Writes to --out_dir: ckpt.pt, recon.png, samples.png, samples.npz, loss.png, log.txt, results.json.
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

LIKELIHOODS = ("bernoulli", "gaussian_fixed_sigma", "gaussian_learned_sigma", "logistic")
DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}
FLIP_OK = {"fashion", "cifar10"}  # horizontal flips keep these datasets' images plausible, not digits
ARCH_FIELDS = ("dataset", "likelihood", "binarize", "sigma", "latent_dim", "hidden")  # define the model


@dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10
    data_dir: str = "./data"  # torchvision root: <data_dir>/FashionMNIST/raw/...
    out_dir: str = ""  # empty: out/vae-<dataset>
    likelihood: str = "logistic"  # decoder p(x|z), see the docstring
    binarize: bool = False  # dynamic binarization (bernoulli only)
    sigma: float = 0.1  # decoder std of gaussian_fixed_sigma, in [0, 1] pixel units
    beta: float = 1.0  # weight of the KL term (beta-VAE); evaluation always reports the beta=1 ELBO
    latent_dim: int = 32  # dimensions of z
    hidden: int = 64  # channels of the first conv layer (the second has twice as many)
    flip: bool = True  # random horizontal flips where the dataset allows them
    max_steps: int = 20000  # optimizer steps
    batch_size: int = 128  # images per step (per process under torchrun)
    lr: float = 1e-3  # Adam, after a linear warmup of 200 steps
    seed: int = 0
    eval_every: int = 2000  # steps between test-set ELBO evaluations and checkpoints
    sample_every: int = 1000  # steps between refreshing recon.png and samples.png
    log_every: int = 100  # steps between progress lines
    iwae_k: int = 1000  # importance samples of the final IWAE bound (0 skips it)
    iwae_images: int = 0  # first N test images for the IWAE bound (0: the whole test split)
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in the sample grid
    fid_samples: int = 10000  # generated images for FID / precision / recall (0 skips them)


CHOICES = {"dataset": tuple(DATASETS), "likelihood": LIKELIHOODS, "dtype": ("float32", "bfloat16")}


def parse_args(argv=None) -> Config:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    for f in dataclasses.fields(Config):
        kind = boolean if f.type is bool else f.type
        p.add_argument(f"--{f.name}", type=kind, default=f.default, choices=CHOICES.get(f.name), help=f.type.__name__)
    return Config(**vars(p.parse_args(argv)))


def boolean(s):  # argparse turns the ValueError into a one-line "invalid boolean value" error
    if s.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(s)
    return s.lower() in ("true", "1", "yes")


def fail(msg):
    raise SystemExit(f"vae.py: error: {msg}")


def check_config(cfg):
    if cfg.dataset not in DATASETS:
        fail(f"unknown dataset {cfg.dataset!r}; expected one of {', '.join(DATASETS)}")
    if cfg.likelihood not in LIKELIHOODS:
        fail(f"unknown likelihood {cfg.likelihood!r}; expected one of {', '.join(LIKELIHOODS)}")
    if cfg.binarize and cfg.likelihood != "bernoulli":
        fail(f"--binarize needs --likelihood bernoulli (got {cfg.likelihood})")
    if min(cfg.latent_dim, cfg.hidden, cfg.batch_size, cfg.eval_every, cfg.sample_every, cfg.log_every,
           cfg.n_samples) < 1 or min(cfg.max_steps, cfg.iwae_k, cfg.iwae_images, cfg.fid_samples) < 0 or cfg.sigma <= 0:
        fail("--latent_dim, --hidden, --batch_size, --*_every, --n_samples must be >= 1, --max_steps, --iwae_k, "
             "--iwae_images, --fid_samples >= 0, --sigma > 0")
    if cfg.dtype == "bfloat16" and pick_device(cfg.device).type != "cuda":
        fail("--dtype bfloat16 is autocast on CUDA; use --dtype float32 on this device")


# ----------------------------------------------------------------------------- model

class VAE(nn.Module):
    def __init__(self, cfg, channels, size):
        super().__init__()
        self.cfg = cfg
        h, s4 = cfg.hidden, size // 4  # two stride-2 convs: 28 -> 14 -> 7, 32 -> 16 -> 8
        n_out = 2 if cfg.likelihood == "logistic" else 1  # logistic: mean and log-scale per pixel
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, h, 4, 2, 1), nn.SiLU(), nn.Conv2d(h, 2 * h, 4, 2, 1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * h * s4 * s4, 512), nn.SiLU(), nn.Linear(512, 2 * cfg.latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dim, 512), nn.SiLU(), nn.Linear(512, 2 * h * s4 * s4), nn.SiLU(),
            nn.Unflatten(1, (2 * h, s4, s4)), nn.ConvTranspose2d(2 * h, h, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(h, channels * n_out, 4, 2, 1))
        if cfg.likelihood == "gaussian_learned_sigma":  # one sigma per channel (an unused parameter breaks DDP)
            self.log_sigma = nn.Parameter(torch.full((channels,), math.log(0.1)))

    def encode(self, x):  # x: float [B, C, H, W] in [0, 1]
        mu, logvar = self.encoder(2 * x - 1).chunk(2, dim=1)  # one head, split in two: [B, latent] each
        return mu, logvar

    def log_px_given_z(self, x, out):
        """log p(x|z) in nats per image, summed over the D = C*H*W pixels. out: decoder output."""
        lik = self.cfg.likelihood
        if lik == "bernoulli":  # targets in [0, 1]; a proper likelihood when x is binary
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        if lik == "logistic":
            mean, log_scale = out.chunk(2, dim=1)
            return discretized_logistic_logp(x, mean, log_scale).flatten(1).sum(1)
        log_sigma = self.log_sigma.view(1, -1, 1, 1) if lik == "gaussian_learned_sigma" else math.log(self.cfg.sigma)
        log_sigma = torch.as_tensor(log_sigma, device=x.device).expand_as(x)
        logp = -0.5 * ((x - torch.sigmoid(out)) / log_sigma.exp()) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)
        return logp.flatten(1).sum(1)

    def mean_image(self, out):
        """The decoder's mean image in [0, 1] (what the sample grids show)."""
        if self.cfg.likelihood == "logistic":
            return (out.chunk(2, dim=1)[0].clamp(-1, 1) + 1) / 2
        return torch.sigmoid(out)

    def forward(self, x):
        """Negative beta-ELBO per image (the training loss) and stats in nats per image."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # reparameterization: gradients reach mu, logvar
        rec = self.log_px_given_z(x, self.decoder(z).float())  # likelihoods in float32 under autocast
        kl = gaussian_kl(mu.float(), logvar.float())
        loss = (-rec + self.cfg.beta * kl).mean()
        # nats per image, all as losses (lower is better): -log p(x|z), KL, and -ELBO = their sum (beta = 1)
        return loss, {"rec": -rec.mean().item(), "kl": kl.mean().item(), "neg_elbo": (kl - rec).mean().item()}

    def log_weights(self, x, eps):
        """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k = mu + sigma * eps[k]; eps: [K, B, latent]."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps  # [K, B, latent]
        rec = self.log_px_given_z(x.repeat(len(eps), 1, 1, 1), self.decoder(z.flatten(0, 1))).view(eps.shape[:2])
        log_pz = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(-1)
        log_qz = (-0.5 * eps ** 2 - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(-1)
        return rec + log_pz - log_qz  # [K, B]

    @torch.inference_mode()
    def sample(self, n, generator=None):
        """n decoder-mean images in [0, 1], from z ~ N(0, I)."""
        dev = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, device=dev, generator=generator)
        return self.mean_image(self.decoder(z))


def gaussian_kl(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) in closed form, summed over latents (Kingma & Welling, appendix B)."""
    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)


def discretized_logistic_logp(x, mean, log_scale):
    """log P(x) of 8-bit x (given in [0, 1]) under a logistic discretized into 256 bins on [-1, 1]
    (Salimans et al. 2017, eq. 2): the edge bins take the tails, so the 256 probabilities sum to 1."""
    x = 2 * x - 1  # bin centres at -1, -1 + 2/255, ..., 1
    log_scale = log_scale.clamp(min=-7.0)
    inv_s = torch.exp(-log_scale)
    plus, minus = inv_s * (x - mean + 1 / 255), inv_s * (x - mean - 1 / 255)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the bin of 0 takes (-inf, edge]
    log_one_minus_cdf_minus = -F.softplus(minus)  # log(1 - sigmoid(minus)): the bin of 255 takes [edge, inf)
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * (x - mean)  # when the bin mass underflows, use density at the centre times the width 2/255
    log_pdf_mid = mid - log_scale - 2 * F.softplus(mid) - math.log(127.5)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_mid))


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


def to_input(x_uint8, cfg, generator=None):
    """uint8 batch -> float in [0, 1]; with --binarize, a fresh Bernoulli draw (dynamic binarization)."""
    x = x_uint8.float() / 255
    return torch.bernoulli(x, generator=generator) if cfg.binarize else x


def random_flip(x, generator):  # on the device, half of the batch mirrored left-right
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device, generator=generator) < 0.5, x.flip(3), x)


# ----------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def evaluate(model, x_test, cfg, final=False):
    """Test-set ELBO terms in nats per image (beta = 1); at the end also IWAE, bpd, active units, FID."""
    model.eval()
    g = torch.Generator(x_test.device).manual_seed(cfg.seed + 1)  # fixed test binarization and noise
    rec, kl, mus = 0.0, 0.0, []
    for xb in x_test.split(500):
        x = to_input(xb, cfg, g)
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, device=mu.device, generator=g)
        rec -= model.log_px_given_z(x, model.decoder(z)).sum().item()
        kl += gaussian_kl(mu, logvar).sum().item()
        mus.append(mu.float())
    n, D = len(x_test), x_test[0].numel()
    res = {"test_rec_nats": rec / n, "test_kl_nats": kl / n}
    res["test_elbo_nats"] = res["test_rec_nats"] + res["test_kl_nats"]  # -ELBO, an upper bound on -log p(x)
    # active units (Burda et al. 2016, sec. 5.2): Cov_x(E_q[z_u]) > 0.01
    res["active_units"] = int((torch.cat(mus).var(0) > 0.01).sum())
    nll, kind = res["test_elbo_nats"], "elbo"
    if final and cfg.iwae_k > 0:
        xs = x_test[: cfg.iwae_images or n]
        res[f"test_iwae{cfg.iwae_k}_nats"] = nll = iwae_nll(model, xs, cfg, g)
        kind, res["iwae_test_images"] = f"iwae-{cfg.iwae_k}", len(xs)  # the bound may use a subset (--iwae_images)
    if cfg.likelihood == "logistic":  # a discrete likelihood of the 8-bit data: bits per dimension
        res["test_bpd"], res["test_bpd_kind"] = nll / (D * math.log(2)), kind
    elif cfg.binarize:
        res["test_nll_nats_binarized"] = nll
    model.train()
    return res


def iwae_nll(model, x_test, cfg, g):
    """-log p(x) estimated by the IWAE bound -log (1/K) sum_k w_k (Burda et al. 2016, eq. 8), nats per image."""
    total, chunk = 0.0, max(1, 4096 // cfg.iwae_k)  # about 4096 decoder passes at a time
    for xb in x_test.split(chunk):
        x = to_input(xb, cfg, g)
        lw = torch.cat([model.log_weights(x, torch.randn(min(4096, cfg.iwae_k - i), len(x), cfg.latent_dim,
                                                         device=x.device, generator=g))
                        for i in range(0, cfg.iwae_k, 4096)])  # [K, B], K drawn 4096 at a time
        total -= (torch.logsumexp(lw, 0) - math.log(cfg.iwae_k)).sum().item()
    return total / len(x_test)


@torch.inference_mode()
def save_pictures(model, x_test, cfg, out_dir):
    model.eval()
    g = torch.Generator(x_test.device).manual_seed(cfg.seed)  # the same noise every time
    n = cfg.n_samples
    nrow = max(1, int(math.sqrt(n)))
    x = to_input(x_test[: nrow * (n // (2 * nrow) or 1)], cfg, g)
    recon = model.mean_image(model.decoder(model.encode(x)[0]))  # through the posterior mean
    torchvision.utils.save_image(torch.cat([x, recon]), os.path.join(out_dir, "recon.png"), nrow=nrow)
    torchvision.utils.save_image(model.sample(n, g), os.path.join(out_dir, "samples.png"), nrow=nrow)
    model.train()


def generate_and_score(model, cfg, device):
    """fid_samples decoded images as uint8 -> samples.npz and metrics.py's FID / precision / recall."""
    model.eval()
    g = torch.Generator(device).manual_seed(cfg.seed + 2)
    t0 = time.perf_counter()
    imgs = torch.cat([model.sample(min(1000, cfg.fid_samples - i), g) for i in range(0, cfg.fid_samples, 1000)])
    imgs = (imgs * 255).round().to(torch.uint8).cpu()
    res = {"sample_images_per_s": len(imgs) / (time.perf_counter() - t0)}
    np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=imgs.numpy())
    import metrics  # lazily: a copied vae.py runs alone with --fid_samples 0
    res.update(metrics.evaluate(imgs, cfg.dataset, cfg.data_dir, device))
    return res


# ----------------------------------------------------------------------------- training

def save_checkpoint(path, state):
    torch.save(state, path + ".tmp")  # write then rename: a crash never leaves a half-written ckpt.pt
    os.replace(path + ".tmp", path)


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*history), lw=0.8, label="train loss (-beta-ELBO)")
    ax.plot(*zip(*evals), "o-", label="test -ELBO")
    ax.set(xlabel="step", ylabel="nats / image", yscale="symlog")  # Gaussian decoders' -ELBO can be negative
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def train(cfg: Config) -> dict:
    check_config(cfg)
    cfg.out_dir = cfg.out_dir or f"out/vae-{cfg.dataset}"
    device, rank, world = setup_distributed(pick_device(cfg.device))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg) if cfg.resume or cfg.eval_only else None
    if cfg.eval_only:  # rebuild the model the checkpoint describes, whatever the command line says
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = make_logger(os.path.join(cfg.out_dir, "log.txt"), master=rank == 0)
    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | processes {world}")
    torch.manual_seed(cfg.seed + rank)
    x_train = load_split(cfg.dataset, cfg.data_dir, train=True)[0].to(device)  # the whole split on the device
    x_test = load_split(cfg.dataset, cfg.data_dir, train=False)[0].to(device)
    model = VAE(cfg, x_train.shape[1], x_train.shape[2]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)  # batch indices, flips, binarization
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
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()

    def checkpoint(results=None):
        if not math.isfinite(loss.item()):  # never overwrite the last good checkpoint with a diverged model
            fail(f"non-finite loss at step {step}; the last good checkpoint {ckpt_path} is kept")
        if rank == 0:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                        "config": asdict(cfg), "results": results, "history": history,
                                        "evals": evals, "rng": g.get_state()})

    t_train, t0, start_step, loss = 0.0, time.perf_counter(), step, torch.zeros(())
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)]
        x = to_input(random_flip(x, g) if cfg.flip and cfg.dataset in FLIP_OK else x, cfg, g)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 200)  # linear warmup
        with autocast:
            loss, stats = fwd(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            history.append((step, loss.item()))
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {loss.item():.2f} | rec {stats['rec']:.2f} | kl {stats['kl']:.2f} "
                f"nats | {(step - start_step) * cfg.batch_size / t_train:.0f} img/s | eta {eta / 60:.1f}m")
            if not math.isfinite(loss.item()):
                checkpoint()  # fails with the message above
        if rank == 0 and step % cfg.sample_every == 0:
            save_pictures(model, x_test, cfg, cfg.out_dir)
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            if rank == 0:
                ev = evaluate(model, x_test, cfg)
                evals.append((step, ev["test_elbo_nats"]))
                log(f"eval step {step} | test -ELBO {ev['test_elbo_nats']:.2f} nats | rec {ev['test_rec_nats']:.2f}"
                    f" | kl {ev['test_kl_nats']:.2f} | active units {ev['active_units']}")
            checkpoint()
    if not cfg.eval_only:
        checkpoint()  # before the (long) final evaluation, so no training is lost
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    res = evaluate(model, x_test, cfg, final=True)
    save_pictures(model, x_test, cfg, cfg.out_dir)
    if cfg.fid_samples > 0:
        try:
            res.update(generate_and_score(model, cfg, device))
        except (Exception, SystemExit) as e:  # a broken yardstick must not lose a finished run's results
            log(f"metrics failed, fid left empty: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    res.update(steps=step, wall_s=time.perf_counter() - t0, device=str(device), config=asdict(cfg),
               train_images_per_s=(step - start_step) * cfg.batch_size * world / t_train if t_train else None)
    if not cfg.eval_only:
        evals.append((step, res["test_elbo_nats"]))
        checkpoint(res)
        plot_losses(history, evals, os.path.join(cfg.out_dir, "loss.png"))
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    shown = " ".join(f"{k}={res[k]:.4g}" for k in ("test_elbo_nats", "test_bpd", "fid") if isinstance(res.get(k), float))
    log(f"FINAL vae {cfg.dataset} {shown} steps={step} time={res['wall_s']:.0f}s device={device}")
    return res


if __name__ == "__main__":
    train(parse_args())
