"""The faults a new user hits, each through the command line on tiny synthetic data: work never lost to a
kill -9 or a broken yardstick, guards that tell the truth (a diverged run exits non-zero and never
replaces a good checkpoint), flags as people type them, and one-line errors instead of tracebacks.

A kill -9 at a chosen moment: `killed(...)` runs the script's real main() (its real argv parsing) in a
child process whose function `at` was replaced by `os.kill(os.getpid(), SIGKILL)`.
"""
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli

SCRIPTS = ["vae.py", "vqvae.py", "prior_transformer.py", "pixelcnn.py", "nice.py", "glow.py"]
TINY = {  # the smallest model of each script, and short runs: seconds each on a CPU
    "vae.py": "--hidden 8 --latent_dim 4 --batch_size 16 --iwae_k 2 --iwae_images 8",
    "vqvae.py": "--hidden 16 --res_hidden 8 --codebook_size 16 --code_dim 8 --batch_size 16",
    "prior_transformer.py": "--n_layer 1 --n_head 1 --n_embd 16 --batch_size 16 --warmup_steps 1",
    "pixelcnn.py": "--hidden 8 --n_layers 2 --kernel 3 --levels 4 --batch_size 8 --n_samples 2",
    "nice.py": "--hidden 16 --batch_size 32",
    "glow.py": "--K 1 --hidden 8 --batch_size 16 --warmup_steps 1 --n_samples 4",
}


def args(script, data_dir, out, *more, steps=4, codes=None):
    extra = ["--codes", codes] if script == "prior_transformer.py" else []
    return [*TINY[script].split(), "--dataset", "mnist", "--data_dir", data_dir, "--out_dir", out, "--device",
            "cpu", "--max_steps", steps, "--eval_every", 2, "--log_every", 2, "--fid_samples", 0, *extra, *more]


def killed(script, argv, at, tmp_path):
    """Run `python script argv` with the module function `at` replaced by a kill -9; returns stderr."""
    mod = script[:-3]
    driver = tmp_path / f"kill_{mod}.py"
    driver.write_text(f"import os, signal, sys\nsys.argv = {[script, *map(str, argv)]!r}\nimport {mod}\n"
                      f"{mod}.{at} = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n{mod}.main()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, driver], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    return r.stderr


def one_line_error(r, *words):
    err = r.stderr.strip()
    assert r.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope="module")
