"""One sampling job of the page: run ``vqgan sample``'s own code, show the image as it is drawn,
stop on request.

The job calls :func:`vqgan_cli.sample.run.run_sample` with a progress hook, so the finished PNG and
its JSON sidecar are written by the sample command's own code (same bytes as ``vqgan sample``
for the same map, options and seed). The hook raises :class:`Cancelled` when Stop was pressed or
the page stopped asking for updates (tab closed), which ends the work within one sampler step.

Partial images. The decoder is convolutional except for the attention in its middle block: a band
of token rows decoded together with the rows its convolutions reach (:func:`decoder_halo`) gives,
for a purely convolutional decoder, exactly the band's pixels of the whole-image decode
(:func:`decode_band`; on the quickstart tokenizer, whose middle attention is the only global
step, a 15-row halo lands within 0.5 grey levels of the whole decode). The page uses a few rows
(:data:`DISPLAY_HALO`: within 0.5 grey levels on average, about 20 at worst near a band's edge)
and decodes a band once the rows below it that it reads are drawn, so no band is decoded twice.
A full-resolution decode costs about a tenth of the sampling time of a large image, so bands are
decoded only within a time budget (a fraction of the sampling time so far,
:data:`DECODE_BUDGET`); rows drawn but not yet decoded show each token's mean colour
(:func:`token_colours`, free), and the final image is the sample command's own whole decode.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqgan_cli.images import to_uint8
from vqgan_cli.models.config import AutoencoderConfig
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.sample.inputs import Models
from vqgan_cli.sample.request import SampleRequest, UpscaleRequest
from vqgan_cli.sample.run import SampleReport, run_sample, run_upscale

DECODE_BUDGET = 0.07  # band decodes may take at most this fraction of the sampling time so far
DISPLAY_HALO = 4  # token rows of context above and below a band decoded for the page
MIN_BAND = 4  # token rows: smaller bands would spend most of the budget on their halo
MAX_BAND = 16  # token rows: a band's cost is estimated from the last one; bounded, a wrong guess costs little
DEAD_AFTER_S = 15.0  # a job nobody has asked about for this long belongs to a closed tab
UNDRAWN = np.array([40, 40, 48], np.uint8)  # colour of rows not drawn yet


class Cancelled(Exception):
    """Raised inside the sampler's progress hook to end a job (Stop, or the tab was closed)."""


def decoder_halo(cfg: AutoencoderConfig) -> int:
    """Token rows above and below a band that the decoder's convolutions can see (rounded up,
    plus one for the nearest-neighbour upsampling's alignment). 3x3 convolutions reach one
    feature cell each: conv_in and the middle block's two resnet blocks at the token level, then
    per level its resnet blocks and the upsampling conv at that level's resolution, and conv_out."""
    f = cfg.factor
    levels = len(cfg.ch_mult)
    cells = 1.0 + 4.0  # conv_in, mid.block_1 and mid.block_2 (two convs each), in tokens
    for i in reversed(range(levels)):
        scale = 2 ** i / f  # tokens per feature cell at this level
        cells += 2 * (cfg.num_res_blocks + 1) * scale
        if i != 0:
            cells += (2 ** (i - 1)) / f  # the upsampling conv runs at the next, finer level
    cells += 1 / f  # conv_out
    return math.ceil(cells) + 1


@torch.no_grad()
def decode_band(tokenizer: VQGAN, tokens: torch.Tensor, r0: int, r1: int, halo: int) -> torch.Tensor:
    """Pixels (B, C, (r1-r0)*f, W*f) of token rows r0..r1 of ``tokens`` (B, H, W): the band and up
    to ``halo`` rows on each side are decoded, then cropped to the band."""
    H = tokens.shape[1]
    if not 0 <= r0 < r1 <= H:
        raise ValueError(f"band {r0}..{r1} is not inside {H} token rows")
    a, b = max(0, r0 - halo), min(H, r1 + halo)
    f = tokenizer.factor
    px = tokenizer.decode_indices(tokens[:, a:b]).float()
    return px[:, :, (r0 - a) * f:(r1 - a) * f]


@torch.no_grad()
def decode_cost(tokenizer: VQGAN, grid: tuple[int, int]) -> float:
    """Seconds per token of decoding a ``grid`` of tokens (timed once; the first band's guess)."""
    idx = torch.zeros(1, *grid, dtype=torch.long, device=tokenizer.last_layer.device)
    tokenizer.decode_indices(idx)  # warm-up
    t0 = time.perf_counter()
    tokenizer.decode_indices(idx)
    return (time.perf_counter() - t0) / (grid[0] * grid[1])


