"""Benchmark: KV-cache sampling vs full recomputation of the prefix at every step, same model, same generator.

    python tests/bench_prior_transformer.py                      # 6 layers x 256 wide, batch 64, 64 and 256 tokens
    python tests/bench_prior_transformer.py --lengths 64 --batch 16 --threads 1

Prints one row per sequence length: seconds per batch with the cache and without, the speed-up, samples per
second, and whether both produced identical sequences (they must: the cache changes speed, not results).
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import prior_transformer as pt  # noqa: E402


@torch.inference_mode()
def sample_by_recomputation(model, n, generator):
    """Prior.sample without its KV cache: the whole prefix runs through the model at every step."""
    seq = model.start(n)[:, None]
    for _ in range(model.wpe.num_embeddings):
        probs = model.logits(seq)[:, -1].softmax(-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], 1)
    return seq[:, 1:].view(n, *model.grid)


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--K", type=int, default=512, help="codebook size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lengths", default="64,256", help="comma-separated numbers of tokens (code grid sizes)")
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs (cached runs: 3x as many)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths = [int(n) for n in a.lengths.split(",")]
    cfg = pt.Config(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, dropout=0.0, attn_drop_p=0.0)
    print(f"torch {torch.__version__} | {platform.processor() or platform.machine()} | {os.cpu_count()} cpus, "
          f"{torch.get_num_threads()} torch threads | device {a.device}")
    print(f"GPT {a.n_layer} layers x {a.n_embd} wide, {a.n_head} heads, K {a.K}, batch {a.batch}, float32")
    print(f"{'tokens':>6} | {'params':>7} | {'cache s':>8} | {'recompute s':>11} | {'speed-up':>8} | {'cache samples/s':>15} | identical")
    for T in lengths:
        torch.manual_seed(0)
        model = pt.Prior(cfg, a.K, (1, T)).to(a.device).eval()  # a 1 x T grid: T tokens
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        sampler = {True: model.sample, False: lambda n, g: sample_by_recomputation(model, n, g)}
        run = lambda cache: sampler[cache](a.batch, torch.Generator(a.device).manual_seed(0))
        run(True)  # warm-up
        t_cache, s_cache = timed(lambda: run(True), 3 * a.repeats)
        t_full, s_full = timed(lambda: run(False), a.repeats)
        print(f"{T:>6} | {n_params:>6.2f}M | {t_cache:>8.2f} | {t_full:>11.2f} | {t_full / t_cache:>7.1f}x | "
              f"{a.batch / t_cache:>15.1f} | {torch.equal(s_cache, s_full)}", flush=True)


if __name__ == "__main__":
    main()
