"""The prepared GPU check (not collected by pytest; needs CUDA and the real MNIST in --data_dir):
every script, a short run at its default model size, eager float32 and then `--compile --dtype bfloat16`.
Checks that every result is finite and prints, per run, images/s of plain steps, the first step's time (which
holds the compilation), peak GPU memory and the run's wall time; writes them all to one JSON.

    python tests/gpu_check.py --data_dir ../shared/data --out gpu_check.json    # about 5 minutes on an H100
    python tests/gpu_check.py --device cpu --tiny --steps 6    # a dry run of the check itself, on a CPU

The runs are short (40 steps): they test the GPU path (TF32, bf16 autocast, torch.compile, fused optimizers,
the end-of-run phases at their CUDA sizes, cut where noted below), not the models' quality.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]
from bench_train import timed_run  # noqa: E402
from test_faults import TINY  # noqa: E402

SCRIPTS = {  # default model sizes; the end-of-run phases cut so that the whole check fits in ~8 minutes
    "vqvae.py": "",  # first: its codes.pt feeds the prior
    "vae.py": "--iwae_k 100 --iwae_images 1000 --fid_samples 2000",  # the one run that also scores FID
    "prior_transformer.py": "",
    "pixelcnn.py": "--n_samples 16",
    "nice.py": "",
    "glow.py": "--n_samples 16",
}


def finite(res):  # every number in the results (config aside) is finite
    return all(math.isfinite(v) for k, v in res.items() if isinstance(v, (int, float)) and k != "config")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--only", default="", help="comma-separated scripts (default: all six)")
    p.add_argument("--device", default="cuda", help="cpu: a dry run (float32 only; no memory figures)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model sizes, for a dry run")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: no CUDA device here (a dry run: --device cpu --tiny)")
    out_root = os.path.abspath(os.path.splitext(args.out)[0] + "_runs")
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if cuda else "none", "runs": []}
    print(f"torch {torch.__version__} | {report['gpu']} | {args.steps} steps per run")
    print("| script | mode | img/s | first step s | peak GiB | run s | finite | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    scripts = args.only.split(",") if args.only else list(SCRIPTS)
    for script in scripts:
        dtype = "bfloat16" if cuda else "float32"
        for mode, flags in (("eager float32", []), (f"compile {dtype}", ["--compile", "--dtype", dtype])):
            tag = f"{script[:-3]}-{'compiled' if flags else 'eager'}"
            codes = ["--codes", f"{out_root}/vqvae-eager/codes.pt"] if script == "prior_transformer.py" else []
            argv = ["--dataset", "mnist", "--data_dir", args.data_dir, "--out_dir", f"{out_root}/{tag}",
                    "--device", args.device, "--max_steps", args.steps, "--log_every", args.steps // 2,
                    "--eval_every", args.steps, *SCRIPTS[script].split(), *codes, *flags]
            argv += TINY[script].split() if args.tiny else []
            if script != "vae.py":
                argv += ["--fid_samples", 0]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            row = {"script": script, "mode": mode, "argv": [str(a) for a in argv]}
            try:
                dts, loss, res = timed_run(script, argv, args.device)
                batch = res["config"]["batch_size"]
                row |= {"images_per_s": batch / sorted(dts[3:])[len(dts[3:]) // 2], "first_step_s": dts[0],
                        "last_loss": loss, "finite": finite(res) and math.isfinite(loss), "results": res}
            except BaseException as e:  # SystemExit of a one-line error too: report it and go on
                row |= {"error": f"{type(e).__name__}: {e}"[:500], "finite": False}
            row |= {"peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0,
                    "run_s": time.perf_counter() - t0}
            report["runs"].append(row)
            print(f"| {script} | {mode} | {row.get('images_per_s', 0):.0f} | {row.get('first_step_s', 0):.1f} | "
                  f"{row['peak_gib']:.2f} | {row['run_s']:.0f} | {row['finite']} | {row.get('error', '')} |",
                  flush=True)
            with open(args.out, "w") as f:  # after every run: a timeout keeps what was measured
                json.dump(report, f, indent=2)
    bad = [f"{r['script']} {r['mode']}" for r in report["runs"] if not r["finite"]]
    print("all finite" if not bad else f"FAILED: {', '.join(bad)}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
