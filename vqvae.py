"""VQ-VAE: an image becomes a grid of discrete codes and back (van den Oord et al. 2017, arXiv:1711.00937).

A residual conv encoder maps an image (28x28 padded with black to 32x32, cropped back after decoding) to an
8x8 grid of code_dim vectors; each is replaced by its nearest code of a K x d codebook with the straight-through
gradient; the decoder maps the grid back. Loss (eq. 3): MSE + ||sg(z) - e||^2 + beta ||z - sg(e)||^2, or with
--ema (default) the codebook follows moving averages of its assigned vectors (appendix A.1, Laplace smoothing).
Deviations: MSE on [-1, 1] pixels, lr warmup + cosine decay, codes unused for --restart_after steps re-seeded.
  python vqvae.py --dataset mnist --data_dir ../shared/data      (defaults: one GPU)
  2-core CPU, --hidden 64 --res_hidden 32 --batch_size 64 --lr 2e-3, checkpoint of step 400 (~5 min): test MSE
  0.00481, PSNR 23.18 dB, 511/512 codes used, reconstruction FID 100.9 (classifier features; a prior's ceiling).
Writes ckpt.pt, recon.png (originals, then reconstructions), samples_independent.png (codes drawn independently
per position: why a prior is needed), loss.png, log.txt, results.json, samples.npz ("images": the scored
reconstructions, "independent") and codes.pt for prior_transformer.py: {"format": "vqvae-codes-v1", "dataset",
"codebook_size": K, "grid": [H, W], "train"/"test": int16 [N, H, W] (int32 if K > 32767), "train_flip": codes of
flipped train images (None for mnist), "train_labels"/"test_labels": int64 [N], "vqvae_ckpt": absolute path,
"vqvae_sha256": file_fingerprint(vqvae_ckpt)}.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}
SHAPES = {"fashion": (1, 28), "mnist": (1, 28), "cifar10": (3, 32)}  # channels, size
ARCH = ("dataset", "grid", "hidden", "res_hidden", "n_res", "codebook_size", "code_dim", "ema")  # fix the weights


@dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10
    data_dir: str = "./data"  # torchvision root: <data_dir>/MNIST/raw/train-images-idx3-ubyte, ...
    out_dir: str = ""  # everything of a run; empty means out/vqvae-<dataset>
    max_steps: int = 20000  # optimizer steps
    batch_size: int = 128  # images per step (per process under torchrun)
    lr: float = 1e-3  # Adam, peak after min(200, max_steps/10) warmup steps; cosine decay to lr/10
    seed: int = 0  # model init, batches, sample noise
    eval_every: int = 2000  # steps between evaluations on the whole test split (+ checkpoint)
    sample_every: int = 2000  # steps between recon.png / samples_independent.png
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only; the quantizer stays float32)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    write_codes: bool = False  # with --eval_only: also write <out_dir>/codes.pt (training always does)
    n_samples: int = 64  # images in recon.png and samples_independent.png
    fid_samples: int = 10000  # test reconstructions (and independent samples) scored by metrics.py; 0 skips
    grid: int = 8  # H = W of the code grid; the (padded) 32x32 image is halved log2(32/grid) times
    hidden: int = 128  # channels of the convolutions
    res_hidden: int = 64  # channels inside a residual block
    n_res: int = 2  # residual blocks in the encoder and in the decoder
    codebook_size: int = 512  # K codes
    code_dim: int = 64  # d, size of one code vector
    beta: float = 0.25  # commitment weight, on the encoder side
    ema: bool = True  # codebook by exponential moving averages instead of the codebook loss
    ema_decay: float = 0.99  # gamma of the moving averages
    restart_after: int = 20  # steps a code may stay unused before it is re-seeded; 0 never



def boolean(s):  # argparse turns the ValueError into a one-line "invalid boolean value" error
    if s.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(s)
    return s.lower() in ("true", "1", "yes")


def parse_args(argv=None) -> Config:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(prog="vqvae.py", description=__doc__, formatter_class=fmt)
    choices = {"dataset": tuple(DATASETS), "dtype": ("float32", "bfloat16")}
    for f in dataclasses.fields(Config):
        p.add_argument(f"--{f.name}", type=boolean if f.type is bool else f.type, default=f.default,
                       choices=choices.get(f.name), help=f.type.__name__)
    return Config(**vars(p.parse_args(argv)))


def fail(msg):
    raise SystemExit(f"vqvae.py: error: {msg}")


def check_config(cfg):
    for ok, msg in [
        (min(cfg.max_steps, cfg.fid_samples, cfg.restart_after, cfg.n_res) >= 0 and min(cfg.batch_size, cfg.hidden,
         cfg.res_hidden, cfg.code_dim, cfg.n_samples, cfg.eval_every, cfg.sample_every, cfg.log_every) >= 1,
         "--max_steps, --fid_samples, --restart_after, --n_res must be >= 0, the other sizes and intervals >= 1"),
        (cfg.grid in (1, 2, 4, 8, 16, 32), f"--grid must be 1, 2, 4, 8, 16 or 32 (halvings of 32x32), got {cfg.grid}"),
        (2 <= cfg.codebook_size < 2 ** 31, f"--codebook_size must be in 2..{2 ** 31 - 1} (codes.pt holds int16 codes up "
                                           f"to 32767, int32 above), got {cfg.codebook_size}"),
        (cfg.lr > 0 and cfg.beta >= 0 and 0 < cfg.ema_decay < 1, "need --lr > 0, --beta >= 0, 0 < --ema_decay < 1"),
        (cfg.dtype == "float32" or pick_device(cfg.device).type == "cuda", "--dtype bfloat16 needs a CUDA device")]:
        if not ok:
            fail(msg)


# ----------------------------------------------------------------------------- model
class VectorQuantizer(nn.Module):  # nearest of K codes, straight-through gradient, EMA codebook, dead-code restarts
    def __init__(self, K, d, beta, ema, decay, restart_after, eps=1e-5):
        super().__init__()
        self.K, self.beta, self.ema, self.decay, self.restart_after, self.eps = K, beta, ema, decay, restart_after, eps
        self.codebook = nn.Parameter(torch.empty(K, d).uniform_(-1 / K, 1 / K), requires_grad=not ema)
        self.register_buffer("ema_count", torch.ones(K))  # N_i: moving average of the assignment counts
        self.register_buffer("ema_sum", self.codebook.detach().clone())  # m_i: moving sum of assigned z
        # training steps since last use; starting at restart_after makes the first batch seed the codebook
        self.register_buffer("unused_steps", torch.full((K,), restart_after, dtype=torch.long))

    def nearest(self, z):  # z [M, d] -> index [M] of the closest code
        e = self.codebook.detach().float()
        d2 = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)  # [M, K] ||z||^2 - 2 z.e + ||e||^2
        return d2.argmin(1)

    def forward(self, z):  # z [B, d, H, W] -> straight-through z_q [B, d, H, W], codes [B, H, W], loss, perplexity
        B, d, H, W = z.shape
        with torch.autocast(z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)  # [M = B*H*W, d]
            idx = self.nearest(flat.detach())
            q = self.codebook[idx]  # [M, d]
            # eq. 3: the commitment loss beta ||z - sg(e)||^2 moves only the encoder (beta belongs here), the
            # codebook loss ||sg(z) - e||^2 only the codes; under EMA the update below replaces the codebook loss
            loss = self.beta * F.mse_loss(flat, q.detach()) + (0.0 if self.ema else F.mse_loss(q, flat.detach()))
            st = flat + (q - flat).detach()  # straight-through: forward q, backward identity to z
            counts = torch.bincount(idx, minlength=self.K).float()
            if self.training:
                self.update(flat.detach(), idx, counts)
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())  # exp entropy of this batch's usage
        return st.view(B, H, W, d).permute(0, 3, 1, 2), idx.view(B, H, W), loss, perplexity

    @torch.no_grad()
    def update(self, z, idx, counts):  # EMA codebook step (appendix A.1), then dead-code restarts
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, z)  # sum of the z assigned to each code
        for t in (counts, sums) if dist.is_initialized() else ():  # all ranks: the same statistics and codebook
            dist.all_reduce(t)
        if self.ema:
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)  # N_i <- g N_i + (1 - g) n_i
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)  # m_i <- g m_i + (1 - g) sum z
            n = self.ema_count.sum()
            N = (self.ema_count + self.eps) / (n + self.K * self.eps) * n  # Laplace smoothing: no division by 0
            self.codebook.data.copy_(self.ema_sum / N[:, None])  # e_i = m_i / N_i
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = self.unused_steps >= self.restart_after
        if self.restart_after > 0 and dead.any():  # re-seed dead codes from random encoder outputs
            new = z[torch.randint(len(z), (int(dead.sum()),), device=z.device)]
            if dist.is_initialized():
                dist.broadcast(new, 0)
            self.codebook.data[dead] = new
            self.ema_sum[dead], self.ema_count[dead], self.unused_steps[dead] = new, 1.0, 0


class ResBlock(nn.Module):  # x + conv1x1(relu(conv3x3(relu(x)))), the paper's residual block
    def __init__(self, ch, hid):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, hid, 3, padding=1), nn.ReLU(), nn.Conv2d(hid, ch, 1))

    def forward(self, x):
        return x + self.net(x)


class VQVAE(nn.Module):
    def __init__(self, cfg, channels, size):
        super().__init__()
        self.size, self.pad, self.grid = size, (32 - size) // 2, cfg.grid  # 28x28 is padded to 32x32
        n_down, h = int(math.log2(32 // cfg.grid)), cfg.hidden  # stride-2 convolutions: 32 -> grid
        down = [m for i in range(n_down) for m in (nn.Conv2d(channels if i == 0 else h, h, 4, 2, 1), nn.ReLU())]
        up = [m for i in range(n_down) for m in (nn.ReLU(), nn.ConvTranspose2d(h, h if i < n_down - 1 else channels,
                                                                                4, 2, 1))]
        res = lambda: [ResBlock(h, cfg.res_hidden) for _ in range(cfg.n_res)]
        self.encoder = nn.Sequential(*down, nn.Conv2d(h if n_down else channels, h, 3, padding=1), *res(),
                                     nn.ReLU(), nn.Conv2d(h, cfg.code_dim, 1))  # [B, d, grid, grid]
        self.decoder = nn.Sequential(nn.Conv2d(cfg.code_dim, h, 3, padding=1), *res(),  # [B, C, 32, 32]
                                     *(up or [nn.ReLU(), nn.Conv2d(h, channels, 3, padding=1)]))
        self.vq = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.ema, cfg.ema_decay, cfg.restart_after)

    def to_input(self, x):  # uint8 [B, C, h, w] -> float [B, C, 32, 32] in [-1, 1], padding black
        return F.pad(x.float() / 127.5 - 1, [self.pad] * 4, value=-1.0)

    def decode(self, z_q):  # [B, d, H, W] -> [B, C, h, w] on the [-1, 1] scale (unclamped), padding cropped
        return self.decoder(z_q)[..., self.pad:self.pad + self.size, self.pad:self.pad + self.size]

    def reconstruct(self, x):  # the training path: x uint8 -> x_hat [-1, 1], codes, vq loss, perplexity
        z_q, codes, vq_loss, perplexity = self.vq(self.encoder(self.to_input(x)))
        return self.decode(z_q), codes, vq_loss, perplexity

    def forward(self, x):  # x uint8 [B, C, h, w] -> loss, stats (mse on [0, 1] pixels: / 4 of the [-1, 1] scale)
        x_hat, _, vq_loss, perplexity = self.reconstruct(x)
        recon = F.mse_loss(x_hat.float(), x.float() / 127.5 - 1)
        loss = recon + vq_loss
        return loss, {"loss": loss.item(), "mse": recon.item() / 4, "perplexity": perplexity.item()}

    @torch.no_grad()
    def encode_codes(self, x):  # uint8 [N, C, h, w] -> LongTensor [N, H, W]
        z = self.encoder(self.to_input(x)).float()
        return self.vq.nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])).view(len(x), *z.shape[2:])

    @torch.no_grad()
    def decode_codes(self, codes):  # int [N, H, W] -> float images [N, C, h, w] in [0, 1]
        z_q = self.vq.codebook[codes.long()].permute(0, 3, 1, 2)  # [N, d, H, W]
        return ((self.decode(z_q).float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def sample(self, n, generator=None, probs=None):  # codes drawn independently per position ([H*W, K] probs)
        probs = torch.ones(self.grid ** 2, self.vq.K, device=self.vq.codebook.device) if probs is None else probs
        codes = torch.multinomial(probs, n, replacement=True, generator=generator).t()  # [n, H*W]
        return torch.cat([self.decode_codes(c.view(-1, self.grid, self.grid)) for c in codes.split(1000)])


# ----------------------------------------------------------------------------- checkpoints and codes
def file_fingerprint(path):
    """sha256 hex digest of a file's bytes (ties codes.pt to the checkpoint that made it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(path, state):
    torch.save(state, path + ".tmp")  # write then rename: a crash never leaves a half-written file
    os.replace(path + ".tmp", path)


