"""The scaffolding block (command line, checks, device and DDP, checkpoint loading, log, results) is the
same text in every model file, so a reader who has read it once can skip it in the others."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ["vae.py", "vqvae.py", "prior_transformer.py", "pixelcnn.py", "nice.py", "glow.py"]
START = "# -------------------------------------------------------------- scaffolding, the same in every model file\n"
END = "\n# --------------------------------------------------------------------------- training\n"


def block(name):
    text = (ROOT / name).read_text()
    assert text.count(START) == 1 and text.count(END) == 1, f"{name}: the scaffolding markers"
    return text[text.index(START):text.index(END)]


@pytest.mark.parametrize("name", MODEL_FILES[1:])
def test_scaffolding_is_the_same_text_as_in_vae(name):
    ours, reference = block(name).splitlines(), block("vae.py").splitlines()
    diff = [f"line {i}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(ours, reference)) if a != b]
    assert not diff and len(ours) == len(reference), diff[:3] or f"{len(ours)} != {len(reference)} lines"