@torch.no_grad()
def token_colours(tokenizer: VQGAN, side: int = 3) -> np.ndarray:
    """Mean colour (V, 3) uint8 of each code, decoded as a ``side`` x ``side`` patch of itself:
    the free preview of rows that are drawn but not decoded yet."""
    n = tokenizer.n_tokens
    dev = tokenizer.last_layer.device
    out = []
    for start in range(0, n, 64):
        idx = torch.arange(start, min(n, start + 64), device=dev)
        px = tokenizer.decode_indices(idx[:, None, None].expand(-1, side, side)).float()
        out.append(to_uint8(px.mean((2, 3))[:, :, None, None])[:, 0, 0])
    return np.concatenate(out)


class ProgressiveImage:
    """The picture of a grid being drawn: decoded bands, token colours below them, dark rows not
    drawn yet. ``update`` is called from the sampler's hook; ``canvas`` read from the page."""

    def __init__(self, tokenizer: VQGAN, grid: tuple[int, int], colours: np.ndarray,
                 budget: float = DECODE_BUDGET, halo: int | None = None, token_cost: float | None = None):
        self.tok, self.colours, self.budget = tokenizer, colours, budget
        self.f = tokenizer.factor
        self.h, self.w = grid
        self.halo = DISPLAY_HALO if halo is None else halo
        self.canvas = np.empty((self.h * self.f, self.w * self.f, 3), np.uint8)
        self.canvas[:] = UNDRAWN
        self.previewed = 0  # token rows shown as token colours
        self.decoded = 0  # token rows shown decoded
        self.decode_seconds = 0.0
        self.bands = 0
        # seconds per decoded token row (halo rows count): measured at each band, first guessed
        # from ``token_cost`` (seconds per decoded token) so the first band keeps the budget too
        self._row_cost: float | None = None if token_cost is None else token_cost * self.w
        self.lock = threading.Lock()
        self.version = 0  # bumped at every change, so the page sends only new pictures

    def update(self, grid: torch.Tensor, rows_done: int, elapsed: float) -> None:
        """Show rows ``< rows_done`` of ``grid`` (H, W): token colours at once, decoded bands
        when the rows they need are drawn and the decode budget allows."""
        if rows_done > self.previewed:
            rows = grid[self.previewed:rows_done].cpu().numpy()
            block = self.colours[rows].repeat(self.f, 0).repeat(self.f, 1)
            with self.lock:
                self.canvas[self.previewed * self.f:rows_done * self.f] = block
                self.version += 1
            self.previewed = rows_done
        settled = rows_done if rows_done >= self.h else max(0, rows_done - self.halo)
        todo = settled - self.decoded
        if todo <= 0 or self.budget <= 0:
            return
        rows = todo
        if self._row_cost:  # as many rows as the budget allows now (a band carries its halo)
            avail = self.budget * elapsed - self.decode_seconds
            rows = min(todo, MAX_BAND, int(avail / self._row_cost) - 2 * self.halo)
        if rows < min(MIN_BAND, todo):
            return  # over budget: token colours for now; the final decode replaces them anyway
        self.decode_band(grid, self.decoded, self.decoded + rows)

    def decode_band(self, grid: torch.Tensor, r0: int, r1: int) -> None:
        t0 = time.perf_counter()
        px = decode_band(self.tok, grid[None, :min(self.h, r1 + self.halo)], r0, r1, self.halo)
        dt = time.perf_counter() - t0
        self.decode_seconds += dt
        self.bands += 1
        rows_in = min(self.h, r1 + self.halo) - max(0, r0 - self.halo)
        self._row_cost = dt / max(rows_in, 1)
        with self.lock:
            self.canvas[r0 * self.f:r1 * self.f] = to_uint8(px[0])
            self.version += 1
        self.decoded = r1

    def snapshot(self) -> np.ndarray:
        with self.lock:
            return self.canvas.copy()


@dataclass
class Status:
    """What the progress line shows."""

    tokens_done: int = 0
    tokens_total: int = 0
    started: float = field(default_factory=time.perf_counter)
    phase: str = "waiting"  # waiting | sampling | decoding | done | stopped | failed

    def line(self) -> str:
        """'1,234 / 16,640 tokens · 812 tokens/s · ETA 19 s'."""
        el = max(time.perf_counter() - self.started, 1e-6)
        rate = self.tokens_done / el
        total = max(self.tokens_total, 1)
        pct = 100.0 * self.tokens_done / total
        eta = (self.tokens_total - self.tokens_done) / rate if rate > 0 else float("nan")
        eta_s = f"ETA {eta:.0f} s" if math.isfinite(eta) else "ETA -"
        return (f"{self.phase}: {self.tokens_done:,} / {self.tokens_total:,} tokens ({pct:.0f}%) · "
                f"{rate:,.0f} tokens/s · {el:.1f} s · {eta_s}")


