"""The map a sample is conditioned on, from the page: a built-in scene, an upload, or a painting.

Every path ends in the same place: an (H, W) array of the prior's label indices, checked against
the prior's vocabulary with a message that names the offending label and the labels the prior
knows, and written as an 8-bit grayscale PNG that ``vqgan sample --cond`` reads the same way.
Colours matter only for people: each label has one display colour (the built-in landscapes get
natural ones, COCO-Stuff / S-FLCKR their 182 names, anything else the project's label palette),
the painting canvas offers exactly those colours, and a painted pixel is read back as the label of
the nearest palette colour (brush edges are antialiased).
"""

from __future__ import annotations

import html
import os
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from vqgan_cli.data.landscapes import LANDSCAPE_CLASSES, render_landscape
from vqgan_cli.data.maps import labels_from_image
from vqgan_cli.images import label_palette

MAX_UPLOAD_BYTES = 20 * 2**20  # larger files are refused before they are decoded
MAX_PIXELS = 4096 * 4096  # larger images are refused as decompression bombs before decoding

# Display colours of the built-in landscape classes, in LANDSCAPE_CLASSES order.
LANDSCAPE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (111, 168, 220), (200, 200, 214), (127, 106, 90), (255, 255, 255),
    (31, 78, 153), (124, 195, 91), (45, 106, 45), (227, 207, 143))

# COCO-Stuff's 182 labels (S-FLCKR maps use them too): PNG value v is COCO id v + 1.
COCO_STUFF: tuple[str, ...] = tuple(n.replace("_", " ") for n in (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant street_sign "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe hat backpack "
    "umbrella shoe eye_glasses handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle plate wine_glass cup fork knife spoon bowl "
    "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed "
    "mirror dining_table window desk toilet door tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator blender book clock vase scissors teddy_bear hair_drier toothbrush hair_brush "
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other "
    "ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence "
    "floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit "
    "furniture-other grass gravel ground-other hill house leaves light mat metal mirror-stuff moss "
    "mountain mud napkin net paper pavement pillow plant-other plastic platform playingfield railing "
    "railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow solid-other stairs "
    "stone straw structural-other table tent textile-other towel tree vegetable wall-brick wall-concrete "
    "wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops window-blind "
    "window-other wood").split())
assert len(COCO_STUFF) == 182


class MapError(ValueError):
    """An input the page cannot turn into a map; the message is shown on the page as is."""


class Vocabulary(NamedTuple):
    """The labels a prior knows: names and display colours (n, 3) uint8; ``landscapes`` when
    they are the built-in scenes' classes (built-in maps and label agreement apply)."""

    names: tuple[str, ...]
    colours: np.ndarray
    landscapes: bool

    def describe(self, limit: int = 12) -> str:
        """'0 sky, 1 cloud, ...' (the first ``limit`` labels) for messages."""
        items = [f"{i} {n}" for i, n in enumerate(self.names[:limit])]
        more = f", ... ({len(self.names)} in all)" if len(self.names) > limit else ""
        return ", ".join(items) + more

    def hex_colours(self) -> list[str]:
        return ["#" + "".join(f"{int(v):02x}" for v in c) for c in self.colours]


