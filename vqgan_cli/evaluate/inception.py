"""The Inception network of FID, KID and IS: torch-fidelity's InceptionV3 (the TF-FID port, bit-exact
with the reference numbers) with its weights read from a local file. Nothing is ever downloaded.

Why torch-fidelity: it is the maintained library most papers' numbers come from (pytorch-fid's
network with TensorFlow's resize, so values match the original TF FID), and it exposes the network
as a module that accepts a weights path. Its metric formulas are re-implemented in
:mod:`vqgan_cli.metrics` (tested against hand computations) so feature extraction runs once for
FID, KID and IS together.

Images go in as uint8 (B, 3, H, W) of any size; the network resizes them to 299 x 299 with
TensorFlow-1 bilinear interpolation (torch-fidelity's convention), so mixed sizes are allowed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FEATURES = ("2048", "logits_unbiased")  # pool features (FID, KID), logits (IS)


class EvaluationError(Exception):
    """A usage problem of ``vqgan evaluate`` (exit 2): too few images, mismatched statistics..."""


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights file is not where we looked; the message says how to fix it."""

    def __init__(self, path: Path, reason: str | None = None):
        self.path = path
        super().__init__(
            f"FID, KID, IS and rFID need torch-fidelity's InceptionV3 weights, file '{INCEPTION_FILE}'.\n"
            f"It {reason or 'was not found'} at:\n  {path}\n"
            f"Nothing is ever downloaded. To fix, either\n"
            f"  - put the file there (default place: $TORCH_HOME/hub/checkpoints/, i.e. torch.hub's "
            f"checkpoint folder), or\n"
            f"  - pass `inception_weights` /path/to/{INCEPTION_FILE}.\n"
            f"Get it on a machine with internet access from {INCEPTION_URL}\n"
            f"(or run `python -c \"import torch_fidelity; torch_fidelity.calculate_metrics(...)\"` there "
            f"once and copy it from its torch.hub cache).\n"
            f"For `evaluate tokenizer`, `no_fid` skips rFID instead.")


def default_weights_path() -> Path:
    """Where torch.hub (and torch-fidelity) would have cached the file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def require_fidelity():  # noqa: ANN201 - the module
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fe
    except ImportError as e:
        raise EvaluationError("FID/KID/IS need the torch-fidelity package: pip install -e '.[eval]' "
                              f"(or pip install torch-fidelity) ({e})") from None
    return fe


def check_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file to use, checked to exist and to be a readable state dict of the network
    (loaded with ``weights_only=True``); raises :class:`InceptionWeightsMissing` otherwise."""
    require_fidelity()
    p = Path(path).expanduser() if path is not None else default_weights_path()
    if not p.is_file():
        raise InceptionWeightsMissing(p)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
        raise InceptionWeightsMissing(p, f"is not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "fc.weight" not in state or tuple(state["fc.weight"].shape) != (1008, 2048):
        raise InceptionWeightsMissing(p, "is not torch-fidelity's InceptionV3 state dict (no fc.weight of "
                                         "shape (1008, 2048))")
    return p


class Inception:
    """Feature extractor: ``features(uint8 batch)`` -> (pool (B, 2048), logits (B, 1008)) float64."""

    def __init__(self, weights: str | Path | None = None, device: torch.device | str = "cpu"):
        self.path = check_inception_weights(weights)
        fe = require_fidelity()
        try:
            self.net = fe.FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES),
                                                      feature_extractor_weights_path=str(self.path))
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shapes
            raise InceptionWeightsMissing(self.path, f"does not match the network ({str(e)[:300]})") from None
        self.device = torch.device(device)
        self.net.to(self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        pool, logits = self.net(x.to(self.device))  # fp32 inside: FID is sensitive to precision
        return pool.double().cpu().numpy(), logits.double().cpu().numpy()


def to_uint8_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) model space [-1, 1] -> uint8 (B, 3, H, W) as saved PNGs are (grey -> RGB)."""
    u = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return u.repeat(1, 3, 1, 1) if u.shape[1] == 1 else u
