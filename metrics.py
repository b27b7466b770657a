"""metrics.py: FID, KID, precision/recall, density/coverage and a classifier score of uint8 samples against the
dataset's complete official test split: the yardstick of every model here (comparable within this repository only).

FID (Heusel et al. 2017) via eigenvalues in float64 (no complex sqrtm, fine with N < dim); KID (Binkowski et al.
2018, cubic kernel, mean/std over subsets); precision & recall (Kynkaanniemi et al. 2019, k=3); density & coverage
(Naeem et al. 2020, k=5); classifier_score = exp(E_x KL(p(y|x) || p(y))), Inception-Score-style from OUR classifier.
Feature nets (`fid_features`): `classifier` (default, offline), a small CNN trained once on the train split, 128-d
penultimate layer; `inception`, pytorch-fid's TF-ported FID Inception-v3 (pool3, 2048-d) from a local weights file.
Cached (keys hold data size and hash) in --cache_dir, else <data_dir>/metrics/, else ~/.cache/generative-metrics.
  python metrics.py --dataset mnist --data_dir ../shared/data --real_vs_real   # the floor (train vs test)
  python metrics.py --dataset mnist --samples out/vae-mnist/samples.npz         # prints, writes JSON
  python metrics.py --dataset mnist --train_classifier                          # (re)train, print accuracy
Real MNIST, 2-core shared CPU: classifier (2 epochs, 937 steps) test accuracy 0.9887 in 398 s; floor train-10k vs
test: fid 2.09, precision 0.872, recall 0.893, density 0.930, coverage 0.951, classifier_score 9.59 (12 s CPU once
cached); full train 60k vs test: fid 1.67. Library: metrics.evaluate(uint8 [N,C,H,W], dataset, data_dir, device).
"""
import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VERSION = "v1"  # bump when a feature net's recipe or preprocessing changes: invalidates every cache file
SHAPES = {"mnist": (1, 28, 28), "fashion": (1, 28, 28), "cifar10": (3, 32, 32)}  # [C, H, W]
LAYOUT = {"mnist": "MNIST/raw/train-images-idx3-ubyte", "fashion": "FashionMNIST/raw/train-images-idx3-ubyte",
          "cifar10": "cifar-10-batches-py/data_batch_1"}
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
BLOCK_BYTES = 128 * 2**20  # a float64 block of pairwise distances is at most this big; peak extra memory of
# prdc() is about 2.1 blocks (the block, the int64 temporary of the density count, a bool mask) + O(n) vectors
_MEMO = {}  # (cache file, device) -> (net, reference), so repeated evaluate() calls load nothing twice


@dataclass
class Config:
    dataset: str = "fashion"  # mnist | fashion | cifar10
    data_dir: str = "./data"  # torchvision layout, <data_dir>/MNIST/raw/...
    samples: str = ""  # .npz with key `images`, uint8 [N,C,H,W], to evaluate
    out: str = ""  # JSON path; default <samples without .npz>.metrics-<features>.json
    real_vs_real: bool = False  # evaluate n_real train images against the test split: the floor
    n_real: int = 10000  # train images (seeded random subset) for --real_vs_real; 0 = the whole split
    train_classifier: bool = False  # (re)train the classifier feature net and print its test accuracy
    features: str = "classifier"  # classifier | inception
    inception_weights: str = ""  # path of pt_inception-2015-12-05-6726825d.pth; default: torch hub cache
    cache_dir: str = ""  # default <data_dir>/metrics, or ~/.cache/generative-metrics if data_dir is read-only
    device: str = "auto"  # auto = cuda, then mps, then cpu
    seed: int = 0  # KID subsets and the --real_vs_real subset


def fail(msg):
    raise SystemExit(f"metrics.py: error: {msg}")