def vocabulary(n_labels: int, label_shift: int = 0) -> Vocabulary:
    """Names and colours for a prior with ``n_labels`` labels (see the module docstring)."""
    if n_labels == len(LANDSCAPE_CLASSES):
        return Vocabulary(LANDSCAPE_CLASSES, np.array(LANDSCAPE_COLOURS, np.uint8), True)
    if n_labels in (182, 183):
        names = tuple(COCO_STUFF) if n_labels == 182 else ("unlabelled", *COCO_STUFF)
    else:
        names = tuple(f"label {i}" for i in range(n_labels))
    pal = ((label_palette(n_labels).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Vocabulary(names, pal, False)


def check_known(labels: np.ndarray, vocab: Vocabulary, source: str) -> None:
    """Every value of ``labels`` must be one of the prior's labels; else name it and them."""
    present = np.unique(labels)
    bad = [int(v) for v in present if not 0 <= v < len(vocab.names)]
    if bad:
        shown = ", ".join(str(b) for b in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise MapError(f"{source}: label {shown} is not known to this prior; it knows "
                       f"{len(vocab.names)} labels: {vocab.describe()}")


def builtin_map(seed: int, height: int, width: int) -> np.ndarray:
    """The built-in landscape scene ``seed`` at the sample size: what ``--cond
    builtin:landscapes:SEED`` conditions on."""
    return render_landscape(int(seed), int(height), int(width)).labels.astype(np.int32)


def _open_checked(path: str | os.PathLike[str], what: str) -> Image.Image:
    """Open an upload after the size checks; decoding errors become MapErrors."""
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise MapError(f"{what} is {size / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MiB")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:
        raise MapError(f"{what} is too large in pixels (decompression bomb guard); the limit is "
                       f"{MAX_PIXELS:,} pixels") from None
    except Exception:  # noqa: BLE001 - any failure means the same thing to the user
        raise MapError(f"{what} is not an image PIL can read (expected a PNG)") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise MapError(f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,} "
                       "(a decompression bomb or far too large for a map)")
    if w == 0 or h == 0:
        img.close()
        raise MapError(f"{what} has zero size")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data shows up only when decoding
        img.close()
        raise MapError(f"{what} cannot be decoded: {e}") from None
    return img


def read_image_upload(path: str | os.PathLike[str], what: str = "the upload") -> np.ndarray:
    """An uploaded photo as uint8 RGB (H, W, 3), with the same guards as a map upload."""
    with _open_checked(path, what) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def labels_from_colours(rgb: np.ndarray, vocab: Vocabulary, alpha: np.ndarray | None = None,
                        fallback: np.ndarray | None = None) -> np.ndarray:
    """Each pixel's label: the palette colour nearest to it (antialiased brush edges round to a
    neighbour). Transparent pixels (alpha < 128) take ``fallback`` there, else are an error."""
    pal = vocab.colours.astype(np.int32)
    flat = rgb.reshape(-1, 3).astype(np.int32)
    uniq, inverse = np.unique(flat, axis=0, return_inverse=True)  # few colours: cheap distances
    d = ((uniq[:, None, :] - pal[None, :, :]) ** 2).sum(-1)
    labels = d.argmin(1)[inverse.reshape(-1)].reshape(rgb.shape[:2]).astype(np.int32)
    if alpha is not None:
        clear = alpha < 128
        if clear.any():
            if fallback is None or fallback.shape != labels.shape:
                raise MapError("parts of the painting are empty: start from a map (built-in or "
                               "uploaded) or paint the whole canvas")
            labels[clear] = fallback[clear]
    return labels


def read_map_upload(path: str | os.PathLike[str], vocab: Vocabulary, label_shift: int = 0,
                    what: str = "the uploaded map") -> np.ndarray:
    """An uploaded segmentation map as the prior's labels (H, W): a grayscale or palette PNG of
    label indices (what ``vqgan sample --cond`` reads; ``label_shift`` added mod 256 as there),
    or a colour PNG in the page's own palette (a map downloaded from the page)."""
    with _open_checked(path, what) as img:
        if img.mode in ("L", "P", "1", "LA", "PA") or img.mode.startswith("I"):
            arr = labels_from_image(img, what)  # label indices, read as `vqgan sample --cond` reads them
        else:
            rgb = np.asarray(img.convert("RGB"))
            if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
                arr = rgb[..., 0].astype(np.int32)  # grey pixels are label indices too
            else:
                return _labels_of_page_colours(rgb, vocab, what)
        if label_shift:
            arr = (arr + label_shift) % 256
    check_known(arr, vocab, what)
    return arr


def _labels_of_page_colours(rgb: np.ndarray, vocab: Vocabulary, what: str) -> np.ndarray:
    """A colour map in the page's own palette (a map downloaded from the page) as labels."""
    known = {tuple(int(v) for v in c) for c in vocab.colours}
    strange = [c for c in map(tuple, np.unique(rgb.reshape(-1, 3), axis=0).tolist()) if c not in known]
    if strange:
        raise MapError(f"{what} is a colour image whose colours are not this prior's label "
                       f"colours (e.g. RGB {strange[0]}); upload a grayscale PNG of label "
                       f"indices or a map downloaded from this page. Labels: {vocab.describe()}")
    return labels_from_colours(rgb, vocab)


def read_painting(value: dict[str, Any] | None, vocab: Vocabulary,
                  fallback: np.ndarray | None) -> np.ndarray:
    """Labels of a Gradio ImageEditor value ({'composite': RGBA array, ...})."""
    if not value or value.get("composite") is None:
        raise MapError("nothing painted yet: choose a map, press 'Paint on this map', then paint")
    comp = np.asarray(value["composite"])
    if comp.ndim != 3 or comp.shape[2] not in (3, 4):
        raise MapError(f"the painting has an unexpected shape {comp.shape}")
    if comp.shape[0] * comp.shape[1] > MAX_PIXELS:
        raise MapError(f"the painting is {comp.shape[1]}x{comp.shape[0]} pixels, over the limit of {MAX_PIXELS:,}")
    alpha = comp[..., 3] if comp.shape[2] == 4 else None
    return labels_from_colours(comp[..., :3], vocab, alpha, fallback)


def colourise(labels: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 in the display colours (unknown labels black)."""
    lut = np.zeros((max(256, len(vocab.names)), 3), np.uint8)
    lut[:len(vocab.names)] = vocab.colours
    return lut[np.clip(labels, 0, len(lut) - 1)]


def legend_html(labels: np.ndarray | None, vocab: Vocabulary) -> str:
    """A colour legend of the labels present in the map (all labels without a map)."""
    present = range(len(vocab.names)) if labels is None else [int(v) for v in np.unique(labels)]
    items = []
    for i in present:
        if 0 <= i < len(vocab.names):
            r, g, b = (int(v) for v in vocab.colours[i])
            items.append(f'<span style="display:inline-block;margin:2px 8px 2px 0">'
                         f'<span style="display:inline-block;width:12px;height:12px;border:1px solid #888;'
                         f'background:rgb({r},{g},{b});vertical-align:middle"></span> '
                         f'{i} {html.escape(vocab.names[i])}</span>')
    return '<div class="vqgan-legend">' + "".join(items) + "</div>"


def save_label_png(labels: np.ndarray, path: Path, label_shift: int = 0) -> Path:
    """Write labels as the 8-bit grayscale PNG ``--cond`` reads back to the same labels (the
    prior's ``label_shift`` is undone so that reading adds it again)."""
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise MapError("labels above 255 cannot be stored in an 8-bit map")
    stored = (labels.astype(np.int64) - label_shift) % 256
    Image.fromarray(stored.astype(np.uint8), mode="L").save(path, format="PNG")
    return path


def bicubic_of(path: Path, final: np.ndarray | None) -> np.ndarray | None:
    """The low-resolution input brought to the output size by bicubic resampling (comparison)."""
    if final is None:
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((final.shape[1], final.shape[0]), Image.Resampling.BICUBIC))


def new_seed() -> int:
    """A map seed for the 'new map' button (training-range seeds look like the training data)."""
    return random.randrange(0, 1_000_000)