def vq(data_dir, tmp_path_factory):
    """A tiny trained VQ-VAE and its codes.pt, for the prior's cases."""
    out = tmp_path_factory.mktemp("vq")
    r = run_cli("vqvae.py", *args("vqvae.py", data_dir, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


# ---------------------------------------------------------------------------------------------- work lost
@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_during_the_final_metrics_keeps_a_whole_checkpoint(script, data_dir, tmp_path, vq):
    out = tmp_path / "run"
    argv = args(script, data_dir, out, "--fid_samples", 8, "--eval_every", 100, codes=vq / "codes.pt")
    killed(script, argv, "fid_metrics", tmp_path)  # eval_every > max_steps: only the last step saves
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["script"] == script
    if script == "vqvae.py":  # codes.pt was written before the metrics, from this checkpoint
        codes = torch.load(out / "codes.pt", weights_only=True)
        assert codes["vqvae_sha256"] == importlib.import_module("vqvae").file_fingerprint(out / "ckpt.pt")
    mod = importlib.import_module(script[:-3])
    res = mod.train(mod.parse_args(list(map(str, args(script, data_dir, out, "--eval_only", codes=vq / "codes.pt")))))
    assert res["steps"] == 4 and res["train_images_per_s"] == ckpt["train_images_per_s"] > 0


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_whole(data_dir, tmp_path):
    out = tmp_path / "run"
    driver = tmp_path / "half_write.py"  # the second checkpoint is killed half-written
    driver.write_text(
        "import io, os, signal, sys, torch\n"
        f"sys.argv = {['vae.py', *map(str, args('vae.py', data_dir, out))]!r}\n"
        "import vae\nreal, calls = torch.save, []\n"
        "def half(obj, path):\n"
        "    calls.append(path)\n"
        "    if len(calls) < 2:\n        return real(obj, path)\n"
        "    buf = io.BytesIO()\n    real(obj, buf)\n"
        "    open(path, 'wb').write(buf.getvalue()[: len(buf.getvalue()) // 2])\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = half\nvae.main()\n")
    r = subprocess.run([sys.executable, driver], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2  # the step-2 one, whole
    r = run_cli("vae.py", *args("vae.py", data_dir, out, "--resume"))  # and --resume continues from it
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded" in r.stdout and "at step 2" in r.stdout and json.loads((out / "results.json").read_text())["steps"] == 4


def test_vqvae_codes_are_never_stale_and_the_prior_fix_it_command_runs_as_printed(data_dir, tmp_path, vq):
    out = tmp_path / "vq"
    shutil.copytree(vq, out)
    codes = torch.load(out / "codes.pt", weights_only=True)
    codes["vqvae_ckpt"] = str(out / "ckpt.pt")  # the copy's codes.pt names the copy's checkpoint
    torch.save(codes, out / "codes.pt")
    # a longer run, killed after the loop before codes.pt is written: codes.pt is of the old checkpoint
    killed("vqvae.py", args("vqvae.py", data_dir, out, "--resume", steps=6), "write_codes", tmp_path)
    prior = args("prior_transformer.py", data_dir, tmp_path / "prior", codes=out / "codes.pt")
    err = one_line_error(run_cli("prior_transformer.py", *prior), "is missing or changed since it wrote")
    fix = err.split("`")[1].split()  # the command the message prints: `python vqvae.py ... --write_codes`
    assert fix[:2] == ["python", "vqvae.py"]
    r = subprocess.run([sys.executable, *fix[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("prior_transformer.py", *prior)
    assert r.returncode == 0 and "FINAL prior_transformer" in r.stdout, r.stderr[-2000:]


def test_the_prior_finds_a_moved_vqvae_beside_codes_pt(data_dir, tmp_path, vq):
    moved = tmp_path / "moved"
    shutil.copytree(vq, moved)  # codes.pt still names the original folder's ckpt.pt, which is gone:
    original = torch.load(moved / "codes.pt", weights_only=True)
    original["vqvae_ckpt"] = str(tmp_path / "gone" / "ckpt.pt")
    torch.save(original, moved / "codes.pt")
    r = run_cli("prior_transformer.py", *args("prior_transformer.py", data_dir, tmp_path / "p", codes=moved / "codes.pt"))
    assert r.returncode == 0 and "FINAL prior_transformer" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("script", ["pixelcnn.py", "nice.py", "glow.py"])
def test_a_copied_file_runs_alone_with_the_default_fid_samples(script, data_dir, tmp_path):
    shutil.copy(ROOT / script, tmp_path)  # no metrics.py beside it
    argv = args(script, data_dir, tmp_path / "run", "--fid_samples", 16)  # the last --fid_samples wins
    r = subprocess.run([sys.executable, script, *map(str, argv)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "metrics failed, fid left empty: ModuleNotFoundError" in r.stdout
    for f in ("ckpt.pt", "results.json", "loss.png", "log.txt"):
        assert (tmp_path / "run" / f).exists(), f


@pytest.mark.parametrize("script", ["vqvae.py", "prior_transformer.py"])
def test_max_steps_0_is_a_one_line_error(script, data_dir, tmp_path, vq):
    r = run_cli(script, *args(script, data_dir, tmp_path, steps=0, codes=vq / "codes.pt"))
    one_line_error(r, "--max_steps must be >= 1, got 0")


# -------------------------------------------------------------------------------------- guards that lie
def test_divergence_from_scratch_says_no_checkpoint_was_written(data_dir, tmp_path):
    r = run_cli("vae.py", *args("vae.py", data_dir, tmp_path, "--lr", "1e6", steps=20))
    one_line_error(r, "the training loss diverged at step", "no checkpoint was written")
    assert not (tmp_path / "ckpt.pt").exists()


def test_pixelcnn_huge_finite_losses_are_divergence_too(data_dir, tmp_path):
    r = run_cli("pixelcnn.py", *args("pixelcnn.py", data_dir, tmp_path, "--lr", "1e8", steps=20))
    one_line_error(r, "pixelcnn.py: error: the training loss diverged at step", "no checkpoint was written")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_non_finite_test_metric_never_replaces_the_good_checkpoint(script, data_dir, tmp_path, vq, monkeypatch):
    mod = importlib.import_module(script[:-3])
    argv = list(map(str, args(script, data_dir, tmp_path, codes=vq / "codes.pt")))
    mod.train(mod.parse_args(argv))  # a good run: ckpt.pt at step 4
    good = (tmp_path / "ckpt.pt").read_bytes()
    real = mod.evaluate

    def nan_metrics(*a, **k):  # the training loss stays finite, the test metric does not
        out = real(*a, **k)
        res = out[0] if isinstance(out, tuple) else out
        res.update({k: math.nan for k, v in res.items() if isinstance(v, float)})
        return out

    monkeypatch.setattr(mod, "evaluate", nan_metrics)
    with pytest.raises(SystemExit, match="the test metric diverged at step 6 \\(nan\\); the last good ckpt.pt is kept"):
        mod.train(mod.parse_args([*argv, "--max_steps", "8", "--resume"]))
    assert (tmp_path / "ckpt.pt").read_bytes() == good


# ------------------------------------------------------------------------------------ flags and messages
@pytest.mark.parametrize("script", SCRIPTS + ["metrics.py"])
def test_bare_and_valued_bool_flags_and_help_with_comments(script, capsys):
    mod = importlib.import_module(script[:-3])
    flag = "real_vs_real" if script == "metrics.py" else "resume"
    assert getattr(mod.parse_args([f"--{flag}"]), flag) is True
    assert getattr(mod.parse_args([f"--{flag}", "true"]), flag) is True
    assert getattr(mod.parse_args([f"--{flag}", "no"]), flag) is False
    with pytest.raises(SystemExit):
        mod.parse_args(["-h"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: " in help_text and "(default: )" not in help_text
    if script != "metrics.py":
        assert f"(default: out/{script[:-3]}-{{dataset}})" in help_text  # the real default out_dir
        assert "continue from <out_dir>/ckpt.pt (default: False)" in help_text  # Config's comment


@pytest.mark.parametrize("script", SCRIPTS)
def test_unwritable_out_dir_other_dataset_and_bad_numbers_are_one_line(script, data_dir, tmp_path, vq):
    mod = importlib.import_module(script[:-3])
    argv = list(map(str, args(script, data_dir, tmp_path / "run", codes=vq / "codes.pt")))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out_dir .*a_file"):
        mod.train(mod.parse_args([*argv, "--out_dir", str(tmp_path / "a_file")]))
    with pytest.raises(SystemExit, match="--lr must be >= 0, got -1.0"):
        mod.train(mod.parse_args([*argv, "--lr", "-1"]))
    mod.train(mod.parse_args(argv))
    other = "cifar10" if script == "prior_transformer.py" else "fashion"  # the prior: its codes say mnist
    if script != "prior_transformer.py":
        with pytest.raises(SystemExit, match=f"checkpoint of mnist, not {script}'s of fashion"):
            mod.train(mod.parse_args([*argv, "--dataset", other, "--eval_only"]))
    res = mod.train(mod.parse_args([*argv, "--resume", "--eval_only"]))  # eval_only wins: no training
    assert res["steps"] == 4
    path = tmp_path / "run" / "ckpt.pt"  # as an older version of the file wrote it
    ckpt = torch.load(path, weights_only=True)
    if "best" in ckpt:  # nice, prior: the model selection came later
        torch.save({k: v for k, v in ckpt.items() if k != "best"}, path)
        with pytest.raises(SystemExit, match="holds no selected model \\(older code\\); train anew"):
            mod.train(mod.parse_args([*argv, "--resume"]))
    del ckpt["config"][mod.ARCH[-1]]
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=f"ckpt.pt lacks settings that this {script} needs; train anew"):
        mod.train(mod.parse_args([*argv, "--resume"]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_is_a_one_line_error(data_dir, tmp_path):
    tmp_path.chmod(0o500)
    try:
        one_line_error(run_cli("vae.py", *args("vae.py", data_dir, tmp_path / "run")), "cannot write to --out_dir")
    finally:
        tmp_path.chmod(0o700)


def test_command_line_messages(data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(os.urandom(1000))
    err = one_line_error(run_cli("glow.py", *args("glow.py", data_dir, tmp_path / "run", "--eval_only")),
                         "is not a checkpoint these files wrote")
    assert "weights_only" not in err
    assert run_cli("vae.py", *args("vae.py", data_dir, tmp_path / "vae")).returncode == 0
    one_line_error(run_cli("glow.py", *args("glow.py", data_dir, tmp_path / "vae", "--resume")),
                   "is vae.py's checkpoint of mnist, not glow.py's of mnist")
    r = run_cli("vae.py", *args("vae.py", tmp_path / "nowhere", tmp_path / "o"))  # no data, no network here
    one_line_error(r, "no mnist in --data_dir", "its download failed")
    r = run_cli("vae.py", *args("vae.py", data_dir, tmp_path / "o", "--batch_size", 10 ** 12))
    one_line_error(r, "out of memory at --batch_size 1000000000000")
    r = run_cli("metrics.py", "--dataset", "mnist", "--data_dir", data_dir, "--samples", tmp_path / "s.npz",
                "--out", tmp_path)
    one_line_error(r, "cannot write --out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("script", ["glow.py", "metrics.py"])
def test_device_cuda_without_a_gpu_is_a_one_line_error(script, data_dir, tmp_path):
    more = ["--samples", tmp_path / "s.npz"] if script == "metrics.py" else ["--out_dir", tmp_path]
    r = run_cli(script, "--dataset", "mnist", "--data_dir", data_dir, "--device", "cuda", *more)
    one_line_error(r, "--device cuda is not available here")


@pytest.mark.parametrize("module", [s[:-3] for s in SCRIPTS if s != "prior_transformer.py"] + ["metrics"])
def test_missing_data_says_when_the_download_failed_for_lack_of_network(module, tmp_path, monkeypatch):
    mod = importlib.import_module(module)
    def offline(*a, **k):  # what torchvision raises when no mirror can be reached
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")
    monkeypatch.setattr(mod.torchvision.datasets, "MNIST", offline)
    with pytest.raises(SystemExit, match=r"no mnist in --data_dir \S+ and its download failed \(no network\)"):
        mod.load_split(mod.Config(dataset="mnist", data_dir=str(tmp_path)), train=True)
    def broken(*a, **k):
        raise ValueError("a corrupt file")
    monkeypatch.setattr(mod.torchvision.datasets, "MNIST", broken)
    with pytest.raises(SystemExit, match=r"its download failed \(ValueError\)"):
        mod.load_split(mod.Config(dataset="mnist", data_dir=str(tmp_path)), train=True)
