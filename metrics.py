"""The shared yardstick: FID (Heusel et al. 2017), KID (Binkowski et al. 2018), precision and
recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020) and a classifier score
of uint8 samples against the complete official test split. Our deviation: by default the features
(`fid_features`) are those of a small CNN trained once on the dataset's own training split
(`classifier`), not pytorch-fid's FID Inception-v3 (`inception`, from a local weights file), so the
numbers compare within this repository only. Library: metrics.evaluate(images, dataset, data_dir).
    python metrics.py --dataset mnist --samples out/vae-mnist/samples.npz   # or --real_vs_real
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
from torchvision.models import inception

# --------------------------------------------------------------------------- the metrics (float64)
BLOCK_BYTES = 128 * 2**20  # the most memory one float64 block of pairwise distances takes

def mean_cov(f):  # the Gaussian fit of features [N, d]: mean [d] and unbiased covariance [d, d]
    f = np.asarray(f, dtype=np.float64)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))

def psd_eigh(s):  # eigenvalues and eigenvectors of a symmetric PSD matrix (any N, also N < d)
    w, v = np.linalg.eigh((s + s.T) / 2)
    tol = len(w) * np.finfo(float).eps * np.abs(w).max(initial=1e-300)
    return np.where(w > tol, w, 0.0), v  # round-off to 0: its sqrt would add 1e-7 per dimension

def frechet_distance(mu1, s1, mu2, s2):  # |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)
    w, v = psd_eigh(s1)
    r = (v * np.sqrt(w)) @ v.T  # R = S1^(1/2), so eig(S1 S2) = eig(R R S2) = eig(R S2 R)
    tr_sqrt = np.sqrt(psd_eigh(r @ s2 @ r)[0]).sum()  # R S2 R is symmetric PSD: no complex sqrtm
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)

def fid(f1, f2):  # FID of two feature sets [N, d]
    return frechet_distance(*mean_cov(f1), *mean_cov(f2))

def kid(f1, f2, n_subsets=100, subset_size=1000, seed=0):  # MMD^2 over random subsets: mean, std
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    rng = np.random.default_rng(seed)
    mmd = []
    for _ in range(n_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3  # the cubic kernel k(a, b) = (a.b / d + 1)^3 of all pairs
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        pairs = m * (m - 1)  # within a set, pairs i != j only: that makes MMD^2 unbiased
        within = (k_xx.sum() - np.trace(k_xx)) / pairs + (k_yy.sum() - np.trace(k_yy)) / pairs
        mmd.append(within - 2 * k_xy.mean())
    return float(np.mean(mmd)), float(np.std(mmd))

def sq_dists(a, b, b_sq):  # squared distances [len(a), len(b)] = |a|^2 + |b|^2 - 2 a.b
    d = torch.addmm(b_sq[None], a, b.T, alpha=-2)
    return d.add_((a * a).sum(1, keepdim=True)).clamp_(min=0)  # clamped: float64 round-off

def knn_radii_sq(x, ks, block_bytes=BLOCK_BYTES):  # {k: squared distance to the k-th nearest other}
    x_sq = (x * x).sum(1)
    rows = max(1, block_bytes // (8 * len(x)))  # a block of distances: [rows, N]
    near = [sq_dists(xb, x, x_sq).topk(max(ks) + 1, largest=False).values for xb in x.split(rows)]
    near = torch.cat(near)  # [N, kmax + 1], sorted; column 0 is the point itself
    return {k: near[:, k] for k in ks}

def prdc(real, fake, k_pr=3, k_dc=5, block_bytes=BLOCK_BYTES):  # Kynkaanniemi eq. 1; Naeem eqs. 3-4
    real = torch.as_tensor(real).double()
    fake = torch.as_tensor(fake).double()
    real_radii = knn_radii_sq(real, {k_pr, k_dc}, block_bytes)
    fake_radii = knn_radii_sq(fake, {k_pr}, block_bytes)[k_pr]
    real_sq = (real * real).sum(1)
    rows = max(1, block_bytes // (8 * len(real)))
    in_real = []  # fake j inside some real k_pr-ball: precision
    n_balls = []  # how many real k_dc-balls hold fake j: density
    in_fake = torch.zeros(len(real), dtype=torch.bool)  # real i inside some fake k_pr-ball: recall
    nearest = torch.full((len(real),), math.inf, dtype=torch.float64)  # to a fake: coverage
    for block, radii in zip(fake.split(rows), fake_radii.split(rows)):
        d = sq_dists(block, real, real_sq)  # [rows, n_real]
        in_real.append((d <= real_radii[k_pr]).any(1))
        n_balls.append((d <= real_radii[k_dc]).sum(1))
        in_fake |= (d <= radii[:, None]).any(0)
        nearest = torch.minimum(nearest, d.min(0).values)
        del d  # free this block before the next one is computed
    return {"precision": torch.cat(in_real).double().mean().item(),
            "recall": in_fake.double().mean().item(),
            "density": torch.cat(n_balls).sum().item() / (k_dc * len(fake)),
            "coverage": (nearest <= real_radii[k_dc]).double().mean().item()}

def classifier_score(logits):  # exp E_x KL(p(y|x) || p(y)), p(y) = E_x p(y|x): Inception-Score-like
    logp = torch.log_softmax(torch.as_tensor(logits).double(), 1)
    logp_y = torch.logsumexp(logp, 0) - math.log(len(logp))
    return math.exp((logp.exp() * (logp - logp_y)).sum(1).mean().item())

# --------------------------------------------------------------------------- feature networks
class Classifier(nn.Module):  # the `classifier` features: a small CNN's 128-d penultimate layer
    def __init__(self, channels, size, classes=10):
        super().__init__()
        self.conv = nn.Sequential(  # two blocks of conv, batch norm, ReLU, 2x2 max pool: H, W / 4
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)
    def forward(self, x):  # x in [0, 1]: features [B, 128], logits [B, classes]
        h = self.fc(self.conv(2 * x - 1))
        return h, self.head(h)

def fid_block(base, max_pool=False):  # torchvision's block, pooled as in TF's FID graph
    class Block(base):
        def _forward(self, x):
            out = super()._forward(x)
            if max_pool:  # the FID graph's last block
                x = F.max_pool2d(x, 3, stride=1, padding=1)
            else:  # TF's average leaves the padded zeros out, torchvision's counts them
                x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            out[-1] = self.branch_pool(x)
            return out
    return Block

def inception_input(x):  # [0, 1], grey to RGB, bilinear (no antialias) to 299 x 299, to [-1, 1]
    x = F.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear")
    return 2 * x - 1

class InceptionFeatures(inception.Inception3):  # TF's FID Inception-v3 (2015-12-05), as pytorch-fid
    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = fid_block(inception.InceptionA)(192, 32)
        self.Mixed_5c = fid_block(inception.InceptionA)(256, 64)
        self.Mixed_5d = fid_block(inception.InceptionA)(288, 64)
        self.Mixed_6b = fid_block(inception.InceptionC)(768, 128)
        self.Mixed_6c = fid_block(inception.InceptionC)(768, 160)
        self.Mixed_6d = fid_block(inception.InceptionC)(768, 160)
        self.Mixed_6e = fid_block(inception.InceptionC)(768, 192)
        self.Mixed_7b = fid_block(inception.InceptionE)(1280)
        self.Mixed_7c = fid_block(inception.InceptionE, max_pool=True)(2048)
    def forward(self, x):  # x in [0, 1]: pool3 features [B, 2048], logits [B, 1008]
        x = inception_input(x)
        for layer in list(self.children())[:-3]:  # all but avgpool, dropout and fc
            x = layer(x)
        h = x.mean((2, 3))  # pool3
        return h, self.fc(h)

def load_inception(path):  # from a local file (default: torch hub's cache): nothing is downloaded
    path = Path(path or f"{torch.hub.get_dir()}/checkpoints/{INCEPTION_FILE}").expanduser()
    if not path.is_file():
        fail(f"FID Inception weights not found at {path}; download {INCEPTION_URL} (where there "
             "is internet) and pass --inception_weights PATH")
    net = InceptionFeatures()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        fail(f"{path} is not pytorch-fid's FID Inception weights file ({type(e).__name__})")
    net.weights_id = f"inception-{path.stat().st_size}-{path.stat().st_mtime_ns}"  # names its cache
    return net.eval()

# --------------------------------------------------------------------------- data, cache, training
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

def real(dataset, data_dir, image_size=32):  # what load_split reads (a model file passes its cfg)
    spare = cache_root(data_dir)  # where the images of a read-only folder are cached
    return argparse.Namespace(dataset=dataset, data_dir=str(data_dir), image_size=image_size,
                              out_dir=str(spare))

def log(cfg, msg):  # as the model files' log, without a log.txt
    print(f"metrics: {msg}", flush=True)

def progress(cfg, what, items):  # yields the items; a line with the ETA every 10 s of a long phase
    t0 = last = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if time.perf_counter() - last > 10 and i < len(items):
            last = time.perf_counter()
            log(cfg, f"{what} {i}/{len(items)} | eta {(last - t0) * (len(items) - i) / i:.0f}s")

def fingerprint(*tensors):  # size and sha256 of the bytes: names what a cache file was built from
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.cpu().numpy().tobytes())  # in C order, however t is strided
    return f"n{len(tensors[0])}-{h.hexdigest()[:12]}"

def cache_root(data_dir, cache_dir=""):  # --cache_dir, else <data_dir>/metrics if writable
    if cache_dir:
        return Path(cache_dir)
    root = Path(data_dir) / "metrics"
    p = root if root.exists() else Path(data_dir)
    writable = p.is_dir() and os.access(p, os.W_OK) and p.stat().st_mode & 0o200  # also for root
    return root if writable else Path.home() / ".cache" / "generative-metrics"

def read_cache(path):  # the torch file at path; None when missing or unreadable (then rebuilt)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None

def write_cache(obj, path):  # atomically: a temporary file of this process, then a rename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)

@torch.inference_mode()
def extract(net, x, device):  # features [N, d] and logits [N, K] (float32, CPU) of uint8 images
    feats, logits = zip(*[net(xb.to(device).float() / 255) for xb in x.split(500)])
    feats = torch.cat(feats).cpu()
    logits = torch.cat(logits).cpu()
    if not (feats.isfinite().all() and logits.isfinite().all()):  # never a silent NaN FID
        fail("non-finite features: the feature net produced NaN/inf")
    return feats, logits

def train_classifier(x, y, flip):  # Adam, 2 epochs of batches of 128, lr linearly down to 0
    g = torch.Generator().manual_seed(0)  # on the CPU: the same batches on every device
    torch.manual_seed(0)
    net = Classifier(x.shape[1], x.shape[2], int(y.max()) + 1).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = max(2 * len(x) // 128, 30)  # at least 30 steps on tiny test sets
    for step in range(steps):
        idx = torch.randint(len(x), (128,), generator=g).to(x.device)
        xb = x[idx].float() / 255
        if flip:  # horizontal flips for clothes and objects, never for digits
            m = (torch.rand(128, generator=g) < 0.5).to(x.device)
            xb = torch.where(m[:, None, None, None], xb.flip(3), xb)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - step / steps)
        loss = F.cross_entropy(net(xb)[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"metrics: classifier step {step + 1}/{steps} | loss {loss.item():.3f}")
    return net

def classifier(dataset, data_dir, root, device, retrain=False, image_size=32):  # trained once
    x, y = load_split(real(dataset, data_dir, image_size), train=True)
    if y.max() == 0:  # a folder without class subfolders
        fail(f"the images in {data_dir} have no classes (subfolders) to train the classifier "
             "features on; use --features inception, or sort them into class subfolders")
    path = root / f"classifier-{dataset}-{VERSION}-{fingerprint(x, y)}.pt"
    ckpt = None if retrain else read_cache(path)
    if ckpt is None:
        print(f"metrics: training the {dataset} classifier feature net (once; cached at {path})")
        net = train_classifier(x.to(device), y.to(device), flip=dataset != "mnist")
        ckpt = {"model": net.cpu().state_dict()}
        write_cache(ckpt, path)
    net = Classifier(x.shape[1], x.shape[2], int(y.max()) + 1)
    net.load_state_dict(ckpt["model"])
    net.weights_id = fingerprint(*net.state_dict().values())  # a retrained net: a new reference
    return net

def feature_net(dataset, data_dir, device, features="classifier", cache_dir="",
                inception_weights="", retrain=False, image_size=32):  # (net, the test features)
    root = cache_root(data_dir, cache_dir)
    if features == "classifier":
        net = classifier(dataset, data_dir, root, device, retrain, image_size)
    else:
        net = load_inception(inception_weights)
    net = net.to(device).eval()
    x_test, y_test = load_split(real(dataset, data_dir, image_size), train=False)
    test_id = fingerprint(x_test, y_test)
    net_hash = hashlib.sha256(net.weights_id.encode()).hexdigest()[:8]
    path = root / f"ref-{dataset}-{features}-{VERSION}-test{test_id}-{net_hash}.pt"
    ref = read_cache(path)
    if ref is None:
        feats, logits = extract(net, x_test, device)
        acc = (logits.argmax(1) == y_test).double().mean().item()  # of the classifier only
        acc = acc if features == "classifier" else None
        ref = {"feats": feats, "logits": logits, "classifier_test_acc": acc}
        write_cache(ref, path)
        print(f"metrics: {features} features of the {dataset} test split cached (accuracy {acc})")
    return net, ref

# --------------------------------------------------------------------------- evaluation, command line
def pick_device(name):  # auto: cuda, then mps, then cpu; a missing device is a one-line error
    if str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.empty(0, device=name)  # fails at once for an unknown or missing device
    except Exception as e:
        fail(f"--device {name} is not available here ({type(e).__name__}); try --device cpu")
    return torch.device(name)

def evaluate(images, dataset, data_dir, device="auto", features="classifier", cache_dir="",
             inception_weights="", kid_subsets=100, seed=0):  # of uint8 samples [N, C, H, W]
    if dataset not in DATASETS or features not in CHOICES["features"]:
        fail(f"unknown dataset {dataset!r} or features {features!r}; expected one of {CHOICES}")
    x = images if torch.is_tensor(images) else torch.as_tensor(np.ascontiguousarray(images))
    size = x.shape[-1] if dataset in ("stl10", "folder") else 32  # as the model files' --image_size
    shape = (1, 28, 28) if dataset in ("mnist", "fashion") else (3, size, size)  # (C, H, W)
    if x.dtype != torch.uint8 or x.shape[1:] != shape or len(x) < 6:  # the 5-NN radii: 6 points
        fail(f"expected at least 6 uint8 images [N, C, H, W], (C, H, W) = {shape} for {dataset}, "
             f"got {x.dtype} {list(x.shape)} (from [0, 1]: (x * 255).round().byte())")
    device = pick_device(device)
    net, ref = feature_net(dataset, data_dir, device, features, cache_dir, inception_weights,
                           image_size=size)
    if len(ref["feats"]) < 6:  # the 5-NN radii of precision, recall, density and coverage
        fail(f"the {dataset} test split has {len(ref['feats'])} images; the metrics need 6 or more")
    feats, logits = extract(net, x.cpu(), device)
    kid_mean, kid_std = kid(ref["feats"], feats, kid_subsets, seed=seed)
    res = {"fid": fid(feats, ref["feats"]), "kid": kid_mean, "kid_std": kid_std}
    res |= prdc(ref["feats"], feats) | {"classifier_score": classifier_score(logits)}
    return res | {"fid_features": features, "n": len(x)}

@dataclasses.dataclass
class Config:
    dataset: str = "fashion"  # fashion | mnist | cifar10 | stl10 | folder
    data_dir: str = "./data"  # torchvision's root (<data_dir>/MNIST/raw/...), or the folder
    image_size: int = 32  # of stl10 and folder images for --real_vs_real (else the samples')
    samples: str = ""  # an .npz with key `images`, uint8 [N, C, H, W], to evaluate
    real_vs_real: bool = False  # evaluate n_real training images instead: the floor
    n_real: int = 10000  # a seeded random subset of the training split; 0: all of it
    train_classifier: bool = False  # (re)train the classifier feature net, print its test accuracy
    features: str = "classifier"  # classifier | inception
    inception_weights: str = ""  # pytorch-fid's weights file; empty: torch hub's checkpoints folder
    cache_dir: str = ""  # empty: <data_dir>/metrics, or ~/.cache/generative-metrics if read-only
    out: str = ""  # the results' JSON; empty: <samples without .npz>.metrics-<features>.json
    device: str = "auto"  # auto: cuda, then mps, then cpu
    seed: int = 0  # of the KID subsets and of the --real_vs_real subset

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "stl10": "STL10",
            "folder": None}  # folder: the images under --data_dir
CHOICES = {"dataset": tuple(DATASETS), "features": ("classifier", "inception")}
VERSION = "v1"  # in every cache file's name: bump it when a feature net's recipe changes
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"

def fail(msg):  # a one-line error for the user's mistakes, never a traceback
    raise SystemExit(f"{os.path.basename(__file__)}: error: {msg}")

def boolean(s):  # argparse turns the ValueError into a one-line "invalid boolean value" error
    if s.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(s)
    return s.lower() in ("true", "1", "yes")

def parse_args(argv=None) -> Config:  # a flag per field; -h shows its comment and default
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    notes = dict(re.findall(r"\n +(\w+): .+?  # (.+)", inspect.getsource(Config)))
    for f in dataclasses.fields(Config):  # bools: --real_vs_real, --real_vs_real true
        kind = {"type": boolean, "nargs": "?", "const": True} if f.type is bool else {"type": f.type}
        p.add_argument(f"--{f.name}", **kind, default=f.default, choices=CHOICES.get(f.name),
                       help=f"{notes.get(f.name, '')} (default: {f.default!r})")
    return Config(**vars(p.parse_args(argv)))

def main(cfg: Config) -> dict:  # prints the results and the FINAL line, writes the JSON
    if cfg.n_real < 0:
        fail(f"--n_real must be >= 0 (0: the whole training split), got {cfg.n_real}")
    if bool(cfg.samples) + cfg.real_vs_real + cfg.train_classifier != 1:
        fail("give exactly one of --samples PATH.npz, --real_vs_real, --train_classifier")
    out = cfg.out
    if cfg.samples and not out:
        out = f"{Path(cfg.samples).with_suffix('')}.metrics-{cfg.features}.json"
    folder = os.path.dirname(os.path.abspath(out))
    if out and (os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
        fail(f"cannot write --out {out}: it is a folder, or its folder is missing or read-only")
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    if cfg.train_classifier:
        _, ref = feature_net(cfg.dataset, cfg.data_dir, device, "classifier", cfg.cache_dir,
                             retrain=True, image_size=cfg.image_size)
        print(f"FINAL metrics classifier {cfg.dataset} test_acc={ref['classifier_test_acc']:.4f}")
        return ref
    if cfg.samples:
        try:
            with np.load(cfg.samples) as npz:
                x = npz["images"]
        except Exception as e:
            fail(f"cannot read key `images` of --samples {cfg.samples} ({type(e).__name__}); "
                 "expected an .npz from np.savez(path, images=uint8 [N, C, H, W])")
    else:
        x = load_split(real(cfg.dataset, cfg.data_dir, cfg.image_size), train=True)[0]
        if 0 < cfg.n_real < len(x):  # a seeded random subset
            g = torch.Generator().manual_seed(cfg.seed)
            x = x[torch.randperm(len(x), generator=g)[:cfg.n_real]]
    what = cfg.samples or f"real train ({len(x)}) vs real test"
    nets = (cfg.dataset, cfg.data_dir, device, cfg.features, cfg.cache_dir, cfg.inception_weights)
    res = evaluate(x, *nets, seed=cfg.seed)
    ref = feature_net(*nets, image_size=x.shape[-1])[1]  # the reference that evaluate() used
    res |= {"dataset": cfg.dataset, "evaluated": what, "n_real_test": len(ref["feats"]),
            "classifier_test_acc": ref["classifier_test_acc"], "device": str(device),
            "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(res, indent=1))
    if out:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
    shown = " ".join(f"{k}={res[k]:.4f}" for k in ("fid", "precision", "recall"))
    print(f"FINAL metrics {cfg.dataset} {what} {shown} time={res['wall_s']}s device={device}")
    return res

if __name__ == "__main__":
    main(parse_args())