def load_checkpoint(path, cfg=None):  # with cfg: one-line error when made for another dataset or architecture
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path} (train first: python vqvae.py --dataset <d> --out_dir <dir>)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = {k: ckpt["config"][k] for k in ARCH}
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); it is corrupt or not from vqvae.py")
    keys = () if cfg is None else ARCH if cfg.resume else ("dataset",)  # eval_only rebuilds the rest from the file
    if diff := [f"--{k} {saved[k]}" for k in keys if saved[k] != getattr(cfg, k)]:
        fail(f"{path} was made with {', '.join(diff)}; pass the same values or another --out_dir")
    return ckpt


def load_vqvae(ckpt_path, device="cpu"):
    """The VQVAE of a checkpoint, rebuilt from its config, in eval mode on `device` (for prior_transformer.py)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config(**{k: ckpt["config"][k] for k in ARCH})  # the other fields do not change the weights
    try:
        (model := VQVAE(cfg, *SHAPES[cfg.dataset])).load_state_dict(ckpt["model"])
    except Exception as e:
        fail(f"checkpoint {ckpt_path} does not match the model its config describes ({type(e).__name__})")
    return model.to(device).eval()


def write_codes(model, cfg, train_split, test_split, ckpt_path, batch=1000):  # codes.pt, format in the docstring
    dtype = torch.int16 if cfg.codebook_size <= 32767 else torch.int32
    enc = lambda x: torch.cat([model.encode_codes(xb).to("cpu", dtype) for xb in x.split(batch)])
    save_checkpoint(os.path.join(cfg.out_dir, "codes.pt"), {
        "format": "vqvae-codes-v1", "dataset": cfg.dataset, "codebook_size": cfg.codebook_size,
        "grid": [cfg.grid, cfg.grid], "train": enc(train_split[0]), "test": enc(test_split[0]),
        "train_flip": None if cfg.dataset == "mnist" else enc(train_split[0].flip(-1)),
        "train_labels": train_split[1].cpu(), "test_labels": test_split[1].cpu(),
        "vqvae_ckpt": os.path.abspath(ckpt_path), "vqvae_sha256": file_fingerprint(ckpt_path)})


# ----------------------------------------------------------------------------- data and evaluation
def load_split(dataset, data_dir, train):  # the whole split: uint8 [N, C, H, W], int64 labels [N]
    cls = getattr(torchvision.datasets, DATASETS[dataset])
    try:
        ds = cls(data_dir, train=train, download=False)
    except RuntimeError:
        try:
            ds = cls(data_dir, train=train, download=True)
        except Exception as e:
            where = "cifar-10-batches-py/" if dataset == "cifar10" else f"{DATASETS[dataset]}/raw/train-images-idx3-ubyte"
            fail(f"{dataset} not found under --data_dir {data_dir} (expected torchvision's layout, e.g. {data_dir}/"
                 f"{where}) and download failed ({type(e).__name__}); point --data_dir at a folder that has it")
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST [N,28,28]; CIFAR [N,32,32,3]
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


@torch.inference_mode()
def evaluate(model, x, keep=0, batch=500):  # (no layer depends on train/eval mode; this path never updates codes)
    """Whole split: MSE and PSNR on [0, 1] pixels, code usage over the complete pass (not per batch). Returns
    (stats, uint8 reconstructions of the first `keep` images, [H*W, K] code frequencies of each position)."""
    K, HW = model.vq.K, model.grid ** 2
    codes = torch.cat([model.encode_codes(xb) for xb in x.split(batch)])  # [N, H, W]
    r = torch.cat([model.decode_codes(c) for c in codes.split(batch)])  # [N, C, h, w] in [0, 1]
    mse = (r - x.float() / 255).pow(2).mean().item()
    pos = torch.arange(HW, device=x.device) * K + codes.view(len(x), HW)  # position-major index into [H*W, K]
    probs = torch.bincount(pos.view(-1), minlength=HW * K).view(HW, K).float()
    counts = probs.sum(0)
    p = counts[counts > 0] / counts.sum()
    stats = {"test_mse": mse, "test_psnr_db": 10 * math.log10(1 / max(mse, 1e-12)),  # PSNR of the mean MSE
             "codes_used": int((counts > 0).sum()), "codes_used_frac": float((counts > 0).float().mean()),
             "code_perplexity": float(torch.exp(-(p * p.log()).sum()))}  # exp(entropy of code usage)
    return stats, (r[:keep] * 255).round().to("cpu", torch.uint8), probs + 1e-12  # + eps: multinomial-safe


@torch.inference_mode()
def save_pictures(model, x_test, probs, cfg):
    k, g = max(cfg.n_samples // 2, 1), torch.Generator(x_test.device).manual_seed(cfg.seed)  # same noise every time
    for x, name in [(torch.cat([x_test[:k].float() / 255, model.decode_codes(model.encode_codes(x_test[:k]))]),
                     "recon.png"), (model.sample(cfg.n_samples, g, probs), "samples_independent.png")]:
        torchvision.utils.save_image(x, os.path.join(cfg.out_dir, name), nrow=max(1, int(math.sqrt(len(x)))))


def plot_losses(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, loss, mse = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(steps, loss, label="train loss (MSE on [-1, 1] + VQ losses)")
    ax.semilogy(steps, mse, label="train MSE on [0, 1] pixels")
    ax.legend(title="x: step")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- training
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


def train(cfg: Config) -> dict:
    check_config(cfg)
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or f"out/vqvae-{cfg.dataset}")
    device, rank, world = setup_distributed(pick_device(cfg.device))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg) if cfg.resume or cfg.eval_only else None
    if cfg.eval_only:  # rebuild the model the checkpoint describes, whatever the command line says
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH})
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = make_logger(os.path.join(cfg.out_dir, "log.txt"), master=rank == 0)
    log(f"argv: {' '.join(sys.argv)}\ntorch {torch.__version__} | device {device} | processes {world}")
    (x_train, y_train), (x_test, y_test) = [load_split(cfg.dataset, cfg.data_dir, t) for t in (True, False)]
    x_train, x_test = x_train.to(device), x_test.to(device)  # whole splits on the device, uint8
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = VQVAE(cfg, *SHAPES[cfg.dataset]).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)  # batch indices and flips, per rank
    step, history = 0, []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            if not cfg.eval_only:
                opt.load_state_dict(ckpt["optimizer"])
                g.set_state(ckpt["rng"]) if rank == 0 else g.manual_seed(cfg.seed + 1000 * rank + ckpt["step"])
            step, history = ckpt["step"], list(ckpt["history"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint {ckpt_path} does not fit this model: {(str(e).splitlines() or [type(e).__name__])[0]}")
    log(f"vqvae {cfg.dataset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg.grid}x"
        f"{cfg.grid} codes of K={cfg.codebook_size}" + (f", loaded {ckpt_path} at step {step}" if ckpt else ""))
    fwd = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    diverged = lambda: fail(f"not finite at step {step}; the last good checkpoint {ckpt_path} is kept (lower --lr)")

    def checkpoint(results):  # never replace a good checkpoint by a broken model
        if not (math.isfinite(results["test_mse"]) and all(p.isfinite().all() for p in model.parameters())):
            diverged()
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                    "config": asdict(cfg), "results": results, "history": history, "rng": g.get_state()})
    t0, t_train, start_step, probs = time.perf_counter(), 0.0, step, None  # probs None: uniform codes
    while step < cfg.max_steps and not cfg.eval_only:
        t_step = time.perf_counter()
        # linear warmup (a fast-moving encoder early on strands the codebook), then cosine from lr to lr/10
        warm = min(1.0, (step + 1) / min(200, cfg.max_steps // 10 + 1))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / cfg.max_steps))
        x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=g)]
        if cfg.dataset != "mnist":  # horizontal flips on the device (digits are not mirror-symmetric)
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device, generator=g) < 0.5, x.flip(3), x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss, stats = fwd(x)
        if not math.isfinite(stats["loss"]):
            diverged()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            history.append((step, stats["loss"], stats["mse"]))
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start_step)
            log(f"step {step}/{cfg.max_steps} | loss {stats['loss']:.4f} | mse {stats['mse']:.5f} | perplexity "
                f"{stats['perplexity']:.1f} | {(step - start_step) * cfg.batch_size / t_train:.0f} img/s | eta {eta / 60:.1f}m")
        if rank == 0 and step % cfg.eval_every == 0 and step < cfg.max_steps:
            ev, _, probs = evaluate(model, x_test)
            log(f"eval step {step} | test mse {ev['test_mse']:.5f} | psnr {ev['test_psnr_db']:.2f} dB | codes used "
                f"{ev['codes_used']}/{cfg.codebook_size} | perplexity {ev['code_perplexity']:.1f}")
            checkpoint({**ev, "steps": step})
        if rank == 0 and step % cfg.sample_every == 0 and step < cfg.max_steps:
            save_pictures(model, x_test, probs, cfg)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    res, recons, probs = evaluate(model, x_test, keep=cfg.fid_samples)  # final: the whole test split
    save_pictures(model, x_test, probs, cfg)
    t_sample = time.perf_counter()
    g = torch.Generator(device).manual_seed(cfg.seed)  # independent codes for the FID of the naive generator
    indep = (model.sample(max(cfg.fid_samples, cfg.n_samples), g, probs) * 255).round().to("cpu", torch.uint8)
    res.update(dict.fromkeys(("test_bpd", "test_bpd_kind", "fid", "precision", "recall", "fid_features",
                              "fid_independent")), fid_of="reconstructions of the test split (the ceiling for any prior)",
               sample_images_per_s=len(indep) / (time.perf_counter() - t_sample), steps=step,
               train_images_per_s=(step - start_step) * cfg.batch_size * world / t_train if t_train else None,
               wall_s=time.perf_counter() - t0, device=str(device), config=asdict(cfg))
    if not cfg.eval_only:
        checkpoint(res)  # before the metrics, so a failure there loses no training
        plot_losses(history, os.path.join(cfg.out_dir, "loss.png"))
    if cfg.fid_samples > 0:
        try:  # a failure here must not cost the model and its codes
            import metrics  # lazily: a copied vqvae.py still runs alone with --fid_samples 0
            m = metrics.evaluate(recons, cfg.dataset, cfg.data_dir, device)
            res.update({k: m[k] for k in ("fid", "precision", "recall", "fid_features")}, recon_metrics=m,
                       fid_independent=metrics.evaluate(indep[:cfg.fid_samples], cfg.dataset, cfg.data_dir, device)["fid"])
        except (Exception, SystemExit) as e:
            log(f"metrics.py failed, fid left empty: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
    np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=recons.numpy(), independent=indep.numpy())
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    if not cfg.eval_only or cfg.write_codes:
        write_codes(model, cfg, (x_train, y_train), (x_test, y_test), ckpt_path)
        log(f"wrote {os.path.join(cfg.out_dir, 'codes.pt')}")
    shown = " ".join(f"{k}={res[k]:.4g}" for k in ("test_mse", "test_psnr_db", "codes_used", "code_perplexity", "fid",
                                                   "precision", "recall", "fid_independent") if res[k] is not None)
    log(f"FINAL vqvae {cfg.dataset} {shown} steps={step} time={res['wall_s']:.0f}s device={device}")
    return res


if __name__ == "__main__":
    train(parse_args())
