"""What ``sample`` and ``upscale`` are asked to do: one family of settings, checked before any work.

:class:`DrawSettings` holds what both commands share (models, seeds, how tokens are drawn, the
window, precision, decoding); :class:`SampleRequest` and :class:`UpscaleRequest` add each
command's own inputs. Every field is written to the sidecar of each image. Problems name the
field at fault in backticks (`top_k`); the command line words them as its options (``--top-k``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vqgan_cli.sample.choices import DEFAULT_WINDOW, WINDOW_MODES
from vqgan_cli.sample.inputs import SampleUsageError
from vqgan_cli.sample.tokens import SamplingError, SamplingOptions
from vqgan_cli.sample.window_forward import SAMPLING_PRECISIONS

DECODE_MODES = ("auto", "whole", "tiles")


@dataclass(frozen=True)
class Scheme:
    """How tokens are computed, not which: the window scheme and ``fast``'s tile (``segment``
    columns x ``band_rows`` rows), the memory bound, and at the crop size the key/value cache
    and its compiled step (``compile``: about 10 s of compilation once per batch size and length
    on a CPU for a few hundred ms saved per image; see the README)."""

    window: str = DEFAULT_WINDOW
    segment: int | None = None
    band_rows: int | None = None
    window_memory: float | None = None
    cache: bool = True
    compile: bool = False
    precision: str = "fp32"


@dataclass
class DrawSettings:
    """The settings ``sample`` and ``upscale`` share."""

    prior: str
    tokenizer: str | None = None
    config: str | None = None  # the official model's YAML; else found in its run folder
    n: int = 1
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    window: str = DEFAULT_WINDOW
    segment: int | None = None  # fast's tile width; None: the widest that keeps the context
    band_rows: int | None = None  # fast's tile height; None: the tallest that keeps the context
    compile: bool = False  # the crop-size decoding step under torch.compile (see Scheme)
    window_memory: float | None = None
    precision: str = "auto"  # auto | fp32 | bf16: see vqgan_cli.runtime
    decode: str = "auto"
    device: str = "auto"
    command: str | None = None  # the command line, recorded in the sidecars
    save_tokens: bool = False  # each image's token grid beside its PNG, to be decoded again

    def check(self) -> None:
        """Every problem with the values alone (no model needed), at once."""
        problems = []
        if self.n < 1:
            problems.append(f"`n` must be >= 1, got {self.n}")
        if self.window not in WINDOW_MODES:
            problems.append(f"`window` must be one of {', '.join(WINDOW_MODES)}, got {self.window!r}")
        if self.precision not in SAMPLING_PRECISIONS:
            problems.append(f"`precision` must be one of {', '.join(SAMPLING_PRECISIONS)}, got {self.precision!r}")
        if self.decode not in DECODE_MODES:
            problems.append(f"`decode` must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        problems += self._own_problems()
        if problems:
            raise SampleUsageError("; ".join(problems))

    def _own_problems(self) -> list[str]:
        return []

    def scheme(self, precision: str, cache: bool = True) -> Scheme:
        """How tokens are computed, with the precision ``auto`` resolved to."""
        return Scheme(self.window, self.segment, self.band_rows, self.window_memory, cache, self.compile, precision)

    def sampling_options(self, n_tokens: int, cfg_scale: float = 1.0) -> SamplingOptions:
        """How each token is drawn, checked against the image vocabulary."""
        opts = SamplingOptions(self.temperature, self.top_k, self.top_p, cfg_scale, n_tokens=n_tokens)
        try:
            opts.check(n_tokens)
        except SamplingError as e:
            raise SampleUsageError(str(e)) from None
        return opts


@dataclass
class SampleRequest(DrawSettings):
    """Every option of ``vqgan sample``."""

    batch_size: int = 4
    cfg_scale: float = 1.0
    classes: list[int] = field(default_factory=list)
    cond: str | None = None
    size: str | None = None
    init: str | None = None
    keep: float = 0.5
    cache: bool = True
    out: str = "samples"
    grid: bool = False
    skip_existing: bool = False  # draw only images whose PNG and sidecar are not in ``out`` yet

    def _own_problems(self) -> list[str]:
        problems = []
        if self.batch_size < 1:
            problems.append(f"`batch_size` must be >= 1, got {self.batch_size}")
        if not 0 <= self.keep <= 1:
            problems.append(f"`keep` must be in [0, 1], got {self.keep}")
        return problems


@dataclass
class UpscaleRequest(DrawSettings):
    """Every option of ``vqgan upscale``."""

    image: str = ""
    scale: int = 4
    out: str = "upscaled.png"

    def _own_problems(self) -> list[str]:
        problems = [] if self.image else ["`image` is required: the low-resolution image to upscale"]
        return problems + ([f"`scale` must be >= 1, got {self.scale}"] if self.scale < 1 else [])