class Job:
    """One sample (or upscale) run in its own thread, observable and stoppable from the page."""

    def __init__(self, models: Models, request: SampleRequest | UpscaleRequest, colours: np.ndarray,
                 budget: float = DECODE_BUDGET, dead_after: float | None = DEAD_AFTER_S,
                 token_cost: float | None = None):
        self.models, self.request, self.colours, self.budget = models, request, colours, budget
        self.token_cost = token_cost
        self.image: ProgressiveImage | None = None  # made at the first step, when the grid is known
        self.status = Status()
        self.stop = threading.Event()
        self.dead_after = dead_after
        self.last_seen = time.monotonic()
        self.report: SampleReport | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self._sample_start = 0.0

    def seen(self) -> None:
        """The page asked for news: its tab is still open."""
        self.last_seen = time.monotonic()

    def hook(self, grid: torch.Tensor, rows_done: int, tokens_done: int) -> None:
        """The sampler's progress hook: stop if asked, record progress, update the picture."""
        if self.stop.is_set():
            raise Cancelled("stopped")
        if self.dead_after is not None and time.monotonic() - self.last_seen > self.dead_after:
            self.stop.set()
            raise Cancelled("the page was closed")
        if self.image is None:
            h, w = grid.shape[1:]
            self.image = ProgressiveImage(self.models.tokenizer, (h, w), self.colours, self.budget,
                                          token_cost=self.token_cost)
            self.status.tokens_total = h * w
        self.status.tokens_done = tokens_done
        if rows_done > self.image.previewed:
            self.image.update(grid[0], rows_done, time.perf_counter() - self._sample_start)

    def run(self) -> None:
        """Run the request to the end (or to Cancelled); the outcome lands in report/error."""
        self.status.phase = "sampling"
        self.status.started = self._sample_start = time.perf_counter()
        try:
            if isinstance(self.request, UpscaleRequest):
                self.report = run_upscale(self.request, self.models, on_step=self.hook)
            else:
                self.report = run_sample(self.request, self.models, on_step=self.hook)
            self.status.tokens_done = self.status.tokens_total
            self.status.phase = "done"
        except Cancelled:
            self.status.phase = "stopped"
            self.error = Cancelled("stopped")
        except Exception as e:  # noqa: BLE001 - reported on the page; the server goes on (Ctrl-C does not)
            self.status.phase = "failed"
            self.error = e
        finally:
            self.done.set()

    def start(self, runner: MainThreadRunner | None = None) -> Job:
        """Run on ``runner``'s thread when given, else on a new thread of its own."""
        if runner is not None:
            runner.submit(self)
            return self
        self._thread = threading.Thread(target=self.run, name="vqgan-demo-job", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def final_image(self) -> np.ndarray | None:
        """The finished PNG's pixels (what the sample command wrote), or None."""
        if self.report is None or not self.report.files:
            return None
        from PIL import Image

        with Image.open(self.report.files[0]) as im:
            return np.asarray(im.convert("RGB")).copy()


class MainThreadRunner:
    """Runs submitted jobs one after another on the thread that calls :meth:`serve_forever`
    (the server's main thread). Why: with OpenMP's default active waiting, the main thread's
    worker team takes work fastest; the same 1280x832 ``--window fast`` sampling at 2 threads took
    7.1 s on the main thread and 11.6 s on a new thread (the page's handlers run on new threads)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job] = queue.Queue()
        self.closed = threading.Event()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def serve_forever(self, poll: float = 0.2) -> None:
        """Run jobs until :attr:`closed` is set; Ctrl-C (KeyboardInterrupt) passes through."""
        while not self.closed.is_set():
            try:
                job = self._queue.get(timeout=poll)
            except queue.Empty:
                continue
            job.run()


class Jobs:
    """The current job of each browser session, so Stop and a closed tab can reach it."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def put(self, session: str, job: Job) -> None:
        with self._lock:
            old = self._jobs.get(session)
            if old is not None:
                old.stop.set()
            self._jobs[session] = job

    def stop(self, session: str) -> bool:
        """Stop the session's running job; whether there was one."""
        with self._lock:
            job = self._jobs.get(session)
        if job is None or job.done.is_set():
            return False
        job.stop.set()
        return True

    def drop(self, session: str, job: Job | None = None) -> None:
        with self._lock:
            if job is None or self._jobs.get(session) is job:
                self._jobs.pop(session, None)


def out_files(report: SampleReport | None) -> list[Path]:
    """The PNG(s) and their JSON sidecars, for the download box."""
    if report is None:
        return []
    files: list[Path] = []
    for p in report.files:
        files.append(p)
        side = p.with_suffix(".json")
        if side.is_file():
            files.append(side)
    return files


def describe_error(e: BaseException) -> str:
    """A user-facing message for a failed job (usage errors as they are, others with their type)."""
    from vqgan_cli.sample.inputs import SampleUsageError
    from vqgan_cli.sample.tokens import SamplingError

    if isinstance(e, (SampleUsageError, SamplingError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


