"""LPIPS (VGG16, v0.1 heads) built without ever touching the network.

The ``lpips`` package would fetch torchvision's ImageNet VGG16 on construction. We build it with a
random trunk (``pnet_rand=True``, no download) and then copy the VGG16 ``features.*`` tensors in
from a file we were told about, so a missing file is a clear error up front instead of a hang or a
silent download. The linear heads (``lin0..lin4``) ship inside the ``lpips`` package and are loaded
by the package itself (``pretrained=True``).

``backbone`` values (recipe key ``loss.lpips_backbone``):

- ``"torchvision"``: ``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``, where torchvision
  would have cached it (``$TORCH_HOME/hub/checkpoints``);
- a path to that same file stored elsewhere;
- ``"random"``: untrained trunk, for tests only -- its numbers mean nothing.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
RANDOM_BACKBONE = "random"
# torchvision's VGG16 "D" layout up to relu5_3 (features 0..29): conv widths, "M" = max-pool.
_VGG16_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TORCHVISION_BACKBONE = "torchvision"


class PerceptualWeightsMissing(Exception):
    """The VGG16 weights LPIPS needs are not where the recipe says; the message says how to fix it."""

    def __init__(self, path: Path, backbone: str, reason: str | None = None):
        self.path = path
        self.backbone = backbone
        why = ("loss.lpips_backbone 'torchvision' looks in torch.hub's checkpoint folder, "
               "$TORCH_HOME/hub/checkpoints" if backbone == TORCHVISION_BACKBONE
               else "the file named by loss.lpips_backbone")
        super().__init__(
            f"The perceptual loss (LPIPS) needs torchvision's ImageNet VGG16 weights, file "
            f"'{VGG16_FILE}'.\n"
            f"It {reason or 'was not found'} at:\n"
            f"  {path}\n"
            f"({why}). Nothing is ever downloaded. To fix, either\n"
            f"  - put the file at that path (torchvision publishes it as {VGG16_URL}), or\n"
            f"  - name a copy elsewhere in the recipe: `loss.lpips_backbone: /path/to/{VGG16_FILE}`\n"
            f"    (or `--set loss.lpips_backbone=/path/to/{VGG16_FILE}`), or\n"
            f"  - train without the perceptual term: `--set loss.perceptual_weight=0`."
        )


class PerceptualWeightsInvalid(PerceptualWeightsMissing):
    """The file exists but is not a readable VGG16 state dict (a subclass so one except catches both)."""


def backbone_path(backbone: str) -> Path | None:
    """Where the VGG16 file for ``backbone`` should be; None for the random trunk."""
    if backbone == RANDOM_BACKBONE:
        return None
    if backbone == TORCHVISION_BACKBONE:
        return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    return Path(backbone).expanduser()


def check_lpips_available(backbone: str) -> None:
    """Fail before any heavy work when the VGG16 file is absent, rather than minutes into a run."""
    path = backbone_path(backbone)
    if path is None:
        return
    if not path.is_file():
        raise PerceptualWeightsMissing(path, backbone)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise PerceptualWeightsInvalid(path, backbone, f"could not be opened ({e.strerror})") from None


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """``features.{k}.{weight,bias}`` shapes of VGG16 up to relu5_3, to reject a wrong file early."""
    shapes: dict[str, tuple[int, ...]] = {}
    k, c_in = 0, 3
    for item in _VGG16_D:
        if item == "M":
            k += 1
            continue
        shapes[f"features.{k}.weight"] = (int(item), c_in, 3, 3)
        shapes[f"features.{k}.bias"] = (int(item),)
        k, c_in = k + 2, int(item)  # conv, then ReLU
    return shapes


def _load_features(path: Path, backbone: str) -> dict[str, torch.Tensor]:
    """Read the ``features.*`` tensors of a torchvision VGG16 state dict (weights_only: no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/pickled-code files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PerceptualWeightsInvalid(path, backbone,
                                       f"could not be read ({type(e).__name__}: {first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PerceptualWeightsInvalid(path, backbone, "is not a state dict")
    features = {k: v for k, v in state.items() if k.startswith("features.") and isinstance(v, torch.Tensor)}
    problems = []
    for key, shape in _expected_shapes().items():
        if key not in features:
            problems.append(f"{key} missing")
        elif tuple(features[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(features[key].shape)}, expected {shape}")
    if problems:
        shown = "; ".join(problems[:4]) + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
        raise PerceptualWeightsInvalid(path, backbone, f"does not hold the VGG16 features ({shown})")
    return features


def _copy_backbone(model: nn.Module, features: dict[str, torch.Tensor], path: Path, backbone: str) -> int:
    """Copy ``features.{k}.*`` into ``net.slice{n}.{k}.*``; every trunk tensor must be covered."""
    problems = []
    copied = 0
    with torch.no_grad():
        for name, param in model.net.named_parameters():  # e.g. "slice3.10.weight"
            _, k, kind = name.split(".")
            src = features.get(f"features.{k}.{kind}")
            if src is None:
                problems.append(f"features.{k}.{kind} missing")
            elif src.shape != param.shape:
                problems.append(f"features.{k}.{kind} has shape {tuple(src.shape)}, "
                                f"expected {tuple(param.shape)}")
            else:
                param.copy_(src)
                copied += 1
    if problems:
        shown = "; ".join(problems[:4]) + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
        raise PerceptualWeightsInvalid(path, backbone, f"does not hold the VGG16 features ({shown})")
    return copied


def build_lpips(backbone: str = TORCHVISION_BACKBONE) -> nn.Module:
    """A frozen, eval-mode ``lpips.LPIPS`` (VGG16, v0.1) whose trunk comes from ``backbone``.

    Inputs are expected in [-1, 1]; the package's scaling layer applies PAPER.md's shift/scale.
    The module keeps the package's key names (``net.slice*``, ``lin*``, ``scaling_layer``), which
    are also the reference checkpoints' ``loss.perceptual_loss.*`` names.
    """
    import lpips  # heavy import (pulls torchvision models); only when a perceptual loss is wanted

    path = backbone_path(backbone)
    if path is not None:
        check_lpips_available(backbone)
        features = _load_features(path, backbone)  # read before building: fail fast on a bad file
    with warnings.catch_warnings():
        # lpips calls tv.vgg16(pretrained=False), deprecated in torchvision but harmless here.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if path is None:
        log.warning("LPIPS built with a RANDOM VGG16 trunk (loss.lpips_backbone=random): perceptual "
                    "numbers mean nothing; use it only for tests.")
    else:
        n = _copy_backbone(model, features, path, backbone)
        log.info("LPIPS: loaded %d VGG16 tensors from %s", n, path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
