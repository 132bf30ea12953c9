"""The three ``vqgan evaluate`` jobs end to end: load what is named, measure, write the report.

Each returns its result (``metrics``, ``notes``, ``to_json()``) and the files written; the
command line only prints them. Problems name the setting at fault in backticks (`crop`).

``tokenizer`` and ``samples`` also run under torchrun (``torchrun --nproc_per_node N vqgan
evaluate ...``): the ranks check that they were given the same arguments, each measures its share
of the images, every rank computes the one-process numbers from the gathered measurements, and
rank 0 alone shows progress and writes the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from vqgan_cli.evaluate.report import parse_crop, write_report
from vqgan_cli.runtime import Runtime, announce_precision, check_same_arguments, setup_runtime, shutdown


class Evaluated(NamedTuple):
    result: Any  # TokenizerResult | SamplesResult | PriorResult
    written: list[Path]
    warnings: list[str]  # measurements left out, and why
    main: bool = True  # the process that reports (rank 0 under torchrun)


def _joined(device: str, arguments: dict[str, Any], what: str) -> Runtime:
    """Join the torchrun process group (if any) and check every rank got the same ``arguments``;
    the group is left again when the check fails."""
    rt = setup_runtime(device)
    try:
        check_same_arguments(rt, arguments, what)
    except BaseException:
        shutdown(rt)
        raise
    return rt


def tokenizer_job(tokenizer: str, data: str, out: Path, *, size: int = 256, root: str | None = None,
                  limit: int | None = None, batch_size: int = 8, config: str | Path | None = None,
                  lpips: str = "torchvision", fid: bool = True, inception_weights: Path | None = None,
                  precision: str = "auto", device: str = "auto") -> Evaluated:
    """Reconstruction quality of ``tokenizer`` over ``data``; LPIPS is skipped with a warning when
    its weights are missing, rFID needs the Inception weights (checked before any work)."""
    arguments = {k: str(v) for k, v in locals().items()}  # the parameters only: before any import
    from vqgan_cli.checkpoints.load import load_tokenizer
    from vqgan_cli.evaluate.inception import Inception, check_inception_weights
    from vqgan_cli.evaluate.tokenizer import evaluate_tokenizer
    from vqgan_cli.models.lpips import PerceptualWeightsMissing, build_lpips, check_lpips_available

    rt = _joined(device, arguments, "evaluate tokenizer")
    try:
        if fid:
            check_inception_weights(inception_weights)
        model = load_tokenizer(tokenizer, config=str(config) if config else None)
        perceptual, warnings = None, []
        if lpips != "none" and model.config.modality == "image":
            try:
                check_lpips_available(lpips)
                perceptual = build_lpips(lpips).to(rt.device).eval()
            except PerceptualWeightsMissing as e:
                lines = str(e).splitlines()
                warnings.append(f"LPIPS skipped: {lines[0]} {lines[2] if len(lines) > 2 else ''}".rstrip())
        inc = Inception(inception_weights, rt.device) if fid else None
        # the tokenizer's precision; the metrics are fp32
        amp = announce_precision(precision, rt.device, training=False, key="--precision", show=rt.is_main).name
        res = evaluate_tokenizer(model, data, size, limit, batch_size, rt.device, amp, perceptual, inc,
                                 progress=rt.is_main, root=root, rt=rt)
        res.settings.update(tokenizer=tokenizer, lpips=lpips if perceptual is not None else None)
        written = write_report(out, res.to_json(), res.per_image) if rt.is_main else []
        return Evaluated(res, written, warnings, rt.is_main)
    finally:
        shutdown(rt)


def samples_job(samples: Path, reference: str, out: Path, *, size: int | None = None, limit: int | None = None,
                save_stats: Path | None = None, kid_subsets: int = 100, kid_subset_size: int | None = None,
                is_splits: int = 10, batch_size: int = 32, inception_weights: Path | None = None,
                device: str = "auto") -> Evaluated:
    """FID, KID and IS of ``samples`` against ``reference``, plus label agreement of samples
    drawn from built-in maps."""
    arguments = {k: str(v) for k, v in locals().items()}  # the parameters only: before any import
    from vqgan_cli.evaluate.inception import Inception, check_inception_weights
    from vqgan_cli.evaluate.samples import evaluate_samples

    rt = _joined(device, arguments, "evaluate samples")
    try:
        check_inception_weights(inception_weights)
        if save_stats is not None and reference.endswith(".npz"):
            raise ValueError("`save_stats`: the reference is already a statistics file")
        inc = Inception(inception_weights, rt.device)
        res = evaluate_samples(samples, reference, inc, size=size, limit=limit, batch_size=batch_size,
                               kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, is_splits=is_splits,
                               save_stats_to=save_stats, progress=rt.is_main, rt=rt)
        written = write_report(out, res.to_json()) if rt.is_main else []
        return Evaluated(res, written, [], rt.is_main)
    finally:
        shutdown(rt)


def prior_job(prior: str, shards: Path, out: Path, *, limit: int | None = None, batch_size: int = 16,
              crop: str | None = None, val_fraction: float | None = None, config: str | Path | None = None,
              device: str = "auto") -> Evaluated:
    """Held-out NLL of ``prior`` on the token shards in ``shards``."""
    from vqgan_cli.checkpoints.load import load_prior
    from vqgan_cli.evaluate.prior import evaluate_prior
    from vqgan_cli.runtime import resolve_device

    grid = parse_crop(crop)
    model = load_prior(prior, config=str(config) if config else None)
    res = evaluate_prior(model, shards, limit=limit, batch_size=batch_size, device=resolve_device(device),
                         crop=grid, val_fraction=val_fraction, progress=True)
    res.settings.update(prior=prior)
    return Evaluated(res, write_report(out, res.to_json()), [])