# ----------------------------------------------------------------------------- the math (float64, CPU)
def mean_cov(f):
    """Gaussian fit of features [N, d]: mean [d] and unbiased covariance [d, d], float64."""
    f = np.asarray(f, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def psd_eigvals(s):
    """Eigenvalues, eigenvectors of a symmetric PSD matrix; eigenvalues within eigh's round-off of 0 (|w| < d eps
    max w) are set to 0 so that sqrt() does not turn ~1e-15 noise into ~1e-7 per dimension (FID(x, x) = 1e-5)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    tol = len(w) * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
    return np.where(w > tol, w, 0.0), v


def frechet_distance(mu1, s1, mu2, s2):
    """|mu1-mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2). eig(S1 S2) = eig(R R S2) = eig(R S2 R) with R = S1^(1/2)
    (eig(AB) = eig(BA)), and R S2 R is symmetric PSD: real eigenvalues, no complex sqrtm, any N vs d."""
    w, v = psd_eigvals(s1)
    r = (v * np.sqrt(w)) @ v.T  # R: the symmetric PSD square root of S1
    tr_sqrt = np.sqrt(psd_eigvals(r @ s2 @ r)[0]).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid(f1, f2):
    return frechet_distance(*mean_cov(f1), *mean_cov(f2))


def kid(f1, f2, n_subsets=100, subset_size=1000, seed=0):
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 on random subsets (without replacement); mean and std."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    d, m = f1.shape[1], min(subset_size, len(f1), len(f2))
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # mean over i != j: the unbiased terms
    rng, mmd = np.random.default_rng(seed), np.empty(n_subsets)
    for i in range(n_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        mmd[i] = off((x @ x.T / d + 1) ** 3) + off((y @ y.T / d + 1) ** 3) - 2 * ((x @ y.T / d + 1) ** 3).mean()
    return float(mmd.mean()), float(mmd.std())


def sq_dists(a, b, b_sq):
    """Squared distances [len(a), len(b)]: |a|^2 + |b|^2 - 2 a.b, clamped at 0 (float64 round-off)."""
    d = torch.addmm(b_sq[None], a, b.T, alpha=-2)
    return d.add_((a * a).sum(1, keepdim=True)).clamp_(min=0)


def knn_radii_sq(x, ks, block_bytes=BLOCK_BYTES):
    """{k: squared distance of each row of x to its k-th nearest other row}, in blocks of float64 [rows, N]."""
    x_sq, kmax, rows = (x * x).sum(1), max(ks), max(1, block_bytes // (8 * len(x)))
    out = {k: torch.empty(len(x), dtype=x.dtype) for k in ks}
    for i in range(0, len(x), rows):
        near = sq_dists(x[i:i + rows], x, x_sq).topk(kmax + 1, dim=1, largest=False).values  # sorted
        for k in ks:
            out[k][i:i + rows] = near[:, k]  # column 0 is the row itself (distance 0)
    return out


def prdc(real, fake, k_pr=3, k_dc=5, block_bytes=BLOCK_BYTES):
    """Precision/recall (k_pr-NN balls, Kynkaanniemi eq. 1) and density/coverage (k_dc, Naeem eqs. 3-4).
    Three passes over blocks of at most block_bytes: real-real and fake-fake for the radii, fake-real."""
    real, fake = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (real, fake))
    r_rad = knn_radii_sq(real, {k_pr, k_dc}, block_bytes)
    f_rad = knn_radii_sq(fake, {k_pr}, block_bytes)[k_pr]
    real_sq, rows = (real * real).sum(1), max(1, block_bytes // (8 * len(real)))
    in_real = torch.zeros(len(fake), dtype=torch.bool)  # fake j inside some real k_pr-ball
    n_balls = torch.zeros(len(fake), dtype=torch.float64)  # number of real k_dc-balls holding fake j
    in_fake = torch.zeros(len(real), dtype=torch.bool)  # real i inside some fake k_pr-ball
    nearest = torch.full((len(real),), math.inf, dtype=torch.float64)  # squared distance to nearest fake
    for j in range(0, len(fake), rows):
        d = sq_dists(fake[j:j + rows], real, real_sq)  # [rows, n_real]
        in_real[j:j + rows] = (d <= r_rad[k_pr]).any(1)
        n_balls[j:j + rows] = (d <= r_rad[k_dc]).sum(1)
        in_fake |= (d <= f_rad[j:j + rows, None]).any(0)
        nearest = torch.minimum(nearest, d.min(0).values)
        del d  # free this block before the next one is computed
    return {"precision": in_real.double().mean().item(), "recall": in_fake.double().mean().item(),
            "density": (n_balls.sum() / (k_dc * len(fake))).item(),
            "coverage": (nearest <= r_rad[k_dc]).double().mean().item()}


def classifier_score(logits):
    """exp(E_x KL(p(y|x) || p(y))) with p(y) = E_x p(y|x): Inception-Score-style, from our feature net."""
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), 1)
    logp_y = torch.logsumexp(logp, 0) - math.log(len(logp))
    return math.exp((logp.exp() * (logp - logp_y)).sum(1).mean().item())


# ----------------------------------------------------------------------------- feature networks
class Classifier(nn.Module):
    """Small CNN: two conv-BN-ReLU-pool blocks, a 128-d penultimate layer (the features), 10 logits."""

    def __init__(self, channels, size, dim=128, n_classes=10):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*block(channels, 32), *block(32, 64), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(64 * (size // 4) ** 2, dim), nn.ReLU())
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):  # x: float [B, C, H, W] in [0, 1] -> (features [B, 128], logits [B, 10])
        h = self.fc(self.conv(2 * x - 1))
        return h, self.head(h)


def _fid_block(base, pool):
    """torchvision's Inception block with the TF FID graph's pooling in its pool branch (as pytorch-fid)."""

    class Block(base):
        def _forward(self, x):
            out = super()._forward(x)
            out[-1] = self.branch_pool(pool(x))  # replaces the branch computed with count_include_pad=True
            return out

    return Block


class InceptionFeatures(nn.Module):
    """FID Inception-v3 (TF graph of 2015-12-05, ported by pytorch-fid): pool3 features [B, 2048], logits
    [B, 1008]. Input [0, 1], grayscale repeated to 3 channels, bilinear resize to 299 (no antialias), 2x-1."""

    def __init__(self):
        super().__init__()
        import torchvision.models.inception as tvi
        avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF ignores padding
        mx = lambda x: F.max_pool2d(x, 3, stride=1, padding=1)  # the FID graph's last block max-pools
        A, C = _fid_block(tvi.InceptionA, avg), _fid_block(tvi.InceptionC, avg)
        E1, E2 = _fid_block(tvi.InceptionE, avg), _fid_block(tvi.InceptionE, mx)
        self.net = net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
        net.Mixed_7b, net.Mixed_7c = E1(1280), E2(2048)

    @staticmethod
    def preprocess(x):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
        return 2 * x - 1  # the TF graph's input range [-1, 1]

    def forward(self, x):
        n, x = self.net, self.preprocess(x)
        for m in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3,
                  n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                  n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = m(x)
        h = x.mean((2, 3))  # pool3
        return h, n.fc(h)


def load_inception(path=""):
    p, net = Path(path or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE).expanduser(), InceptionFeatures()
    if not p.is_file():
        fail(f"FID Inception weights not found at {p}; download {INCEPTION_URL} where there is internet and "
             f"pass --inception_weights PATH (or copy it to {p})")
    try:
        net.net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    except Exception as e:
        fail(f"{p} is not pytorch-fid's FID Inception weights file ({type(e).__name__}: {str(e)[:80]})")
    net.weights_id = f"inception-{p.stat().st_size}-{p.stat().st_mtime_ns}"  # names its reference statistics
    return net.eval()


# ----------------------------------------------------------------------------- data, cache, training
def load_split(dataset, data_dir, train):
    """(x uint8 [N, C, H, W], y int64 [N]) of one official split, through torchvision (download=False first)."""
    import torchvision  # lazily: importing metrics stays cheap
    if dataset not in SHAPES:
        fail(f"--dataset must be one of {sorted(SHAPES)}, got {dataset!r}")
    cls = getattr(torchvision.datasets, {"mnist": "MNIST", "fashion": "FashionMNIST", "cifar10": "CIFAR10"}[dataset])
    for download in (False, True):
        try:
            ds = cls(str(data_dir), train=train, download=download)
            break
        except Exception:
            if download:
                fail(f"cannot load {dataset} from --data_dir {data_dir}: expected <data_dir>/{LAYOUT[dataset]} etc.")
    x = torch.as_tensor(ds.data)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]  # CIFAR is stored [N, H, W, C]
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


def fingerprint(*tensors):
    """Size and sha256 of the bytes: a classifier trained on other data can never be taken for this one."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return f"n{len(tensors[0])}-{h.hexdigest()[:12]}"


