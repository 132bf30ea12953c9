"""What the page does, without the page: every handler as a plain method, so it can be tested
without a browser and the Gradio layout (:mod:`vqgan_cli.demo.page`) stays thin.

The models are loaded once. A sample request becomes the very :class:`SampleRequest` that
``vqgan sample`` builds from its options, run by the sample command's own code in a
:class:`~vqgan_cli.demo.jobs.Job`; maps from the page are written to the job's folder as the PNG
that ``--cond`` reads, so the equivalent command printed on the page redraws the same image.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqgan_cli.data.maps import resize_nearest
from vqgan_cli.demo.jobs import (
    DEAD_AFTER_S,
    DECODE_BUDGET,
    Job,
    Jobs,
    MainThreadRunner,
    decode_cost,
    describe_error,
    out_files,
    token_colours,
)
from vqgan_cli.demo.maps import (
    MapError,
    Vocabulary,
    bicubic_of,
    builtin_map,
    colourise,
    legend_html,
    read_image_upload,
    read_map_upload,
    read_painting,
    save_label_png,
    vocabulary,
)
from vqgan_cli.sample.inputs import Models, SampleUsageError, crop_grid, load_models, parse_size
from vqgan_cli.sample.request import SampleRequest, UpscaleRequest

SOURCES = ("built-in", "upload", "paint")


def prior_mode(models: Models) -> str:
    """How the page conditions this prior: ``labels`` (segmentation maps: built-in, upload,
    paint), ``map`` (other maps, e.g. depth: upload only), ``lowres`` (super-resolution: an
    image), ``class`` (a class picker) or ``none`` (unconditional, coordinates)."""
    prior = models.prior
    kind = prior.cond.kind
    if kind == "labels":
        return "labels"
    if kind == "spatial":
        ctok = prior.cond_tokenizer
        modality = ctok.config.modality if ctok is not None else None
        if modality == "segmentation":
            return "labels"
        if modality == "image":
            return "lowres"
        return "map"
    if kind == "class":
        return "class"
    return "none"


def _n_labels(models: Models) -> int | None:
    prior = models.prior
    if prior.cond.kind == "labels":
        return int(prior.cond.n_labels)
    ctok = prior.cond_tokenizer
    if ctok is not None and ctok.config.modality == "segmentation":
        return int(ctok.config.n_labels)
    return None


@dataclass
class Update:
    """One refresh of the page's outputs (None: leave that output as it is)."""

    image: np.ndarray | str | None = None
    status: str | None = None
    files: list[str] | None = None
    agreement: str | None = None
    command: str | None = None
    map_image: np.ndarray | None = None
    legend: str | None = None
    bicubic: np.ndarray | None = None
    done: bool = False
    error: bool = False


@dataclass
class SampleForm:
    """The page's sampling controls."""

    source: str = "built-in"
    map_seed: int = 0
    upload: str | None = None
    painting: dict[str, Any] | None = None
    class_id: int = 0
    lowres: str | None = None
    size: str = ""
    window: str = "exact"
    top_k: int | None = None
    temperature: float = 1.0
    seed: int = 0


