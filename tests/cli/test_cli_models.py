"""`vqgan reconstruct` and `vqgan convert` through the CLI, on tiny models."""

from __future__ import annotations

import math
import os
import pickle
import re

import numpy as np
import torch
from factory import tokenizer
from PIL import Image
from typer.testing import CliRunner

from vqgan_cli.checkpoints.load import load_tokenizer, save_tokenizer
from vqgan_cli.cli import app
from vqgan_cli.data.transforms import read_image
from vqgan_cli.evaluate.reconstruct import pad_to_multiple
from vqgan_cli.models.vqgan import VQGAN

runner = CliRunner()


def tiny_model() -> VQGAN:
    """f = 4 on 32 px: the 37x50 and 64x48 images below need padding to a multiple of 4."""
    return tokenizer(resolution=32, ch_mult=(1, 2, 2), attn_resolutions=(), n_embed=32)


def test_pad_to_multiple_keeps_content_and_reaches_factor():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    y = pad_to_multiple(x, 4)
    assert y.shape == (1, 2, 8, 8) and torch.equal(y[..., :5, :7], x)
    assert pad_to_multiple(y, 4) is y


def test_reconstruct_any_size_writes_pngs_and_scores(tmp_path):
    ckpt = save_tokenizer(tmp_path / "tok.safetensors", tiny_model())
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in {"a.png": (37, 50), "b.jpg": (64, 48)}.items():
        p = tmp_path / name
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    res = runner.invoke(app, ["reconstruct", *map(str, paths), str(broken), "--tokenizer", str(ckpt),
                              "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out_a = tmp_path / "out" / "a_rec.png"
    rec = np.asarray(Image.open(out_a))
    assert rec.shape == (37, 50, 3)
    # The printed PSNR is the PSNR of the written PNG against the input, up to 8-bit rounding.
    mse = ((rec / 255.0 - read_image(str(paths[0])) / 255.0) ** 2).mean()  # in [0, 1] space
    expected = 10 * math.log10(1 / mse)
    printed = float(re.search(r"a\.png\s*│\s*([\d.]+)", res.output).group(1))
    assert abs(printed - expected) < 0.05
    flat = res.output.replace("\n", "")
    assert "broken.png: not a readable image" in flat and "codebook usage:" in flat


def _official_file(tmp_path, model: VQGAN) -> os.PathLike:
    state = {f"{k}": v for k, v in model.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": state, "global_step": 7, "optimizer_states": [{"lr": 1e-4}]}, path)
    return path


def test_convert_round_trip_is_bit_exact(tmp_path):
    model = tiny_model()
    src = _official_file(tmp_path, model)
    out = tmp_path / "ours.safetensors"
    res = runner.invoke(app, ["convert", str(src), str(out), "--resolution", "32"])
    assert res.exit_code == 0, res.output
    a, b = load_tokenizer(src, resolution=32), load_tokenizer(out)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ea, eb = a.encode(x), b.encode(x)
        assert torch.equal(ea.indices, eb.indices)
        assert torch.equal(a.decode_indices(ea.indices), b.decode_indices(eb.indices))
        assert torch.equal(model.decode_indices(ea.indices), a.decode_indices(ea.indices))


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.ckpt"
    with open(src, "wb") as fh:
        pickle.dump({"state_dict": {}, "x": _Evil(str(marker))}, fh)
    res = runner.invoke(app, ["convert", str(src), str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2
    assert "evil.ckpt" in res.output and "system" in res.output
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()
