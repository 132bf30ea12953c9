"""One way to name a model everywhere: our ``.safetensors``, an official ``.ckpt``, or an
official run folder.

The reference release ships each model as a run folder, placed by its users in ``logs/``::

    logs/2020-11-09T13-31-51_sflckr/checkpoints/last.ckpt
    logs/2020-11-09T13-31-51_sflckr/configs/2020-11-09T13-31-51-project.yaml

:func:`resolve_model` turns whatever the user typed (the folder, the ``.ckpt`` inside it, or a
``.ckpt`` plus ``--config``) into the checkpoint file and the YAML that describes it. For a
``.ckpt`` inside a run folder the YAML is the newest ``configs/*-project.yaml`` (timestamped names
sort by time), said in :attr:`Resolved.note`. Our safetensors files carry their own config.
Every loader (:mod:`vqgan_cli.checkpoints.load`) calls this, so every command takes the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import yaml

from vqgan_cli.checkpoints.format import CheckpointError, is_safetensors

_MAX_FOUND = 12


class Resolved(NamedTuple):
    """A model name made concrete."""

    path: Path  # the checkpoint file
    config: Path | None  # the YAML describing it (official files), or None
    origin: str  # where the YAML came from: "--config", "run folder", "none", "inside the file"
    note: str | None  # one line for the output when something was found for the user


def is_official_file(path: Path) -> bool:
    return path.is_file() and not is_safetensors(path)


def project_yamls(run: Path) -> list[Path]:
    """The ``configs/*-project.yaml`` of a run folder, newest last (names are timestamps)."""
    d = run / "configs"
    if not d.is_dir():
        return []
    found = sorted(d.glob("*-project.yaml"), key=lambda p: (p.name, p.stat().st_mtime))
    if not found:  # the tokenizer releases ship configs/model.yaml
        found = sorted(d.glob("*.yaml"))
        found = found if len(found) == 1 else []
    return found


def _run_folder_of(ckpt: Path) -> Path | None:
    """The run folder around ``<run>/checkpoints/x.ckpt``, if the file sits in one."""
    parent = ckpt.resolve().parent
    if parent.name == "checkpoints":
        return parent.parent
    return None


def _listing(folder: Path) -> str:
    items = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            items.append(str(p.relative_to(folder)))
        if len(items) > _MAX_FOUND:
            break
    if not items:
        return "it is empty"
    more = " ..." if len(items) > _MAX_FOUND else ""
    return "found: " + ", ".join(items[:_MAX_FOUND]) + more


def _folder_checkpoint(folder: Path) -> Path:
    last = folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    ckpts = sorted((folder / "checkpoints").glob("*.ckpt")) if (folder / "checkpoints").is_dir() else []
    if len(ckpts) == 1:
        return ckpts[0]
    if len(ckpts) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in ckpts)
        raise CheckpointError(f"{folder}: a run folder with several checkpoints ({names}) and no "
                              "checkpoints/last.ckpt; name the one to use")
    ours = sorted(folder.glob("*.safetensors"))
    ours = [p for p in ours if not p.name.endswith((".tokenizer.safetensors", ".training.safetensors"))]
    if len(ours) == 1:
        return ours[0]
    raise CheckpointError(f"{folder}: no checkpoint in this folder (a release run folder holds "
                          f"checkpoints/last.ckpt and configs/<date>-project.yaml); {_listing(folder)}")


def resolve_model(name: str | Path, config: str | Path | dict | None = None) -> Resolved:
    """The checkpoint file and YAML that ``name`` (file or run folder) and ``--config`` mean."""
    path = Path(name)
    if config is not None and not isinstance(config, dict) and not Path(config).is_file():
        raise CheckpointError(f"{config}: config file not found (`config`)")
    if path.is_dir():
        ckpt = _folder_checkpoint(path)
        run: Path | None = path
    elif path.is_file():
        ckpt, run = path, None
    else:
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not is_official_file(ckpt):
        if config is not None:
            raise CheckpointError(f"{ckpt}: our checkpoints carry their own config; drop `config`")
        note = f"{path}: using {ckpt}" if ckpt != path else None
        return Resolved(ckpt, None, "inside the file", note)
    if isinstance(config, dict):
        return Resolved(ckpt, None, "given", None)
    if config is not None:
        return Resolved(ckpt, Path(config), "--config", None)
    run = run or _run_folder_of(ckpt)
    yamls = project_yamls(run) if run is not None else []
    if yamls:
        used = yamls[-1]
        others = f" (newest of {len(yamls)})" if len(yamls) > 1 else ""
        note = f"{ckpt}: config {used}{others}"
        return Resolved(ckpt, used, "run folder", note)
    return Resolved(ckpt, None, "none", None)


def read_yaml_file(path: str | Path | None) -> dict:
    """The whole YAML of a release (model and data sections), or {} when there is none."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


# The label convention of each release's data config (taming/data/*.py): COCO-Stuff maps store
# labels 0..181 with 255 for "unlabelled" and are shifted by one (uint8, so 255 -> 0, 183 labels);
# S-FLCKR (182 labels) and ADE20K (151 labels, 0 = other) are used as stored.
_SHIFTED_DATA = ("taming.data.coco.",)


def label_shift_for(full_yaml: dict, n_labels: int | None) -> int:
    """What a release adds to a segmentation PNG's labels (mod 256) before one-hot encoding."""
    data = full_yaml.get("data") if isinstance(full_yaml, dict) else None
    params = (data or {}).get("params") if isinstance(data, dict) else None
    if isinstance(params, dict):
        for split in ("train", "validation", "test"):
            node = params.get(split)
            if not isinstance(node, dict):
                continue
            target = str(node.get("target", ""))
            p = node.get("params") or {}
            if isinstance(p, dict) and "shift_segmentation" in p:
                return 1 if p["shift_segmentation"] else 0
            if target.startswith(_SHIFTED_DATA):
                return 1
            if target.startswith("taming.data."):
                return 0
    return 1 if n_labels == 183 else 0
