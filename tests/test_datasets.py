"""--dataset stl10 and --dataset folder: the one loader every file repeats (the same text in each), its
cache, its held-out test split and its one-line errors, and every model end to end on both sets
(vqvae -> codes.pt -> prior through the command line at 32 and 64 pixels, the others in process)."""
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import glow
import metrics
import nice
import pixelcnn
import prior_transformer
import vae
import vqvae
from conftest import N_STL_TEST, N_STL_TRAIN, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
LOADERS = ["vae.py", "vqvae.py", "pixelcnn.py", "nice.py", "glow.py", "metrics.py"]
FUNCTIONS = ("load_split", "resize", "read_folder", "square", "hold_out_test")


def loader_text(name):  # the loader's functions as they stand in the file, nice's toy-set lines left out
    text = (ROOT / name).read_text()
    start = text.index("def load_split(cfg, train):")
    end = text.index("\n\n", text.index("def hold_out_test("))
    return [line for line in text[start:end].splitlines() if "TOY_SETS" not in line and "toy_data" not in line]


@pytest.mark.parametrize("name", LOADERS[1:])
def test_loader_is_the_same_text_in_every_file(name):
    ours, reference = loader_text(name), loader_text("vae.py")
    assert [f for f in FUNCTIONS if f"def {f}(" not in "\n".join(ours)] == []
    diff = [f"line {i}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(ours, reference)) if a != b]
    assert not diff and len(ours) == len(reference), diff[:3] or f"{len(ours)} != {len(reference)} lines"


def cfg_of(dataset, data_dir, out_dir, image_size=32):
    return vae.Config(dataset=dataset, data_dir=str(data_dir), out_dir=str(out_dir), image_size=image_size)


def test_stl10_reads_torchvisions_binaries_in_their_layout(stl10_dir, tmp_path):
    import conftest

    images = conftest.write_stl10_layout(tmp_path / "again", seed=30)  # the fixture's arrays, rebuilt
    x, y = vae.load_split(cfg_of("stl10", stl10_dir, tmp_path, image_size=96), train=True)
    assert x.dtype == torch.uint8 and x.shape == (N_STL_TRAIN, 3, 96, 96) and y.dtype == torch.int64
    want_x, want_y = images["train"]
    assert torch.equal(x, torch.from_numpy(want_x).permute(0, 3, 1, 2))  # 96 -> 96: not resampled
    assert torch.equal(y, torch.from_numpy(want_y).long()) and y.min() >= 0 and y.max() <= 9
    assert (x[:, 0, :8] == 255).all() and not (x[:, 0, :, :8] == 255).all()  # rows, not columns
    for size in (32, 64):
        x_test, y_test = vae.load_split(cfg_of("stl10", stl10_dir, tmp_path, size), train=False)
        assert x_test.shape == (N_STL_TEST, 3, size, size) and len(y_test) == N_STL_TEST
        ref = torch.nn.functional.interpolate(torch.from_numpy(images["test"][0]).permute(0, 3, 1, 2).float(),
                                              size, mode="area")  # the antialiased resize ~ a box average
        assert (x_test.float() - ref).abs().mean() < 6


def test_stl10_missing_is_a_one_line_error_naming_data_dir(tmp_path):
    with pytest.raises(SystemExit, match=r"no stl10 in --data_dir .* download failed") as e:
        glow.load_split(glow.Config(dataset="stl10", data_dir=str(tmp_path / "none")), train=True)
    assert "\n" not in str(e.value)


def test_folder_squares_images_of_mixed_sizes_labels_subfolders_and_holds_out_a_tenth(image_folder, tmp_path):
    cfg = cfg_of("folder", image_folder, tmp_path, image_size=24)
    x_train, y_train = vae.load_split(cfg, train=True)
    x_test, y_test = vae.load_split(cfg, train=False)
    assert x_train.shape == (72, 3, 24, 24) and x_test.shape == (8, 3, 24, 24) and x_train.dtype == torch.uint8
    assert set(y_train.tolist()) == {0, 1} and set(y_test.tolist()) <= {0, 1}  # cats 0, dogs 1 (sorted)
    # the class shows in its colour channel: cats (k = 0) are red, dogs (k = 1) green
    red = x_train[:, 0].float().mean((1, 2)) > x_train[:, 1].float().mean((1, 2))
    assert torch.equal(red, y_train == 0)
    # the split is fixed (seed 0, not --seed), disjoint, and covers the folder
    flat = lambda t: {bytes(im.numpy()) for im in t}
    assert not flat(x_train) & flat(x_test) and len(flat(x_train) | flat(x_test)) == 80
    again = vae.load_split(replace(cfg, seed=5), train=False)[0]
    assert torch.equal(again, x_test)
    # both splits come in the seeded random order, not the files' (sorted by class): the first N test
    # images, which pixelcnn, vae and vqvae score and show, are a fair sample of every class
    assert (y_train[1:] < y_train[:-1]).any() and (y_train[1:] > y_train[:-1]).any()


def test_folder_square_is_the_centre_crop(tmp_path):
    from PIL import Image

    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = 255  # the centre square white, the sides black
    Image.fromarray(a).save(tmp_path / "wide.png")
    im = vae.square(tmp_path / "wide.png", 10)
    assert im.shape == (3, 10, 10) and im.float().mean() > 250


def test_folder_cache_is_reused_and_rebuilt_when_the_folder_changes(image_folder, tmp_path, monkeypatch):
    cfg = cfg_of("folder", image_folder, tmp_path)
    reads = []
    real_square = glow.square
    monkeypatch.setattr(glow, "square", lambda path, size: reads.append(path) or real_square(path, size))
    x1, _ = glow.read_folder(cfg)
    assert len(reads) == 80 and (image_folder / "images-32px.pt").exists()  # next to the images
    x2, _ = glow.read_folder(cfg)
    assert len(reads) == 80 and torch.equal(x1, x2)  # the second run reads no image
    (image_folder / "cats" / "img002.png").unlink()  # a changed folder: read again
    write_image_folder(image_folder / "new", n=2, classes=())
    x3, y3 = glow.read_folder(cfg)
    assert len(reads) == 80 + 81 and len(x3) == 81 and set(y3.tolist()) == {0, 1, 2}
    glow.read_folder(replace(cfg, image_size=16))  # another size: another cache file
    assert (image_folder / "images-16px.pt").exists()


def test_folder_read_only_caches_in_out_dir(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != image_folder)
    out = tmp_path / "out"
    out.mkdir()
    x, _ = nice.read_folder(nice.Config(dataset="folder", data_dir=str(image_folder), out_dir=str(out)))
    assert (out / "images-32px.pt").exists() and not (image_folder / "images-32px.pt").exists()


def test_bad_folders_are_one_line_errors(tmp_path):
    def fails(folder, match):
        cfg = cfg_of("folder", folder, tmp_path)
        with pytest.raises(SystemExit, match=match) as e:
            pixelcnn.load_split(cfg, train=True)
        assert "\n" not in str(e.value) and str(e.value).startswith("pixelcnn.py: error:")

    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", r"needs 10 or more \.png or \.jpg files in --data_dir .*empty; found 0")
    fails(tmp_path / "missing", r"needs 10 or more .* found 0")
    folder = write_image_folder(tmp_path / "broken", n=12, classes=())
    (folder / "img005.png").write_bytes(b"not a png")
    fails(folder, r"cannot read the image .*img005\.png \(UnidentifiedImageError\); remove or replace it")
    (folder / "img005.png").unlink()
    data = (folder / "img004.jpg").read_bytes()
    (folder / "img004.jpg").write_bytes(data[: len(data) // 3])  # a truncated JPEG
    fails(folder, r"cannot read the image .*img004\.jpg \(OSError\)")


def test_metrics_on_a_folder_classifier_and_unlabelled(image_folder, tmp_path):
    x_test, _ = metrics.load_split(metrics.real("folder", image_folder, 32), train=False)
    res = metrics.evaluate(x_test, "folder", image_folder, "cpu", cache_dir=str(tmp_path / "cache"), kid_subsets=2)
    assert res["fid"] == pytest.approx(0, abs=1e-3) and res["fid_features"] == "classifier"
    with pytest.raises(SystemExit, match=r"expected at least 6 uint8 images .*\(3, 32, 32\) for folder"):
        metrics.evaluate(x_test[:, :1], "folder", image_folder, "cpu", cache_dir=str(tmp_path / "cache"))
    flat = write_image_folder(tmp_path / "flat", n=60, classes=())
    with pytest.raises(SystemExit, match="have no classes .* use --features inception"):
        metrics.evaluate(x_test, "folder", flat, "cpu", cache_dir=str(tmp_path / "cache2"))


def test_metrics_command_line_real_vs_real_on_stl10_at_64(stl10_dir, tmp_path, cli):
    r = cli("metrics.py", "--dataset", "stl10", "--data_dir", stl10_dir, "--real_vs_real", "--image_size", 64,
            "--cache_dir", tmp_path / "cache", "--out", tmp_path / "m.json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["n"] == N_STL_TRAIN and res["n_real_test"] == N_STL_TEST and res["fid"] >= 0


@pytest.mark.parametrize("size", [32, 64])
def test_cli_vqvae_codes_prior_on_a_folder(image_folder, tmp_path, cli, size):
    """The course's path: vqvae.py on a folder of images, its 8x8 codes, the prior on them, decoded."""
    common = ["--dataset", "folder", "--data_dir", image_folder, "--image_size", size, "--device", "cpu"]
    vq = ["--out_dir", tmp_path / "vq", "--hidden", 16, "--res_hidden", 8, "--codebook_size", 16, "--code_dim", 4,
          "--batch_size", 8, "--max_steps", 3, "--fid_samples", 0, "--n_samples", 4, "--write_codes"]
    r = cli("vqvae.py", *common, *vq)
    assert r.returncode == 0, r.stderr
    codes = torch.load(tmp_path / "vq" / "codes.pt", weights_only=True)
    assert codes["grid"] == [8, 8] and codes["train"].shape == (72, 8, 8) and codes["test"].shape == (8, 8, 8)
    assert codes["train_labels"].tolist().count(0) > 0 and codes["dataset"] == "folder"
    pr = ["--codes", tmp_path / "vq" / "codes.pt", "--out_dir", tmp_path / "prior", "--n_layer", 1, "--n_head", 2,
          "--n_embd", 16, "--batch_size", 8, "--max_steps", 3, "--eval_every", 3, "--fid_samples", 8,
          "--n_samples", 4, "--conditional"]
    r = cli("prior_transformer.py", *common[:4], "--device", "cpu", *pr)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("FINAL prior_transformer folder test_nats_per_code=")
    res = json.loads((tmp_path / "prior" / "results.json").read_text())
    assert np.load(tmp_path / "prior" / "samples.npz")["images"].shape[1:] == (3, size, size)
    assert "fid" in res  # metrics' classifier on the two subfolders


@pytest.mark.parametrize("dataset", ["folder", "stl10"])
def test_every_image_model_trains_on_both_sets(dataset, image_folder, stl10_dir, tmp_path):
    data_dir = str(image_folder if dataset == "folder" else stl10_dir)
    common = dict(dataset=dataset, data_dir=data_dir, device="cpu", max_steps=2, batch_size=8, log_every=1,
                  eval_every=100, n_samples=4, fid_samples=0)
    runs = {
        "vae": (vae, dict(hidden=8, latent_dim=4, iwae_k=2, iwae_images=4)),
        "glow": (glow, dict(K=1, hidden=8)),
        "nice": (nice, dict(hidden=8, n_couplings=2)),
        "pixelcnn": (pixelcnn, dict(hidden=6, n_layers=1, kernel=3, test_images=4, conditional=True)),
        "vqvae": (vqvae, dict(hidden=8, res_hidden=4, codebook_size=8, code_dim=4, image_size=64)),
    }
    for name, (mod, kw) in runs.items():
        cfg = mod.Config(**common, **kw, out_dir=str(tmp_path / name))
        res = mod.train(cfg)
        assert res["steps"] == 2, name
        size = kw.get("image_size", 32)
        config = json.loads((tmp_path / name / "results.json").read_text())["config"]
        assert config["image_size"] == size and config["dataset"] == dataset, name
    assert json.loads((tmp_path / "glow" / "results.json").read_text())["config"]["L"] == 3  # 32 -> 4x4
    glow64 = glow.train(glow.Config(**common, K=1, hidden=8, image_size=64, out_dir=str(tmp_path / "g64")))
    assert glow64["config"]["L"] == 4  # 64 -> 32 -> 16 -> 8 -> 4


@pytest.mark.parametrize("module, size, match", [
    (vae, 30, r"--image_size must be a multiple of 4 \(two stride-2 convolutions\), not 30"),
    (vqvae, 48, r"--image_size must be 16, 32, 64 or 128 \(halved to an 8x8 grid\), not 48"),
    (glow, 40, r"--L 4 cannot halve 40x40 images 4 times")])
def test_an_image_size_the_model_cannot_take_is_a_one_line_error(module, size, match, image_folder, tmp_path):
    cfg = module.Config(dataset="folder", data_dir=str(image_folder), image_size=size, device="cpu",
                        max_steps=1, out_dir=str(tmp_path / "out"), **({"L": 4} if module is glow else {}))
    with pytest.raises(SystemExit, match=match) as e:
        module.train(cfg)
    assert "\n" not in str(e.value)
