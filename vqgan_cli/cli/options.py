"""Options several commands share, declared once so their names and help read the same everywhere."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from vqgan_cli.sample.choices import DEFAULT_MEMORY_MIB

Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]
Overrides = Annotated[list[str] | None, typer.Option(
    "--set", help="override a recipe value, e.g. --set train.max_steps=100 (repeatable)")]
Overwrite = Annotated[bool, typer.Option(help="start the run over instead of resuming it")]
OfficialYaml = Annotated[str | None, typer.Option(
    help="an official .ckpt's YAML (default: configs/*-project.yaml of its run folder)")]
Tokenizer = Annotated[str | None, typer.Option(help="image tokenizer (default: the one the prior records)")]
Seed = Annotated[int, typer.Option(help="image i uses seed + i")]
Temperature = Annotated[float, typer.Option(help="logits are divided by it (> 0)")]
TopK = Annotated[int | None, typer.Option(help="keep the k most likely tokens")]
TopP = Annotated[float | None, typer.Option(help="keep the smallest set with this much probability")]
Window = Annotated[str, typer.Option(help=(
    "beyond the crop: exact (the reference's window for every token, batched) | fast (one cached "
    "window per tile of tokens: much faster, shifts each token's window; see the README)"))]
Segment = Annotated[int | None, typer.Option(
    help="--window fast: tokens per row of a tile (1 .. crop width/2 + 1; default the widest)")]
BandRows = Annotated[int | None, typer.Option(
    help="--window fast: rows of a tile (1 .. crop height; default crop height - crop height//2); "
         "--segment 1 --band-rows 1 draws exactly what --window exact draws")]
Compile = Annotated[bool, typer.Option(help=(
    "at the crop size: the cached decoding step under torch.compile (one graph; CUDA graphs on a GPU). "
    "Compiling takes about 10 s per batch size on a CPU and saves a few hundred ms per image there, "
    "so it is off by default (README: Performance)"))]
WindowMemory = Annotated[float | None, typer.Option(help=(
    f"MiB for window batches and fast's caches (default {DEFAULT_MEMORY_MIB:g}); an error before "
    "sampling says when it is too small"))]
Precision = Annotated[str, typer.Option(help=(
    "auto (bf16 where the CPU or GPU computes it natively: avx512_bf16/AMX CPUs, recent GPUs; else fp32) "
    "| fp32 | bf16 (emulated and several times slower on CPUs without avx512_bf16); outputs differ "
    "between precisions"))]
Decode = Annotated[str, typer.Option(help="auto | whole | tiles")]
SaveTokens = Annotated[bool, typer.Option(help=(
    "also save each image's token grid beside its PNG as NAME.tokens.npy (int64, rows x cols; the "
    "sidecar names it), to decode it again without sampling"))]


def fields_of(request: type, values: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The keyword arguments of dataclass ``request`` from a command's parameters (its locals):
    paths become strings, an unset repeatable option an empty list."""
    names = {f.name for f in dataclasses.fields(request)}
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k in names}
    out.update(extra)
    return {k: ([] if v is None and k == "classes" else v) for k, v in out.items()}
