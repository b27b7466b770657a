"""Benchmark one Glow training step (forward, backward, clip, Adam) at the default size on the current device:
time per step and peak memory. Any glow.py flag picks another size; the data is random uint8 images.

    python tests/bench_glow.py                                   # glow.py's defaults (fashion, L=2 K=32 hidden=512, batch 64)
    python tests/bench_glow.py --dataset cifar10 --steps 5       # L=3, 3x32x32
    OMP_NUM_THREADS=1 python tests/bench_glow.py --threads 1 --steps 2

Peak memory: torch.cuda.max_memory_allocated during the timed steps on CUDA; on CPU the process's peak
resident set size (ru_maxrss, includes the Python + torch baseline, which is printed too).
"""
import argparse
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import glow  # noqa: E402


def rss_mib():  # peak resident set of this process so far (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up step)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: torch's default)")
    args, rest = p.parse_known_args()
    cfg = glow.parse_args(rest)
    shape = (3, 32, 32) if cfg.dataset == "cifar10" else (1, 28, 28)
    cfg.L = cfg.L or (3 if shape[1] % 8 == 0 else 2)  # as glow.train: L = 0 is auto
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    base_rss = rss_mib()
    torch.manual_seed(cfg.seed)
    model = glow.Glow(cfg, shape).to(device)
    opt = glow.OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr)
    x = torch.randint(0, 256, (cfg.batch_size, *shape), dtype=torch.uint8, device=device)
    model.data_init(x)
    fwd = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with autocast:
            loss, _ = fwd(glow.dequantize(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels, compilation
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]  # median
    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)}"
        mem = f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB (cuda max allocated)"
    else:
        hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        mem = f"{rss_mib():.0f} MiB peak RSS (baseline {base_rss:.0f} MiB before the model)"
    n_params = sum(q.numel() for q in model.parameters())
    print(f"torch {torch.__version__} | device {device} ({hw})")
    print("| dataset | L | K | hidden | batch | dtype | params | s/step (median of %d) | img/s | peak memory |" % args.steps)
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {cfg.dataset} {'x'.join(map(str, shape))} | {cfg.L} | {cfg.K} | {cfg.hidden} | {cfg.batch_size} | {cfg.dtype}"
          f"{' compiled' if cfg.compile else ''} | {n_params / 1e6:.1f}M | {t:.3f} | {cfg.batch_size / t:.1f} | {mem} |")


if __name__ == "__main__":
    main()
