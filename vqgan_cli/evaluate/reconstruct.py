"""Reconstruct images of any size through a tokenizer and score them (PSNR, SSIM, code usage)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vqgan_cli.data import DataError
from vqgan_cli.data.transforms import image_to_tensor, read_image
from vqgan_cli.images import save_png
from vqgan_cli.metrics import code_counts, codebook_usage, psnr, ssim
from vqgan_cli.models.vqgan import VQGAN


class Reconstruction(NamedTuple):
    source: Path
    output: Path
    psnr: float
    ssim: float


class ReconstructReport(NamedTuple):
    items: list[Reconstruction]
    skipped: list[str]          # "path: reason" for inputs that could not be read
    mean_psnr: float
    mean_ssim: float
    codebook_usage: float       # share of the codebook used by all images together
    n_codes: int = 0            # token ids the tokenizer emits (codebook, or remapped range)

    def table(self) -> list[tuple[str, ...]]:
        """Header, one row per image, the mean."""
        rows = [(i.source.name, f"{i.psnr:.2f}", f"{i.ssim:.4f}", i.output.name) for i in self.items]
        return [("image", "PSNR dB", "SSIM", "written"), *rows,
                ("[bold]mean", f"{self.mean_psnr:.2f}", f"{self.mean_ssim:.4f}", "")]

    def usage_line(self) -> str:
        return f"codebook usage: {self.codebook_usage:.1%} of {self.n_codes} codes"


def pad_to_multiple(x: torch.Tensor, f: int) -> torch.Tensor:
    """Pad right/bottom so both sides are multiples of f; reflection keeps the border natural."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % f, (-w) % f
    if not (ph or pw):
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@torch.no_grad()
def reconstruct_image(model: VQGAN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1,3,H,W) in [-1,1] -> (reconstruction cropped back to H x W, token indices)."""
    h, w = x.shape[-2:]
    enc = model.encode(pad_to_multiple(x, model.factor))
    x_hat = model.decode(enc.z_q)[..., :h, :w]
    return x_hat.clamp(-1, 1), enc.indices


def reconstruct_files(model: VQGAN, paths: list[Path], out_dir: Path,
                      device: torch.device | None = None) -> ReconstructReport:
    """Write ``<stem>_rec.png`` for each readable input; unreadable ones are reported, not fatal,
    unless none is left: a DataError then says why each input was skipped."""
    if model.config.autoencoder.in_channels != 3:
        raise DataError(f"reconstruct works on RGB image tokenizers; this one takes "
                        f"{model.config.autoencoder.in_channels} channels ({model.config.modality})")
    device = device or next(model.parameters()).device
    counts = torch.zeros(model.n_tokens, dtype=torch.long)
    items: list[Reconstruction] = []
    skipped: list[str] = []
    for path in paths:
        try:
            rgb = read_image(str(path))
        except DataError as e:
            skipped.append(str(e))
            continue
        x = image_to_tensor(rgb)[None].to(device)
        x_hat, idx = reconstruct_image(model, x)
        counts += code_counts(idx.cpu(), counts.numel())
        out = save_png(out_dir / f"{path.stem}_rec.png", x_hat[0])
        items.append(Reconstruction(path, out, float(psnr(x_hat.float(), x)[0]), float(ssim(x_hat.float(), x)[0])))
    if not items:
        raise DataError(f"nothing was reconstructed: none of the {len(paths)} input(s) could be read"
                        + "".join(f"\n  - {s}" for s in skipped))
    n = len(items)
    return ReconstructReport(items, skipped, sum(i.psnr for i in items) / n, sum(i.ssim for i in items) / n,
                             codebook_usage(counts), model.n_tokens)


def reconstruct_paths(tokenizer: str | Path, paths: list[Path], out_dir: Path, device: str = "auto",
                      config: str | Path | None = None) -> ReconstructReport:
    """``vqgan reconstruct``: load the tokenizer (ours, or an official .ckpt with its YAML) on
    ``device`` and reconstruct ``paths`` into ``out_dir``."""
    from vqgan_cli.checkpoints.load import load_tokenizer
    from vqgan_cli.runtime import resolve_device

    dev = resolve_device(device)
    model = load_tokenizer(tokenizer, config=str(config) if config else None).to(dev)
    return reconstruct_files(model, paths, out_dir, dev)
