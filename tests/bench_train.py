"""Benchmark the training steps of every model, eager against `--compile`, through each script's own train():
images per second of plain steps (the median time between two optimizer steps, after the first few, which
hold the compilation) and the ratio, with the loss of the last step of both runs to show that they agree.

    python tests/bench_train.py                       # CPU, one thread, the README's CPU recipe sizes
    python tests/bench_train.py --device cuda --threads 0 --steps 30
    python tests/bench_train.py --only glow.py,nice.py --json out/bench.json

The data are small synthetic MNIST-like sets in torchvision's layout (tests/conftest.py), written to a temporary
folder, so the benchmark runs offline; evaluation is cut to the minimum (the timing is of the training steps only).
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]
from conftest import write_mnist_layout  # noqa: E402

# the sizes of the README's CPU recipes; the last flags keep each run's final evaluation short
RECIPES = {
    "vae.py": "--batch_size 128 --iwae_k 0 --n_samples 4",
    "vqvae.py": "--hidden 64 --res_hidden 32 --batch_size 64 --n_samples 4",
    "prior_transformer.py": "--n_layer 4 --n_head 4 --n_embd 128 --dropout 0 --attn_drop_p 0 --batch_size 32 "
                            "--n_samples 4",
    "pixelcnn.py": "--hidden 32 --n_layers 6 --kernel 3 --batch_size 32 --n_samples 1",
    "nice.py": "--hidden 500 --batch_size 256 --n_samples 4",
    "glow.py": "--K 8 --hidden 32 --batch_size 64 --n_samples 4",
}


def timed_run(script, argv, device):
    """Run script's train(argv); returns (seconds between consecutive optimizer steps, last logged loss)."""
    mod = importlib.import_module(script[:-3])
    stamps, losses = [], []
    def after_step(opt, args, kwargs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    real_stop = mod.stop_if_diverged
    def record_loss(cfg, step, value, *a, **k):  # at log steps with the training loss, else a test metric
        if not a and "what" not in k:
            losses.append(float(value))
        return real_stop(cfg, step, value, *a, **k)
    handle = register_optimizer_step_post_hook(after_step)
    mod.stop_if_diverged = record_loss
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the scripts' own log lines
            res = mod.train(mod.parse_args([str(a) for a in argv]))
    finally:
        handle.remove()
        mod.stop_if_diverged = real_stop
    return [b - a for a, b in zip(stamps, stamps[1:])], losses[-1], res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=12, help="training steps per run (the first 4 are not timed)")
    p.add_argument("--only", default="", help="comma-separated scripts (default: all six)")
    p.add_argument("--dtype", default="float32", help="float32, or bfloat16 (autocast, CUDA)")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scripts = args.only.split(",") if args.only else list(RECIPES)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    write_mnist_layout(tmp, "MNIST", seed=0)
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"torch {torch.__version__} | {args.device} ({hw}) | {args.steps} steps per run, {args.dtype}")
    print("| script | eager img/s | compiled img/s | compiled / eager | last loss eager / compiled | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for script in scripts:
        if script == "prior_transformer.py" and not os.path.exists(f"{tmp}/vq/codes.pt"):
            timed_run("vqvae.py", [*common(tmp, "vq", args), "--max_steps", 2, "--hidden", 16, "--res_hidden", 8,
                                   "--codebook_size", 32, "--code_dim", 8], args.device)
        row = {"script": script}
        for mode in ("eager", "compiled"):
            flags = ["--compile"] if mode == "compiled" else []
            codes = ["--codes", f"{tmp}/vq/codes.pt"] if script == "prior_transformer.py" else []
            argv = [*common(tmp, f"{script}-{mode}", args), *RECIPES[script].split(), *codes, *flags,
                    "--max_steps", args.steps]
            t0 = time.perf_counter()
            dts, loss, res = timed_run(script, argv, args.device)
            batch = res["config"]["batch_size"]
            row[mode] = {"images_per_s": batch / statistics.median(dts[3:]), "last_loss": loss,
                         "first_step_s": dts[0] if dts else None, "run_s": time.perf_counter() - t0}
        row["ratio"] = row["compiled"]["images_per_s"] / row["eager"]["images_per_s"]
        rows.append(row)
        e, c = row["eager"], row["compiled"]
        print(f"| {script} | {e['images_per_s']:.0f} | {c['images_per_s']:.0f} | {row['ratio']:.2f}x | "
              f"{e['last_loss']:.5g} / {c['last_loss']:.5g} | {c['run_s'] - e['run_s']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": args.device, "hardware": hw, "rows": rows}, f, indent=2)


def common(tmp, name, args):  # the flags of every run: synthetic MNIST, no metrics, one log and eval at the end
    return ["--dataset", "mnist", "--data_dir", tmp, "--out_dir", f"{tmp}/{name.replace('.py', '')}",
            "--device", args.device, "--dtype", args.dtype, "--fid_samples", 0, "--log_every", args.steps,
            "--eval_every", args.steps]


if __name__ == "__main__":
    main()
