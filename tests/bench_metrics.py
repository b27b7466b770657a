"""Memory/speed benchmark of metrics.prdc: chunked pairwise distances for precision/recall/density/coverage.

    python tests/bench_metrics.py                       # n = 10k, 20k, 50k real and fake, 128-d features
    python tests/bench_metrics.py --sizes 50000 --block_mb 64 256

Each case runs in a fresh subprocess; peak memory = the process's peak RSS (ru_maxrss) minus its RSS just
before prdc (features already built). Bound: every distance block is float64 [rows, n] with
rows = block_bytes // (8 n), i.e. <= block_mb MiB; the density count makes one int64 temporary of the same
size and the comparisons a bool mask of 1/8 of it, so the extra peak is about 2.1 x block_mb + O(n) vectors,
independent of n^2 (an unchunked n x n float64 matrix at n = 50k would be 18.6 GiB).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(n, d, block_mb, k_pr, k_dc):
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    import metrics

    rng = np.random.default_rng(0)
    real = rng.normal(size=(n, d))
    fake = rng.normal(size=(n, d)) * 1.1 + 0.05
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0, c0 = time.time(), time.process_time()
    res = metrics.prdc(real, fake, k_pr, k_dc, block_bytes=block_mb * 2**20)
    wall, cpu = time.time() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "d": d, "block_mb": block_mb, "wall_s": wall, "cpu_s": cpu,
                      "extra_peak_mib": (peak - rss0) / 1024, "rss_before_mib": rss0 / 1024,
                      "threads": torch.get_num_threads(), **res}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 50000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block_mb", type=int, nargs="+", default=[128])
    p.add_argument("--k_pr", type=int, default=3)
    p.add_argument("--k_dc", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.sizes[0], a.dim, a.block_mb[0], a.k_pr, a.k_dc)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"hardware: {cpu}, {os.cpu_count()} cores visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"python {platform.python_version()}")
    print("| n real = n fake | dim | block bound (MiB) | unchunked n x n (MiB) | extra peak RSS (MiB) | wall (s) | "
          "CPU (s) | precision | recall | density | coverage |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in a.sizes:
        for mb in a.block_mb:
            cmd = [sys.executable, __file__, "--child", "--sizes", str(n), "--dim", str(a.dim), "--block_mb", str(mb),
                   "--k_pr", str(a.k_pr), "--k_dc", str(a.k_dc)]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            print(f"| {n} | {a.dim} | {mb} | {8 * n * n / 2**20:.0f} | {r['extra_peak_mib']:.0f} | {r['wall_s']:.1f} | "
                  f"{r['cpu_s']:.1f} | {r['precision']:.4f} | {r['recall']:.4f} | {r['density']:.4f} | "
                  f"{r['coverage']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
