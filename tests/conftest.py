"""Shared test fixtures: small synthetic datasets written in torchvision's on-disk layout.

Every end-to-end test goes through the real torchvision loaders (MNIST, FashionMNIST, CIFAR10) with no
network (`stl10_dir` and `image_folder` below hold STL-10's binaries and a folder of images): `data_dir`
is a folder holding
    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte         (N_TRAIN / N_TEST images, 28x28)
    FashionMNIST/raw/... (same names)                              (N_TRAIN / N_TEST images, 28x28)
    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  (N_TRAIN / N_TEST images, 32x32x3)
The images are not noise: each of the 10 classes is a fixed smooth template plus noise, so a classifier
can learn them and a generative model has structure to find.
torchvision checks the md5 of the CIFAR-10 batches, which synthetic files cannot match: in-process tests
take the `cifar_no_md5` fixture, which switches that check off (command-line tests use MNIST/Fashion).
"""
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import vae` etc. however pytest was started

N_TRAIN, N_TEST = 512, 256


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (real data, minutes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-data checks that take minutes; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def synthetic_images(n, channels, size, seed):
    """n uint8 images [n, size, size, channels] and labels [n]: class template + noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    templates = []
    for c in range(10):  # a bright Gaussian blob and a stripe whose place and angle depend on the class
        t_rng = np.random.default_rng(1000 + c)
        cy, cx = t_rng.uniform(0.25, 0.75, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        angle = np.pi * c / 10
        stripe = np.exp(-(((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)) ** 2) / 0.005)
        tint = t_rng.uniform(0.5, 1.0, channels)
        templates.append(np.clip(blob + 0.7 * stripe, 0, 1)[..., None] * tint)
    labels = rng.integers(0, 10, n)
    x = np.stack([templates[k] for k in labels]) * rng.uniform(0.7, 1.0, (n, 1, 1, 1))
    x = x + rng.normal(0, 0.05, x.shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.uint8)


def write_idx(path, array):
    """The idx format of MNIST: magic (0x08 = ubyte, ndim), big-endian dims, then the raw bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist_layout(root, folder, seed):
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n, s in (("train", N_TRAIN, seed), ("t10k", N_TEST, seed + 1)):
        x, y = synthetic_images(n, 1, 28, s)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[..., 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)


def write_cifar_layout(root, seed):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = synthetic_images(N_TRAIN, 3, 32, seed)
    flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # CIFAR rows: 1024 R, then 1024 G, then 1024 B
    for i, idx in enumerate(np.array_split(np.arange(N_TRAIN), 5)):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": flat[idx], "labels": y[idx].tolist()}, f)
    x, y = synthetic_images(N_TEST, 3, 32, seed + 1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "labels": y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A --data_dir with synthetic MNIST, FashionMNIST and CIFAR-10 in torchvision's layout (read-only use)."""
    root = tmp_path_factory.mktemp("data")
    write_mnist_layout(root, "MNIST", seed=0)
    write_mnist_layout(root, "FashionMNIST", seed=10)
    write_cifar_layout(root, seed=20)
    return root


@pytest.fixture
def cifar_no_md5(monkeypatch):
    """Let torchvision's CIFAR10 accept the synthetic batches (their md5 cannot match the real ones)."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True)  # batches.meta


def run_cli(script, *args, timeout=300):
    """Run `python <script> args...` from the repository root; returns the CompletedProcess (text output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    """cli("vae.py", "--dataset", "mnist", ...) -> CompletedProcess with .returncode, .stdout, .stderr."""
    return run_cli


N_STL_TRAIN, N_STL_TEST = 60, 40


def write_stl10_layout(root, seed):
    """torchvision's STL-10 binaries: stl10_binary/{train,test}_X.bin (uint8 [N, 3, 96, 96], each
    channel stored column by column) and {train,test}_y.bin (labels 1..10). Returns the images."""
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True)
    images = {}
    for split, n, s in (("train", N_STL_TRAIN, seed), ("test", N_STL_TEST, seed + 1)):
        x, y = synthetic_images(n, 3, 96, s)  # [n, 96, 96, 3]
        x[:, :8, :, 0] = 255  # a red band along the top: the layout's rows and columns are not symmetric
        x.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")  # [n, C, W, H]: column-major
        (y + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        images[split] = (x, y)
    return images


@pytest.fixture(scope="session")
def stl10_dir(tmp_path_factory):
    """A --data_dir with synthetic STL-10 (60 train, 40 test images, 96x96 RGB); .images: the arrays."""
    root = tmp_path_factory.mktemp("stl10")
    write_stl10_layout(root, seed=30)
    return root


def write_image_folder(root, n=80, classes=("cats", "dogs"), seed=40):
    """n images in class subfolders (or in root itself when classes is empty), PNG and JPEG, of two sizes
    and aspects (48x40 and 100x80), each class a template of synthetic_images."""
    from PIL import Image

    root = Path(root)
    for i in range(n):
        k = i % max(1, len(classes))
        h, w = (48, 40) if i % 3 else (80, 100)
        x, _ = synthetic_images(1, 3, max(h, w), seed + i)
        x = np.ascontiguousarray(x[0, :h, :w])
        x[..., k] = np.maximum(x[..., k], 80 + 100 * k)  # the class shows in one colour channel
        folder = root / classes[k] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(folder / f"img{i:03d}.{'jpg' if i % 4 == 0 else 'png'}")
    return root


@pytest.fixture
def image_folder(tmp_path):
    """A fresh (writable) folder of 80 images in two class subfolders, two sizes, PNG and JPEG."""
    return write_image_folder(tmp_path / "faces")