def cache_root(data_dir, cache_dir=""):
    if cache_dir:
        return Path(cache_dir)
    d = Path(data_dir) / "metrics"
    p = d if d.exists() else Path(data_dir)  # writable: mode bits too, since root passes os.access everywhere
    writable = p.is_dir() and os.access(p, os.W_OK) and bool(p.stat().st_mode & 0o200)
    return d if writable else Path.home() / ".cache" / "generative-metrics"


def cached(path, build, rebuild=False):
    """The torch file at path, else build() written atomically (a per-process temporary name, then a rename)."""
    try:
        if path.is_file() and not rebuild:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        print(f"metrics: ignoring unreadable cache file {path}")  # rebuilt and overwritten below
    obj = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return obj


def resolve_device(device):
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(auto if str(device) == "auto" else device)


def train_classifier(x, y, x_test, y_test, device, epochs=2, batch_size=128, lr=2e-3, min_steps=30, seed=0,
                     flip=False, log=print):
    """Adam with linear decay to 0; at least min_steps steps (small synthetic sets). Returns (net, test acc)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Classifier(x.shape[1], x.shape[2]).to(device)
    steps = max(epochs * len(x) // batch_size, min_steps)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # linear decay to 0
    x, y, t0 = x.to(device), y.to(device), time.time()
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g).to(device)
        xb = x[idx].float() / 255
        if flip:  # horizontal flips for fashion / cifar10, never digits
            m = (torch.rand(batch_size, generator=g) < 0.5).to(device)
            xb = torch.where(m[:, None, None, None], xb.flip(3), xb)
        loss = F.cross_entropy(net(xb)[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"metrics: classifier step {step + 1}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f}s")
    acc = (extract(net, x_test, device)[1].argmax(1) == y_test).double().mean().item()
    log(f"metrics: classifier test accuracy {acc:.4f} ({len(x_test)} test images, {time.time() - t0:.0f}s)")
    return net.eval(), acc


def extract(net, x, device, batch_size=500):
    """Features [N, d] and logits [N, K] (float32, CPU) of uint8 images [N, C, H, W], in batches."""
    with torch.inference_mode():
        out = [[t.float().cpu() for t in net.eval()(x[i:i + batch_size].to(device).float() / 255)]
               for i in range(0, len(x), batch_size)]
    return torch.cat([h for h, _ in out]), torch.cat([z for _, z in out])


def feature_net(dataset, data_dir, features, device, cache_dir="", inception_weights="", retrain=False,
                log=print):
    """(net, reference dict with test-split `feats`, `mu`, `sigma`, `logits`, `classifier_test_acc`, `n`)."""
    if features not in ("classifier", "inception"):
        fail(f"--features must be classifier or inception, got {features!r}")
    root, acc = cache_root(data_dir, cache_dir), None
    x_test, y_test = load_split(dataset, data_dir, train=False)
    if features == "classifier":
        x, y = load_split(dataset, data_dir, train=True)
        train_fp = fingerprint(x, y)
        path = root / f"classifier-{dataset}-{VERSION}-{train_fp}.pt"

        def train():
            log(f"metrics: training the {dataset} classifier feature net (once; cached at {path})")
            net, acc = train_classifier(x, y, x_test, y_test, device, flip=dataset != "mnist", log=log)
            return {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "test_acc": acc,
                    "train_fingerprint": train_fp, "version": VERSION}

        ckpt = cached(path, train, retrain)
        net, acc = Classifier(x.shape[1], x.shape[2]), ckpt["test_acc"]
        net.load_state_dict(ckpt["model"])
        net_fp = fingerprint(*net.state_dict().values())  # a retrained classifier never meets stale statistics
    else:
        net = load_inception(inception_weights)
        net_fp = net.weights_id
    net = net.to(device).eval()
    net_hash = hashlib.sha256(net_fp.encode()).hexdigest()[:8]
    ref_path = root / f"ref-{dataset}-{features}-{VERSION}-test{fingerprint(x_test, y_test)}-{net_hash}.pt"

    def reference():
        log(f"metrics: reference statistics of the {dataset} test split ({len(x_test)} images, {features})")
        feats, logits = extract(net, x_test, device)
        mu, sigma = map(torch.from_numpy, mean_cov(feats))
        return {"feats": feats, "logits": logits, "mu": mu, "sigma": sigma, "classifier_test_acc": acc,
                "n": len(x_test), "version": VERSION}

    key = (str(ref_path), str(device))
    if key not in _MEMO or retrain:
        _MEMO[key] = net, cached(ref_path, reference, retrain)
    return _MEMO[key]


# ----------------------------------------------------------------------------- evaluation
def score(feats, logits, ref, features, k_pr=3, k_dc=5, kid_subsets=100, kid_subset_size=1000, seed=0):
    """All metrics of generated features/logits against the reference (real test split) statistics."""
    f = np.asarray(feats, dtype=np.float64)
    if not np.isfinite(f).all() or not np.isfinite(np.asarray(logits)).all():
        fail("non-finite features: the feature net produced NaN/inf (expected finite uint8 images)")
    real = np.asarray(ref["feats"], dtype=np.float64)
    kid_mean, kid_std = kid(real, f, kid_subsets, kid_subset_size, seed)
    mu, sigma = np.asarray(ref["mu"], np.float64), np.asarray(ref["sigma"], np.float64)
    out = {"fid": frechet_distance(*mean_cov(f), mu, sigma), "kid": kid_mean, "kid_std": kid_std}
    out.update(prdc(real, f, k_pr, k_dc))
    out.update(classifier_score=classifier_score(logits), fid_features=features, n=len(f))
    return out


def evaluate(images, dataset, data_dir, device="auto", features="classifier", cache_dir="", inception_weights="",
             k_pr=3, k_dc=5, kid_subsets=100, kid_subset_size=1000, seed=0, log=print):
    """Metrics of uint8 samples [N, C, H, W] (CPU tensor or numpy) against the dataset's full test split:
    dict(fid, kid, kid_std, precision, recall, density, coverage, classifier_score, fid_features, n)."""
    if dataset not in SHAPES:
        fail(f"dataset must be one of {sorted(SHAPES)}, got {dataset!r}")
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    want = f"uint8 images in [0, 255] of shape [N, {', '.join(map(str, SHAPES[dataset]))}] for {dataset}"
    if not isinstance(x, torch.Tensor):
        fail(f"expected {want} (torch tensor or numpy array), got {type(images).__name__}")
    if x.dtype != torch.uint8:
        fail(f"expected {want}, got dtype {x.dtype} (floats in [0, 1]: (x * 255).round().to(torch.uint8))")
    if x.ndim != 4 or tuple(x.shape[1:]) != SHAPES[dataset]:
        fail(f"expected {want}, got shape {list(x.shape)}")
    if len(x) < max(k_pr, k_dc) + 1:
        fail(f"expected at least {max(k_pr, k_dc) + 1} images (k-NN radii need k + 1 points), got {len(x)}")
    dev = resolve_device(device)
    net, ref = feature_net(dataset, data_dir, features, dev, cache_dir, inception_weights, log=log)
    feats, logits = extract(net, x.cpu(), dev)
    return score(feats, logits, ref, features, k_pr, k_dc, kid_subsets, kid_subset_size, seed)


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"dataset": sorted(SHAPES), "features": ["classifier", "inception"]}
    as_bool = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    for f in fields(Config):
        if f.type in (bool, "bool"):  # --flag, --flag true/false/1/0/yes/no; anything else: argparse's error
            p.add_argument(f"--{f.name}", type=lambda s: as_bool.get(s.lower(), s), nargs="?", const=True,
                           choices=[True, False], default=f.default, metavar="BOOL", help=f"default: {f.default}")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, choices=choices.get(f.name),
                           help=f"default: {f.default!r}")
    cfg = Config(**vars(p.parse_args(argv)))
    if sum([bool(cfg.samples), cfg.real_vs_real, cfg.train_classifier]) != 1:
        fail("give exactly one of --samples PATH.npz, --real_vs_real, --train_classifier")
    if cfg.train_classifier and cfg.features != "classifier":
        fail("--train_classifier trains the `classifier` feature net; drop --features inception")
    if cfg.n_real < 0:
        fail(f"--n_real must be >= 0 (0 = the whole train split), got {cfg.n_real}")
    return cfg


def main(cfg):
    t0, dev = time.time(), resolve_device(cfg.device)
    net_args = dict(dataset=cfg.dataset, data_dir=cfg.data_dir, device=dev, features=cfg.features,
                    cache_dir=cfg.cache_dir, inception_weights=cfg.inception_weights)
    if cfg.train_classifier:
        _, ref = feature_net(**net_args, retrain=True)
        print(f"FINAL metrics classifier {cfg.dataset} test_acc={ref['classifier_test_acc']:.4f} "
              f"time={time.time() - t0:.0f}s device={dev}")
        return {"classifier_test_acc": ref["classifier_test_acc"]}
    if cfg.real_vs_real:
        x, _ = load_split(cfg.dataset, cfg.data_dir, train=True)
        if 0 < cfg.n_real < len(x):
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.n_real]]
        what = f"real train ({len(x)}) vs real test"
    else:
        try:
            with np.load(cfg.samples) as z:
                x, what = z["images"], cfg.samples
        except Exception as e:
            why = "not found" if isinstance(e, FileNotFoundError) else f"gives no key `images` ({type(e).__name__})"
            fail(f"--samples {cfg.samples} {why}; expected an .npz from np.savez(path, images=uint8 [N,C,H,W])")
    res = evaluate(x, **net_args, seed=cfg.seed)
    _, ref = feature_net(**net_args)  # memoised: the reference evaluate() just used
    res.update(dataset=cfg.dataset, evaluated=what, classifier_test_acc=ref["classifier_test_acc"],
               n_real_test=ref["n"], wall_s=round(time.time() - t0, 1), device=str(dev))
    print(json.dumps(res, indent=1))
    out = cfg.out or (f"{Path(cfg.samples).with_suffix('')}.metrics-{cfg.features}.json" if cfg.samples else "")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
    print(f"FINAL metrics {cfg.dataset} {what} fid={res['fid']:.4f} precision={res['precision']:.4f} "
          f"recall={res['recall']:.4f} time={res['wall_s']}s device={dev}")
    return res


if __name__ == "__main__":
    main(parse_args())
