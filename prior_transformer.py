"""Autoregressive prior over VQ-VAE codes (van den Oord et al. 2017): a GPT (Radford et al. 2019) or,
with --arch lstm, an LSTM models p(c) = prod_t p(c_t | c_<t) over the H x W code grid of vqvae.py in
raster order, in nats (and bits) per code; its VQ-VAE decodes the samples (the one cross-import).
Deviations: a Transformer, not the paper's PixelCNN prior (as VQGAN, Esser et al. 2021); attention
dropout of random past entries; mirrored images' codes (--flip); --conditional: a class start token.
    python vqvae.py --dataset mnist --data_dir ../shared/data    # writes out/vqvae-mnist/codes.pt
    python prior_transformer.py --dataset mnist --data_dir ../shared/data
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# --------------------------------------------------------------------------- model
class Block(nn.Module):  # pre-LayerNorm (GPT-2): x + attention(ln1(x)), then x + mlp(ln2(x))
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))
        self.drop = nn.Dropout(cfg.dropout)
    def forward(self, x, cache):  # x [B, T, C]; cache: {} or {"kv": the past's keys and values}
        B, T, C = x.shape
        nh = self.cfg.n_head
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, nh, C // nh)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # queries, keys, values [3, B, nh, T, hs]
        kv = torch.cat([cache["kv"], qkv[1:]], 3) if cache else qkv[1:]  # the past's: computed once
        cache["kv"] = kv
        mask = None  # causal; with a cache, tokens come one at a time (T = 1) and see every key
        if self.training and self.cfg.attn_drop_p > 0:  # a fresh random mask per example and head
            mask = attn_drop_mask(T, self.cfg.attn_drop_p, (B, nh), x.device)
        y = F.scaled_dot_product_attention(qkv[0], *kv, mask, is_causal=mask is None and T > 1)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))  # the heads side by side
        return x + self.drop(self.mlp(self.ln2(x)))

def attn_drop_mask(T, p, batch_shape, device):  # bool [*batch_shape, T, T], True: may attend
    keep = torch.rand(*batch_shape, T, T, device=device) >= p
    return (keep | torch.eye(T, dtype=torch.bool, device=device)).tril()  # the diagonal, the past

class Prior(nn.Module):  # p(c_t | c_<t) over K codes: embeddings, a GPT or LSTM body, tied output
    def __init__(self, cfg, K, grid, n_classes=0):
        super().__init__()
        self.K = K
        self.grid = grid  # [H, W]: T = H * W codes per image
        self.n_classes = n_classes
        C = cfg.n_embd
        self.wte = nn.Embedding(K + max(1, n_classes), C)  # codes 0..K-1, then start/class tokens
        self.wpe = nn.Embedding(grid[0] * grid[1], C)  # learned positions
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_f = nn.LayerNorm(C)
        lstm = cfg.arch == "lstm"  # the recurrent baseline, with PyTorch's init
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(0 if lstm else cfg.n_layer))
        self.lstm = nn.LSTM(C, C, cfg.n_layer, batch_first=True, dropout=cfg.dropout) if lstm else None
        for name, p in self.named_parameters():  # GPT-2: N(0, 0.02) weights, zero biases
            if "lstm" not in name and "ln" not in name:  # the LSTM and the LayerNorms keep theirs
                p.data = torch.randn_like(p) * 0.02 if p.dim() >= 2 else torch.zeros_like(p)
    def start(self, n, y=None):  # the first input token: start (K), or the class token K + y
        if y is None or not self.n_classes:
            return torch.full((n,), self.K, device=self.wte.weight.device)
        return self.K + y
    def logits(self, idx, cache=None, t0=0):  # tokens [B, T'] at positions t0.. -> [B, T', K]
        cache = {} if cache is None else cache  # GPT: {layer: {"kv"}}; LSTM: {"hc": its state}
        h = self.drop(self.wte(idx) + self.wpe.weight[t0 : t0 + idx.shape[1]])  # + positions t0..
        if self.lstm:
            h, cache["hc"] = self.lstm(h, cache.get("hc"))
        for i, block in enumerate(self.blocks):
            h = block(h, cache.setdefault(i, {}))
        return F.linear(self.ln_f(h), self.wte.weight[: self.K])  # tied; start tokens not predicted
    def forward(self, x, y=None):  # codes [B, H, W], labels [B] -> mean nats per code, stats
        x = x.flatten(1)  # [B, T] in raster order
        inp = torch.cat([self.start(len(x), y)[:, None], x[:, :-1]], 1)  # shifted right by one
        logits = self.logits(inp)  # autocast runs cross_entropy in float32
        loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
        stats = {"nats_per_code": loss.detach()}
        if not self.training:  # top-k accuracy: near-identical codes make top-1 alone misleading
            rank = (logits > logits.gather(-1, x[..., None])).sum(-1)  # [B, T]: codes above truth
            stats |= {f"top{k}": (rank < k).float().mean() for k in (1, 5, 10)}
        return loss, stats
    @torch.inference_mode()
    def sample(self, n, generator=None, y=None, temperature=1.0, top_k=0, top_p=1.0):
        seq = self.start(n, y)[:, None]  # [n, 1 + t]
        cache = {}
        for t in range(self.wpe.num_embeddings):  # one token per step: O(t) work, not O(t^2)
            logits = self.logits(seq[:, -1:], cache, t)[:, -1]
            code = logits.argmax(-1)  # temperature 0: greedy
            if temperature > 0:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                code = torch.multinomial(probs, 1, generator=generator)[:, 0]
            seq = torch.cat([seq, code[:, None]], 1)
        return seq[:, 1:].view(n, *self.grid)  # code grids [n, H, W]

def filter_logits(logits, top_k=0, top_p=1.0):  # -inf outside the top_k and the nucleus top_p
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[..., -1:], float("-inf"))
    if top_p < 1:  # Holtzman et al. 2020, over what top_k kept
        srt, idx = logits.sort(-1, descending=True)
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the codes before hold top_p already; the top one stays
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return logits

# --------------------------------------------------------------------------- data, evaluation, samples
def load_codes(cfg, device):  # vqvae.py's codes.pt, checked, on the device; and its VQ-VAE
    path = cfg.codes.replace("{dataset}", cfg.dataset)
    if not os.path.exists(path):
        fail(f"no codes file at {path}: run `python vqvae.py --dataset {cfg.dataset} --data_dir "
             f"{cfg.data_dir} --out_dir {os.path.dirname(path)}` first")
    from vqvae import file_fingerprint, load_vqvae  # lazily: the one cross-import
    try:  # the format: in vqvae.py's docstring
        c = torch.load(path, map_location="cpu", weights_only=True)
        ok = c["format"] == "vqvae-codes-v1" and None not in (c["train_labels"], c["test_labels"])
        if not ok or c["train"].max() >= c["codebook_size"]:  # the codes are of this codebook
            raise ValueError(c.get("format"))
    except Exception as e:
        fail(f"{path} is not a codes file of vqvae.py (labels, codes 0..K-1): {type(e).__name__}")
    if c["dataset"] != cfg.dataset:
        fail(f"{path} holds {c['dataset']} codes but --dataset is {cfg.dataset}")
    n_val = math.ceil(cfg.val_fraction * len(c["train"]))
    if not 0 < n_val < len(c["train"]):
        fail(f"--val_fraction {cfg.val_fraction} must leave both validation and training grids")
    perm = torch.randperm(len(c["train"]), generator=torch.Generator().manual_seed(0))  # fixed
    val = perm[:n_val]
    c |= {"val": c["train"][val], "val_labels": c["train_labels"][val]}
    kept = [k for k in ("train", "train_labels", "train_flip") if c.get(k) is not None]
    c |= {k: c[k][perm[n_val:]] for k in kept}  # the rest, with their mirrored images' codes
    ckpt = c["vqvae_ckpt"]
    if not os.path.exists(ckpt):  # a moved folder: the VQ-VAE beside codes.pt
        ckpt = os.path.join(os.path.dirname(path), "ckpt.pt")
    if not os.path.exists(ckpt) or file_fingerprint(ckpt) != c["vqvae_sha256"]:
        fail(f"the VQ-VAE {ckpt} is missing or changed since it wrote {path}: rewrite the codes with "
             f"`python vqvae.py --dataset {cfg.dataset} --data_dir {cfg.data_dir} --out_dir "
             f"{os.path.dirname(ckpt)} --eval_only --write_codes --fid_samples 0`")
    if cfg.arch == "gpt" and cfg.n_embd % cfg.n_head:  # the flags setup cannot check
        fail(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}")
    if not 0 < cfg.top_p <= 1:
        fail(f"--top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k > c["codebook_size"] or cfg.sweep and max(cfg.sweep_top_k) > c["codebook_size"]:
        fail(f"--top_k and --sweep_top_k must be in 1..K = 1..{c['codebook_size']} (0: all)")
    c |= {k: v.to(device).long() for k, v in c.items() if torch.is_tensor(v)}  # codes and labels
    return c, load_vqvae(ckpt, device)

@torch.inference_mode()
def evaluate(model, codes, split, cfg):  # over a whole split: nats (bits) per code, top-1/5/10
    model.eval()
    x, y = codes[split], codes[f"{split}_labels"]
    res = {}
    batches = progress(cfg, f"{split} nats/code", list(zip(x.split(500), y.split(500))))
    with torch.autocast(x.device.type, enabled=False):  # float32, also under --dtype bfloat16
        for xb, yb in batches:
            for k, v in model(xb, yb)[1].items():  # batch means, weighted by the batch's size
                res[f"{split}_{k}"] = res.get(f"{split}_{k}", 0.0) + v.item() * len(xb) / len(x)
    model.train()
    return res | {f"{split}_bits_per_code": res[f"{split}_nats_per_code"] / math.log(2)}

@torch.inference_mode()
def generate(model, vq, n, cfg, seed):  # n decoded samples (uint8, on the CPU), samples per second
    model.eval()
    g = torch.Generator(model.wte.weight.device).manual_seed(seed)  # the same samples every time
    t0 = time.perf_counter()
    y = torch.arange(n, device=g.device) * model.n_classes // n  # the classes in equal blocks
    imgs = []
    for b in progress(cfg, f"samples at T={cfg.temperature}", y.split(500)):  # drawn, decoded
        codes = model.sample(len(b), g, b, cfg.temperature, cfg.top_k, cfg.top_p)
        imgs.append((vq.decode_codes(codes) * 255).round().byte().cpu())  # uint8
    model.train()
    return torch.cat(imgs), n / (time.perf_counter() - t0)

def save_samples(model, vq, cfg, n=0):  # samples.png (a row per class if conditional); n -> .npz
    rows = model.n_classes or math.isqrt(cfg.n_samples)
    imgs, per_s = generate(model, vq, rows * max(1, cfg.n_samples // rows), cfg, cfg.seed)
    torchvision.utils.save_image(imgs / 255, f"{cfg.out_dir}/samples.png", nrow=len(imgs) // rows)
    if n > 0:  # for FID, from another seed
        imgs, per_s = generate(model, vq, n, cfg, cfg.seed + 2)
        np.savez_compressed(f"{cfg.out_dir}/samples.npz", images=imgs.numpy())
    return imgs, per_s  # and samples per second

def sweep(model, vq, cfg, device):  # metrics over temperature x top-k -> rows, sweep.png
    from matplotlib.figure import Figure
    axs = Figure(figsize=(15, 3.6)).subplots(1, 3)
    rows = []
    for k in cfg.sweep_top_k:
        for t in cfg.sweep_temperatures:
            at = dataclasses.replace(cfg, temperature=t, top_k=int(k))
            imgs = generate(model, vq, cfg.sweep_samples, at, cfg.seed + 2)[0]
            rows.append({"temperature": t, "top_k": int(k)} | fid_metrics(imgs, cfg, device))
            log(cfg, f"sweep {rows[-1]}")
        for ax, name in zip(axs, ("fid", "precision", "recall")):  # lower temperatures buy precision
            y = [r.get(name) for r in rows[-len(cfg.sweep_temperatures):]]
            ax.plot(cfg.sweep_temperatures, y, "o-", label=f"top_k {k:g}")
            ax.set(xlabel="temperature", ylabel=name)
    axs[0].legend()
    axs[0].figure.savefig(f"{cfg.out_dir}/sweep.png", dpi=100, bbox_inches="tight")
    return rows

def numbers(s):  # the type of a comma-separated flag: "0.7,1" -> (0.7, 1.0)
    return tuple(float(v) for v in s.split(","))

@dataclasses.dataclass
class Config:
    dataset: str = "fashion"  # whose codes: fashion | mnist | cifar10 | stl10 | folder
    data_dir: str = "./data"  # the real images (or the folder), for the metrics only (FID)
    codes: str = "out/vqvae-{dataset}/codes.pt"  # written by vqvae.py
    out_dir: str = "out/prior_transformer-{dataset}"  # everything of the run
    arch: str = "gpt"  # gpt (Transformer) | lstm (recurrent baseline)
    n_layer: int = 8  # Transformer blocks (LSTM layers)
    n_head: int = 8  # attention heads
    n_embd: int = 512  # width of the residual stream (LSTM hidden size)
    dropout: float = 0.1  # on embeddings and residual branches (between LSTM layers)
    attn_drop_p: float = 0.1  # chance of masking each allowed past attention entry (training only)
    flip: bool = True  # half the grids: the codes of the mirrored image, where codes.pt has them
    conditional: bool = False  # a class token instead of the start token
    max_steps: int = 10000  # optimizer steps
    batch_size: int = 128  # code grids per step (per process under torchrun)
    lr: float = 5e-4  # AdamW peak after warmup; cosine decay to lr / 10; gradient norm clipped at 1
    warmup_steps: int = 300  # linear warmup
    weight_decay: float = 0.1  # on matrices and embeddings only
    seed: int = 0
    # Validation on held-out training grids picks the weights; choosing them by the test split would
    # tune on the test split, which is then scored once, by the selected weights (results.json)
    val_fraction: float = 0.05  # of the training grids, held out by a fixed seed: the validation
    eval_every: int = 1000  # steps between validations, samples.png, checkpoints
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 (autocast, CUDA only)
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    eval_only: bool = False  # load <out_dir>/ckpt.pt, evaluate and sample, no training
    n_samples: int = 64  # images in samples.png (conditional: n_samples // classes per class row)
    fid_samples: int = 10000  # decoded samples for FID / precision / recall; 0 skips them
    temperature: float = 1.0  # of the sampling softmax; 0: greedy
    top_k: int = 0  # sample among the k most likely codes; 0: all
    top_p: float = 1.0  # nucleus: the fewest codes whose probability reaches top_p, in (0, 1]
    sweep: bool = False  # metrics over temperature x top_k: results["sweep"], sweep.png
    sweep_temperatures: numbers = (0.7, 0.85, 1.0, 1.15)  # comma-separated on the command line
    sweep_top_k: numbers = (0, 64, 16)  # comma-separated; 0: all codes
    sweep_samples: int = 2000  # decoded samples per sweep point

CHOICES = {"dataset": ("fashion", "mnist", "cifar10", "stl10", "folder"),
           "dtype": ("float32", "bfloat16"), "arch": ("gpt", "lstm")}
ARCH = ("arch", "n_layer", "n_head", "n_embd", "conditional", "val_fraction")  # fixed by ckpt.pt
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
    codes, vq = load_codes(cfg, device)  # codes [N, H, W] and labels [N], all on the device
    n_classes = int(codes["train_labels"].max()) + 1 if cfg.conditional else 0  # or subfolders
    meta = {k: codes[k] for k in ("codebook_size", "grid", "vqvae_sha256")}  # what this prior fits
    if ckpt and ckpt["meta"] != meta:
        fail(f"{cfg.out_dir}/ckpt.pt was trained on other codes: {ckpt['meta']}, not {meta}")
    x_flip = codes["train_flip"] if cfg.flip else None
    torch.manual_seed(cfg.seed + RANK)  # DDP gives every rank rank 0's initial weights
    model = Prior(cfg, codes["codebook_size"], codes["grid"], n_classes).to(device)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},  # matrices, embeddings
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=True)
    g = torch.Generator(device).manual_seed(cfg.seed + 1000 * RANK)  # batches and flips
    step, curves = 0, {"train": [], "test": []}  # (step, loss) for loss.png; "test": validation
    best = {"step": 0, "val_nats_per_code": math.inf}  # and "model": the lowest one's weights
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, curves = ckpt["step"], ckpt["curves"]
        if "best" not in ckpt:  # written before the model selection
            fail(f"{cfg.out_dir}/ckpt.pt holds no selected model (older code); train anew")
        best = ckpt["best"]
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
        i = torch.randint(len(codes["train"]), (cfg.batch_size,), device=device, generator=g)
        x = codes["train"][i]
        if x_flip is not None:  # the mirrored image's codes, half of the time
            x = torch.where(torch.rand(len(i), 1, 1, device=device, generator=g) < 0.5, x_flip[i], x)
        warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        q = max(0, step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)  # 0..1
        for group in opt.param_groups:  # linear warmup, then cosine decay to lr / 10
            group["lr"] = cfg.lr * warmup * (0.55 + 0.45 * math.cos(math.pi * q))
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss = fwd(x, codes["train_labels"][i])[0]
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        t_train += time.perf_counter() - t_step
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
            curves["train"].append((step, loss.item()))  # the device syncs at log steps only
            stop_if_diverged(cfg, step, loss.detach())  # on every rank, before a diverged model is saved
            speed = (step - start) * cfg.batch_size * WORLD / t_train
            eta = (cfg.max_steps - step) * (time.perf_counter() - t0) / (step - start) / 60
            log(cfg, f"step {step}/{cfg.max_steps} | loss {loss.item():.4f} nats/code"
                f" | {speed:.0f} img/s | eta {eta:.1f}m")
        if RANK == 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            save_samples(model, vq, cfg)
            val = evaluate(model, codes, "val", cfg)["val_nats_per_code"]
            curves["test"].append((step, val))
            if val < best["val_nats_per_code"]:  # a copy on the device, and in ckpt.pt
                weights = {k: v.clone() for k, v in model.state_dict().items()}
                best = {"step": step, "val_nats_per_code": val, "model": weights}
            log(cfg, f"eval step {step} | val {val:.4f} nats/code | best: step {best['step']}")
            save_checkpoint(cfg, step, val, model=model.state_dict(), meta=meta, best=best,
                            optimizer=opt.state_dict(), curves=curves, rng=g.get_state(),
                            train_images_per_s=speed)
    if WORLD > 1:
        torch.distributed.destroy_process_group()
    if RANK != 0:
        return {}
    model.load_state_dict(best["model"])  # the lowest validation loss's weights, not the last ones
    log(cfg, f"selected step {best['step']}: validation {best['val_nats_per_code']:.4f} nats/code")
    res = evaluate(model, codes, "test", cfg)  # the test split, scored once
    res |= {"selected_step": best["step"], "val_nats_per_code": best["val_nats_per_code"]}
    res["train_nats_per_code"] = dict(curves["train"])[best["step"]]  # at that step, dropout on
    imgs, res["sample_images_per_s"] = save_samples(model, vq, cfg, n=cfg.fid_samples)
    res |= fid_metrics(imgs, cfg, device) if cfg.fid_samples else {}
    if cfg.sweep:
        res["sweep"] = sweep(model, vq, cfg, device)
    res |= {"steps": step, "wall_s": time.perf_counter() - t0, "device": str(device)}
    res["train_images_per_s"] = speed if step > start else ckpt["train_images_per_s"]
    keys = ["test_nats_per_code", "test_bits_per_code", "test_top1", "fid"]
    return finish(cfg, res, curves, keys)

if __name__ == "__main__":
    main()
