"""Benchmark: pixelcnn.py's fast sampler against the naive loop (the whole network on the whole image for every
value, tests/test_pixelcnn.py's naive_sample), from the same generator seed, so both must give identical images.

    python tests/bench_pixelcnn.py                        # default network, 28x28x1, batch 1 (CPU: minutes)
    python tests/bench_pixelcnn.py --hidden 32 --n_layers 6 --size 16 --batch 4   # quicker check
    python tests/bench_pixelcnn.py --batch 64 --device cuda

Weights are random (untrained): sampling cost does not depend on them. Prints a table and the hardware.
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pixelcnn  # noqa: E402
from test_pixelcnn import naive_sample  # noqa: E402


def main():
    d = pixelcnn.Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=28, help="image height = width")
    p.add_argument("--channels", type=int, default=1, help="1 (MNIST-like) or 3 (RGB, R -> G -> B)")
    p.add_argument("--batch", type=int, default=1, help="images sampled in parallel")
    p.add_argument("--arch", default=d.arch, choices=("gated", "pixelcnn"))
    p.add_argument("--output", default=d.output, choices=("softmax", "logistic_mix"))
    p.add_argument("--levels", type=int, default=d.levels)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--n_layers", type=int, default=d.n_layers)
    p.add_argument("--kernel", type=int, default=d.kernel)
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = pixelcnn.Config(arch=a.arch, output=a.output, levels=a.levels, hidden=a.hidden, n_layers=a.n_layers,
                          kernel=a.kernel, dataset="cifar10" if a.channels == 3 else "mnist")
    pixelcnn.check(cfg)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    torch.set_default_dtype(getattr(torch, a.dtype))  # the model computes in the default dtype
    torch.manual_seed(a.seed)
    model = pixelcnn.Model(cfg, (a.channels, a.size, a.size)).to(device).eval()
    rows, images = [], {}  # fast runs first, so it also pays any one-time warm-up
    for name, sample in (("fast", model.sample), ("naive", lambda n, g: naive_sample(model, n, g))):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        images[name] = sample(a.batch, torch.Generator(device).manual_seed(a.seed))  # the same noise
        sync()
        rows.append((name, time.perf_counter() - t0))
    same = (images["fast"] == images["naive"]).float().mean().item()
    hw = (torch.cuda.get_device_name(device) if device.type == "cuda" else
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"pixelcnn sampler benchmark | {a.arch} {a.output} levels={a.levels} hidden={a.hidden} "
          f"n_layers={a.n_layers} kernel={a.kernel} | {a.batch} x {a.channels}x{a.size}x{a.size} | {a.dtype}")
    print(f"hardware: {hw} | torch {torch.__version__} | device {device}")
    print(f"{'sampler':8s} {'seconds':>9s} {'images/s':>9s} {'speedup':>8s}")
    for name, s in rows:
        print(f"{name:8s} {s:9.2f} {a.batch / s:9.3f} {rows[1][1] / s:7.1f}x")
    print(f"identical values: {same * 100:.2f}% of {images['fast'].numel()} "
          f"({'IDENTICAL' if same == 1.0 else 'DIFFERENT'})")
    return 0 if same == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