class DemoApp:
    """Loaded models, their vocabulary, the running jobs and the handlers of the page."""

    def __init__(self, prior: str, tokenizer: str | None = None, device: str = "auto",
                 models: Models | None = None, workdir: str | Path | None = None,
                 classifier: Any = None, budget: float = DECODE_BUDGET,
                 dead_after: float | None = DEAD_AFTER_S, runner: MainThreadRunner | None = None):
        from vqgan_cli.runtime import resolve_device

        self.prior_arg, self.tokenizer_arg, self.device_arg = prior, tokenizer, device
        self.models = models or load_models(prior, tokenizer, resolve_device(device))
        self.mode = prior_mode(self.models)
        n = _n_labels(self.models)
        self.vocab: Vocabulary | None = vocabulary(n, self.models.prior.cond.label_shift) if n else None
        self.label_shift = self.models.prior.cond.label_shift if self.models.prior.cond.kind == "spatial" else 0
        self.factor = self.models.tokenizer.factor
        self.crop = crop_grid(self.models.prior, self.models.tokenizer)
        self.colours = token_colours(self.models.tokenizer)
        self.token_cost = decode_cost(self.models.tokenizer, (max(self.crop[0], 16), max(self.crop[1], 16)))
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="vqgan-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jobs = Jobs()
        self.budget, self.dead_after = budget, dead_after
        self.runner = runner  # None: each job on a thread of its own
        self._classifier = classifier
        self._classifier_lock = threading.Lock()
        self._count = 0
        self._count_lock = threading.Lock()

    # ---- sizes and maps ---------------------------------------------------------------------

    def size_choices(self) -> list[str]:
        """The crop size and a few larger ones that are multiples of the factor (1280x832 incl.)."""
        f, (ch, cw) = self.factor, self.crop
        out = [f"{cw * f}x{ch * f}"]
        for w, h in ((256, 256), (512, 320), (1280, 832)):
            if w % f == 0 and h % f == 0 and w >= cw * f and h >= ch * f and f"{w}x{h}" not in out:
                out.append(f"{w}x{h}")
        return out

    def default_size(self) -> str:
        choices = self.size_choices()
        return "512x320" if "512x320" in choices else choices[0]

    def pixels(self, size: str) -> tuple[int, int]:
        """'WxH' -> (height, width) pixels, checked like ``--size`` (factor, crop)."""
        h, w = parse_size(size.strip() or None, self.factor, self.crop)
        return h * self.factor, w * self.factor

    def _new_dir(self, kind: str) -> Path:
        with self._count_lock:
            self._count += 1
            n = self._count
        d = self.workdir / f"{kind}{n:04d}"
        d.mkdir(parents=True, exist_ok=False)
        return d

    def map_labels(self, form: SampleForm, fallback: np.ndarray | None = None) -> tuple[np.ndarray, str | None]:
        """The map of the form as labels at its own size, and the ``--cond`` spec when it is a
        built-in scene (None: it must be written to a file)."""
        if self.vocab is None:
            raise MapError("this prior is not conditioned on segmentation maps")
        if form.source == "built-in":
            if not self.vocab.landscapes:
                raise MapError(f"built-in maps are landscape scenes ({', '.join(vocabulary(8).names)}); "
                               f"this prior knows other labels: {self.vocab.describe()}; upload or paint a map")
            h, w = self.pixels(form.size)
            return builtin_map(int(form.map_seed), h, w), f"builtin:landscapes:{int(form.map_seed)}"
        if form.source == "upload":
            if not form.upload:
                raise MapError("no map uploaded yet: choose a segmentation PNG")
            return read_map_upload(form.upload, self.vocab, self.label_shift), None
        if form.source == "paint":
            return read_painting(form.painting, self.vocab, fallback), None
        raise MapError(f"unknown map source {form.source!r}; one of {', '.join(SOURCES)}")

    def show_map(self, form: SampleForm) -> tuple[np.ndarray, str, np.ndarray]:
        """(coloured map, legend, labels) for the map box; MapError/SampleUsageError on bad input."""
        labels, _ = self.map_labels(form)
        assert self.vocab is not None
        return colourise(labels, self.vocab), legend_html(labels, self.vocab), labels

    def canvas_for(self, labels: np.ndarray | None) -> dict[str, Any] | None:
        """An ImageEditor value whose background is the map in label colours (paint from it)."""
        if labels is None or self.vocab is None:
            return None
        bg = colourise(labels, self.vocab)
        return {"background": bg, "layers": [], "composite": bg}

    # ---- requests --------------------------------------------------------------------------

    def _command(self, req: SampleRequest | UpscaleRequest) -> str:
        """The ``vqgan sample`` / ``upscale`` command that redraws this image."""
        args = ["vqgan"]
        if isinstance(req, UpscaleRequest):
            args += ["upscale", req.image, "--prior", req.prior, "--scale", str(req.scale)]
        else:
            args += ["sample", "--prior", req.prior]
        if req.tokenizer:
            args += ["--tokenizer", req.tokenizer]
        if isinstance(req, SampleRequest):
            if req.cond:
                args += ["--cond", req.cond]
            for c in req.classes:
                args += ["--class", str(c)]
            if req.size:
                args += ["--size", req.size]
            args += ["--n", "1"]
        args += ["--seed", str(req.seed), "--temperature", f"{req.temperature:g}"]
        if req.top_k is not None:
            args += ["--top-k", str(req.top_k)]
        args += ["--window", req.window, "--device", req.device, "--out", req.out]
        return shlex.join(args)

    def build_request(self, form: SampleForm, jobdir: Path, fallback: np.ndarray | None = None,
                      ) -> tuple[SampleRequest | UpscaleRequest, np.ndarray | None, str | None]:
        """The request of the form, the map's labels (label priors) and its built-in spec."""
        top_k = int(form.top_k) if form.top_k else None
        common = dict(prior=self.prior_arg, tokenizer=self.tokenizer_arg, seed=int(form.seed),
                      temperature=float(form.temperature), top_k=top_k, window=form.window,
                      device=self.device_arg)
        if self.mode == "lowres":
            if not form.lowres:
                raise MapError("no low-resolution image uploaded yet")
            rgb = read_image_upload(form.lowres, "the uploaded image")
            path = jobdir / "input.png"
            from PIL import Image

            Image.fromarray(rgb).save(path)
            scale = self.models.prior.cond.lowres_factor or 4
            req_u = UpscaleRequest(image=str(path), scale=scale, out=str(jobdir / "upscaled.png"), **common)
            req_u.command = self._command(req_u)
            return req_u, None, None
        size = form.size.strip() or None
        if size is not None:
            self.pixels(size)  # the size's own message before anything else
        labels, spec, cond = None, None, None
        classes: list[int] = []
        if self.mode == "labels":
            labels, spec = self.map_labels(form, fallback)
            cond = spec or str(save_label_png(labels, jobdir / "map.png", self.label_shift))
        elif self.mode == "map":
            if not form.upload:
                raise MapError("no conditioning map uploaded yet")
            dst = jobdir / ("map" + Path(form.upload).suffix.lower())
            shutil.copyfile(form.upload, dst)
            cond = str(dst)
        elif self.mode == "class":
            classes = [int(form.class_id)]
        req = SampleRequest(n=1, cond=cond, classes=classes, size=size, out=str(jobdir), **common)
        req.command = self._command(req)
        return req, labels, spec

    # ---- sampling --------------------------------------------------------------------------

    def classifier(self) -> Any:
        """The label-agreement cell classifier: the file named by ``VQGAN_DEMO_CLASSIFIER`` (a
        saved :class:`~vqgan_cli.evaluate.map_agreement.CellClassifier`), else fitted on first use (about
        20 s, once)."""
        from vqgan_cli.evaluate.map_agreement import CellClassifier, fit_cell_classifier

        with self._classifier_lock:
            if self._classifier is None:
                path = os.environ.get("VQGAN_DEMO_CLASSIFIER")
                self._classifier = CellClassifier.load(path) if path else fit_cell_classifier(factor=self.factor)
            return self._classifier

    def agreement(self, image: np.ndarray, labels: np.ndarray) -> str:
        """'label agreement 0.912' of a sample on a built-in map (the megapixel issue's measure)."""
        from vqgan_cli.evaluate.map_agreement import label_agreement

        if labels.shape != image.shape[:2]:
            labels = resize_nearest(labels, *image.shape[:2])
        score = label_agreement(image, labels, self.factor, self.classifier())
        return (f"**label agreement {score:.3f}**: the fraction of {self.factor}x{self.factor} cells the "
                "cell classifier of `vqgan_cli/evaluate/map_agreement.py` puts in the map's class")

    def sample(self, form: SampleForm, session: str = "local", fallback: np.ndarray | None = None,
               poll: float = 0.25, image_every: float = 1.0) -> Iterator[Update]:
        """Run one sample, yielding page updates while it is drawn; the last update has
        ``done``. Bad input yields one update with ``error`` and the message."""
        jobdir = self._new_dir("sample")
        try:
            req, labels, spec = self.build_request(form, jobdir, fallback)
        except (MapError, SampleUsageError) as e:
            yield Update(status=f"**Error:** {e}", done=True, error=True)
            return
        map_img = legend = None
        if labels is not None and self.vocab is not None:
            h, w = self.pixels(form.size) if form.size.strip() else (labels.shape[0], labels.shape[1])
            shown = labels if labels.shape == (h, w) else resize_nearest(labels, h, w)
            map_img, legend = colourise(shown, self.vocab), legend_html(shown, self.vocab)
        job = Job(self.models, req, self.colours, self.budget, self.dead_after, self.token_cost)
        self.jobs.put(session, job)
        job.start(self.runner)
        last_image, shown_version = 0.0, -1
        try:
            yield Update(status="started", command=req.command, map_image=map_img, legend=legend)
            while not job.wait(poll):
                job.seen()
                upd = Update(status=job.status.line())
                img = job.image
                if img is not None and img.version != shown_version and time.monotonic() - last_image >= image_every:
                    upd.image, shown_version, last_image = img.snapshot(), img.version, time.monotonic()
                yield upd
        finally:
            if not job.done.is_set():
                job.stop.set()  # the page went away (generator closed): end the work
            self.jobs.drop(session, job)
        if job.error is not None:
            stopped = job.status.phase == "stopped"
            msg = "**Stopped.**" if stopped else f"**Error:** {describe_error(job.error)}"
            img = job.image.snapshot() if job.image is not None else None
            yield Update(image=img, status=msg, done=True, error=not stopped)
            return
        assert job.report is not None
        files = [str(p) for p in out_files(job.report)]
        png = str(job.report.files[0])
        img_note = ""
        if job.image is not None:
            img_note = (f" · partial decodes: {job.image.bands} band(s), {job.image.decode_seconds:.1f} s")
        done = Update(image=png, files=files, done=False,
                      status=f"done: {job.status.tokens_total:,} tokens in {job.report.seconds:.1f} s "
                             f"({job.status.tokens_total / max(job.report.seconds, 1e-9):,.0f} tokens/s){img_note}")
        if self.mode == "lowres":
            done.bicubic = bicubic_of(Path(req.image), job.final_image())  # type: ignore[union-attr]
        if spec is not None and labels is not None and self.vocab is not None and self.vocab.landscapes:
            yield done
            final = job.final_image()
            if final is not None:
                try:
                    yield Update(agreement=self.agreement(final, labels), done=True)
                    return
                except ValueError as e:  # e.g. a factor the classifier cannot use
                    yield Update(agreement=f"label agreement not available: {e}", done=True)
                    return
        done.done = True
        yield done

    def stop(self, session: str) -> str:
        """The Stop button (the job ends within one sampler step; the page may not hear from it
        again, since Stop also cancels the page's pending event)."""
        return "**Stopped.**" if self.jobs.stop(session) else "nothing is running"

    # ---- the reconstruction tab -------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
        """(input, reconstruction, 'PSNR ... dB') of an uploaded image through the tokenizer."""
        from vqgan_cli.data.transforms import image_to_tensor
        from vqgan_cli.evaluate.reconstruct import reconstruct_image
        from vqgan_cli.images import to_uint8
        from vqgan_cli.metrics import psnr

        if not path:
            raise MapError("no image uploaded yet")
        rgb = read_image_upload(path, "the uploaded image")
        tok = self.models.tokenizer
        x = image_to_tensor(rgb)[None].to(tok.last_layer.device)
        x_hat, idx = reconstruct_image(tok, x)
        score = float(psnr(x_hat, x)[0])
        h, w = idx.shape[-2:]
        return rgb, to_uint8(x_hat[0]), (f"**PSNR {score:.2f} dB** · {rgb.shape[1]}x{rgb.shape[0]} px · "
                                         f"{h}x{w} = {h * w:,} tokens of {self.factor}x{self.factor} px")
