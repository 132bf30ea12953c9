"""`vqgan demo` without a browser: maps from a seed, an upload or a painting, label checks, bad
input, partial decodes against whole decodes, Stop, and the page's PNG against `vqgan sample`'s."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import demo_checkpoints as make_checkpoints
from factory import demo_tokenizer_config as tok_config
from PIL import Image
from typer.testing import CliRunner

from vqgan_cli.cli import app as cli_app
from vqgan_cli.data.landscapes import LANDSCAPE_CLASSES, render_landscape
from vqgan_cli.demo import maps
from vqgan_cli.demo.app import DemoApp, SampleForm, prior_mode
from vqgan_cli.demo.jobs import Job, ProgressiveImage, decode_band, decoder_halo, token_colours
from vqgan_cli.demo.maps import MapError, vocabulary
from vqgan_cli.evaluate.map_agreement import fit_cell_classifier
from vqgan_cli.images import to_uint8
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.sample.inputs import load_models
from vqgan_cli.sample.plan import plan_sample
from vqgan_cli.sample.request import SampleRequest, Scheme
from vqgan_cli.sample.run import sample_batch
from vqgan_cli.sample.tokens import SamplingOptions

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("demo_ckpts"))


@pytest.fixture(scope="module")
def classifier():
    return fit_cell_classifier(seeds=range(2), sizes=((32, 32),), factor=4, steps=30)


@pytest.fixture
def demo(ckpts, classifier, tmp_path) -> DemoApp:
    return DemoApp(str(ckpts["labels"]), classifier=classifier, dead_after=None, workdir=tmp_path / "work")


def run(demo: DemoApp, form: SampleForm, **kw):
    """All updates of one request; the last one is final."""
    ups = list(demo.sample(form, **kw))
    assert ups[-1].done
    return ups


def merged(ups) -> dict:
    """The page's state after all updates (later values win, None leaves a value)."""
    out: dict = {}
    for u in ups:
        for k, v in vars(u).items():
            if v is not None:
                out[k] = v
    return out


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode=mode).save(path)
    return path


# ---- maps ---------------------------------------------------------------------------------


def test_vocabularies_name_every_label() -> None:
    land = vocabulary(8)
    assert land.landscapes and land.names == LANDSCAPE_CLASSES
    assert len({tuple(c) for c in land.colours}) == 8  # a painted colour maps back to one label
    coco = vocabulary(182)
    assert not coco.landscapes and len(coco.names) == 182
    assert coco.names[0] == "person" and coco.names[156] == "sky-other" and coco.names[181] == "wood"
    assert vocabulary(183).names[:2] == ("unlabelled", "person")
    other = vocabulary(5)
    assert other.names[4] == "label 4" and other.colours.shape == (5, 3)


def test_builtin_map_is_the_cli_scene(demo) -> None:
    rgb, legend, labels = demo.show_map(SampleForm(source="built-in", map_seed=3, size="32x24"))
    want = render_landscape(3, 24, 32).labels
    assert np.array_equal(labels, want)
    assert rgb.shape == (24, 32, 3)
    for v in np.unique(want):
        assert LANDSCAPE_CLASSES[v] in legend


def test_uploaded_maps_grayscale_palette_and_page_colours(demo, tmp_path) -> None:
    labels = render_landscape(5, 24, 32).labels.astype(np.uint8)
    gray = write_png(tmp_path / "gray.png", labels, "L")
    assert np.array_equal(maps.read_map_upload(gray, demo.vocab), labels)
    pal = Image.fromarray(labels, mode="L").convert("P")
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(maps.read_map_upload(tmp_path / "pal.png", demo.vocab), labels)
    coloured = write_png(tmp_path / "colours.png", maps.colourise(labels, demo.vocab))
    assert np.array_equal(maps.read_map_upload(coloured, demo.vocab), labels)
    shifted = maps.read_map_upload(write_png(tmp_path / "s.png", np.full((4, 4), 255, np.uint8)),
                                   vocabulary(183), label_shift=1)
    assert (shifted == 0).all()  # COCO's 255 'unlabelled' -> 0, as --cond reads it


@pytest.mark.parametrize("case, message", [
    ("text", "not an image"),
    ("bomb", "decompression bomb"),
    ("label", "label 9 is not known to this prior; it knows 8 labels: 0 sky, 1 cloud"),
    ("colours", "colours are not this prior's label colours"),
    ("big", "the limit is"),
])
def test_bad_uploads_are_named(demo, tmp_path, monkeypatch, case, message) -> None:
    path = tmp_path / "up.png"
    if case == "text":
        path.write_text("this is not a picture")
    elif case == "bomb":
        Image.new("1", (5000, 4000)).save(path)  # 20 M pixels in a few kB
        assert path.stat().st_size < 100_000
    elif case == "label":
        arr = np.zeros((8, 8), np.uint8)
        arr[3, 3] = 9
        write_png(path, arr, "L")
    elif case == "colours":
        write_png(path, np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    else:
        write_png(path, np.zeros((8, 8), np.uint8), "L")
        monkeypatch.setattr(maps, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(MapError, match=message.replace("(", r"\(")):
        maps.read_map_upload(path, demo.vocab)


def test_painting_reads_back_the_brush_labels(demo) -> None:
    vocab = demo.vocab
    labels = np.zeros((16, 20), np.int32)
    labels[8:] = 5  # grass under sky
    labels[10:12, 4:9] = 4  # a pond
    rgba = np.concatenate([maps.colourise(labels, vocab), np.full((16, 20, 1), 255, np.uint8)], 2)
    rgba[7, 3, :3] = (vocab.colours[0].astype(int) + vocab.colours[5].astype(int)) // 2 + 3  # a soft edge
    got = maps.read_painting({"composite": rgba}, vocab, None)
    assert np.array_equal(np.delete(got, 3, 1)[[0, 8, 10, 15]], np.delete(labels, 3, 1)[[0, 8, 10, 15]])
    assert got[7, 3] in (0, 5)
    rgba[:2, :, 3] = 0  # unpainted top: taken from the map painting started from
    fallback = np.full((16, 20), 1, np.int32)
    assert (maps.read_painting({"composite": rgba}, vocab, fallback)[:2] == 1).all()
    with pytest.raises(MapError, match="parts of the painting are empty"):
        maps.read_painting({"composite": rgba}, vocab, None)
    with pytest.raises(MapError, match="nothing painted yet"):
        maps.read_painting(None, vocab, None)


# ---- partial decodes ----------------------------------------------------------------------


def conv_only_tokenizer(ch_mult: tuple[int, ...], blocks: int) -> VQGAN:
    """A tokenizer whose decoder is purely convolutional (per-pixel norm, no attention)."""
    cfg = tok_config()
    cfg.autoencoder.ch_mult, cfg.autoencoder.num_res_blocks = ch_mult, blocks
    torch.manual_seed(0)
    tok = VQGAN(cfg).eval()
    tok.decoder.mid.attn_1 = torch.nn.Identity()  # the one global step of the decoder
    return tok


@pytest.mark.parametrize("ch_mult, blocks", [((1, 2, 2), 1), ((1, 2, 2, 4), 1), ((1, 1, 2), 2)])
def test_band_decode_is_the_crop_of_the_whole_decode(ch_mult, blocks) -> None:
    tok = conv_only_tokenizer(ch_mult, blocks)
    f, halo = tok.factor, decoder_halo(tok.config.autoencoder)
    tokens = torch.randint(0, 16, (1, 2 * halo + 12, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tok.decode_indices(tokens).float()
    for r0, r1 in ((0, 3), (halo + 2, halo + 9), (tokens.shape[1] - 4, tokens.shape[1])):
        band = decode_band(tok, tokens, r0, r1, halo)
        assert band.shape[-2:] == ((r1 - r0) * f, 5 * f)
        torch.testing.assert_close(band, whole[:, :, r0 * f:r1 * f], atol=1e-5, rtol=0)
    # without the context rows the band's edges differ: the halo is what makes it exact
    r0, r1 = halo + 2, halo + 9
    assert (decode_band(tok, tokens, r0, r1, 0) - whole[:, :, r0 * f:r1 * f]).abs().max() > 1e-3


def test_progressive_image_colours_then_bands_within_budget(ckpts) -> None:
    models = load_models(ckpts["labels"], None, torch.device("cpu"))
    tok = models.tokenizer
    grid = torch.randint(0, 16, (20, 6), generator=torch.Generator().manual_seed(2))
    colours = token_colours(tok)
    assert colours.shape == (16, 3) and colours.dtype == np.uint8
    none = ProgressiveImage(tok, (20, 6), colours, budget=0.0, halo=2)
    none.update(grid, 10, elapsed=100.0)
    assert none.bands == 0 and none.previewed == 10  # over budget: token colours only
    assert np.array_equal(none.canvas[:4, :4], np.broadcast_to(colours[grid[0, 0]], (4, 4, 3)))
    assert (none.canvas[40:] == maps_undrawn()).all()  # rows not drawn yet stay dark
    # a convolutional decoder and its full halo: the bands put together are the whole decode
    conv = conv_only_tokenizer((1, 2, 2), 1)
    halo = decoder_halo(conv.config.autoencoder)
    H = 3 * halo
    grid = torch.randint(0, 16, (H, 6), generator=torch.Generator().manual_seed(3))
    every = ProgressiveImage(conv, (H, 6), token_colours(conv), budget=1e9, halo=halo)
    for rows in range(1, H + 1):  # the sampler finishes a row at a time
        every.update(grid, rows, elapsed=1.0)
    assert every.decoded == H and every.bands > 2
    with torch.no_grad():
        whole = to_uint8(conv.decode_indices(grid[None])[0])
    assert np.abs(every.canvas.astype(int) - whole.astype(int)).max() <= 1


def maps_undrawn() -> np.ndarray:
    from vqgan_cli.demo.jobs import UNDRAWN

    return UNDRAWN


def test_step_hook_reports_rows_and_tokens_without_changing_tokens(ckpts) -> None:
    models = load_models(ckpts["labels"], None, torch.device("cpu"))
    req = SampleRequest(prior=str(ckpts["labels"]), cond="builtin:landscapes:1", size="40x32")
    plan = plan_sample(req, models, [])
    opts = SamplingOptions(n_tokens=16)
    for window in ("exact", "fast"):
        seen: list[tuple[int, int]] = []

        def hook(grid: torch.Tensor, rows: int, tokens: int, seen: list = seen) -> None:
            seen.append((rows, tokens))

        with_hook = sample_batch(models, plan, opts, [0], Scheme(window), on_step=hook)
        plain = sample_batch(models, plan, opts, [0], Scheme(window))
        assert torch.equal(with_hook, plain)
        rows, toks = zip(*seen, strict=True)
        assert list(rows) == sorted(rows) and list(toks) == sorted(toks)
        assert seen[-1] == (8, 80) and rows[0] < 8


# ---- the page's sample is vqgan sample's ---------------------------------------------------


def cli_sample(args: list[str]) -> None:
    r = runner.invoke(cli_app, ["sample", *args])
    assert r.exit_code == 0, r.output


def same_sidecar(a: Path, b: Path) -> None:
    """Equal JSON sidecars apart from where each was written and the command line."""
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    for j in (ja, jb):
        j["settings"].pop("out")
        j["settings"].pop("command")
    assert ja == jb


def test_page_png_equals_vqgan_sample(demo, ckpts, tmp_path) -> None:
    form = SampleForm(source="built-in", map_seed=4, size="40x32", window="fast", top_k=8,
                      temperature=0.9, seed=3)
    state = merged(run(demo, form))
    png = Path(state["image"])
    assert [Path(f).name for f in state["files"]] == ["0000_seed3.png", "0000_seed3.json"]
    assert "label agreement" in state["agreement"]
    assert state["map_image"].shape == (32, 40, 3)
    cli_sample(["--prior", str(ckpts["labels"]), "--cond", "builtin:landscapes:4", "--size", "40x32",
                "--n", "1", "--seed", "3", "--top-k", "8", "--temperature", "0.9", "--window", "fast",
                "--out", str(tmp_path / "cli")])
    assert png.read_bytes() == (tmp_path / "cli" / "0000_seed3.png").read_bytes()
    same_sidecar(png.with_suffix(".json"), tmp_path / "cli" / "0000_seed3.json")
    # the command printed on the page is that command
    assert state["command"].startswith("vqgan sample --prior ") and "--cond builtin:landscapes:4" in state["command"]


def test_uploaded_and_painted_maps_sample_like_the_cli(demo, ckpts, tmp_path) -> None:
    labels = render_landscape(8, 32, 40).labels.astype(np.uint8)
    up = write_png(tmp_path / "map.png", labels, "L")
    rgba = np.concatenate([maps.colourise(labels, demo.vocab), np.full((32, 40, 1), 255, np.uint8)], 2)
    for form in (SampleForm(source="upload", upload=str(up), size="40x32", seed=1),
                 SampleForm(source="paint", painting={"composite": rgba}, size="40x32", seed=1)):
        state = merged(run(demo, form))
        png = Path(state["image"])
        cond = png.parent / "map.png"
        assert np.array_equal(np.asarray(Image.open(cond)), labels)  # the map --cond reads
        out = tmp_path / f"cli_{form.source}"
        cli_sample(["--prior", str(ckpts["labels"]), "--cond", str(cond), "--size", "40x32", "--n", "1",
                    "--seed", "1", "--out", str(out)])
        assert png.read_bytes() == (out / "0000_seed1.png").read_bytes()
        assert "agreement" not in state  # measured for built-in scenes only


@pytest.mark.parametrize("form, message", [
    (SampleForm(size="42x32"), "multiples of the tokenizer's factor 4; nearest valid sizes: 40x32, 44x32"),
    (SampleForm(size="8x8"), "smaller than the prior's crop 16x16"),
    (SampleForm(source="upload", upload=None, size="32x32"), "no map uploaded yet"),
    (SampleForm(source="paint", painting=None, size="32x32"), "nothing painted yet"),
])
def test_bad_requests_give_a_message_and_the_next_one_works(demo, form, message) -> None:
    ups = run(demo, form)
    assert ups[-1].error and message in ups[-1].status
    good = merged(run(demo, SampleForm(size="16x16")))
    assert Path(good["image"]).is_file() and good["status"].startswith("done")


def test_bad_upload_in_a_request(demo, tmp_path) -> None:
    arr = np.zeros((16, 16), np.uint8)
    arr[0, 0] = 12
    ups = run(demo, SampleForm(source="upload", upload=str(write_png(tmp_path / "m.png", arr, "L")), size="16x16"))
    assert ups[-1].error and "label 12 is not known to this prior" in ups[-1].status and "7 sand" in ups[-1].status


# ---- Stop, closed tabs, other priors, reconstruction ----------------------------------------


def slow_request(demo: DemoApp, tmp_path: Path) -> SampleRequest:
    req, _, _ = demo.build_request(SampleForm(size="512x512", window="exact"), tmp_path)
    return req  # 16k tokens, one window forward each: long enough to stop in the middle


def test_stop_ends_the_job_within_a_second(demo, tmp_path) -> None:
    job = Job(demo.models, slow_request(demo, tmp_path), demo.colours, dead_after=None).start()
    deadline = time.monotonic() + 20
    while job.status.tokens_done == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.status.tokens_done > 0, "the job did not start"
    t0 = time.monotonic()
    job.stop.set()
    assert job.wait(1.0), "still running a second after Stop"
    assert time.monotonic() - t0 < 1.0
    assert job.status.phase == "stopped" and job.report is None
    assert not list(tmp_path.glob("*.png"))


def test_a_page_that_stops_asking_cancels_its_job(demo, tmp_path) -> None:
    job = Job(demo.models, slow_request(demo, tmp_path), demo.colours, dead_after=0.3).start()
    assert job.wait(10.0) and job.status.phase == "stopped"


def test_stop_button_and_generator_close_reach_the_running_job(demo) -> None:
    gen = demo.sample(SampleForm(size="512x512"), session="s1", poll=0.05)
    first = next(gen)
    assert first.status == "started"
    job = demo.jobs._jobs["s1"]
    assert demo.stop("s1") == "**Stopped.**"
    assert job.wait(2.0) and job.status.phase == "stopped"
    last = list(gen)[-1]
    assert last.status == "**Stopped.**" and last.done
    assert demo.stop("s1") == "nothing is running"
    gen2 = demo.sample(SampleForm(size="512x512"), session="s2", poll=0.05)
    next(gen2)
    job2 = demo.jobs._jobs["s2"]
    gen2.close()  # the page went away mid-job
    assert job2.wait(2.0) and job2.status.phase == "stopped"


def test_other_priors(ckpts, tmp_path) -> None:
    cls = DemoApp(str(ckpts["class"]), dead_after=None, workdir=tmp_path / "c")
    assert cls.mode == "class" and cls.vocab is None
    state = merged(run(cls, SampleForm(class_id=3, size="16x16")))
    assert Path(state["image"]).name == "0000_class3_seed0.png"
    sos = DemoApp(str(ckpts["sos"]), dead_after=None, workdir=tmp_path / "s")
    assert sos.mode == "none"
    assert Path(merged(run(sos, SampleForm(size="24x16")))["image"]).is_file()
    sr = DemoApp(str(ckpts["sr"]), dead_after=None, workdir=tmp_path / "r")
    assert sr.mode == "lowres" and prior_mode(sr.models) == "lowres"
    low = write_png(tmp_path / "low.png", np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8))
    state = merged(run(sr, SampleForm(lowres=str(low))))
    with Image.open(state["image"]) as im:
        assert im.size == (24, 20)
    assert state["bicubic"].shape == (20, 24, 3)
    assert "no low-resolution image" in run(sr, SampleForm())[-1].status


def test_reconstruct_tab(demo, tmp_path) -> None:
    photo = write_png(tmp_path / "p.png", render_landscape(2, 30, 34).image)
    a, b, text = demo.reconstruct(str(photo))
    assert a.shape == b.shape == (30, 34, 3) and "PSNR" in text and "dB" in text
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(MapError, match="not an image"):
        demo.reconstruct(str(bad))


def test_demo_command_without_gradio_says_how_to_install(monkeypatch) -> None:
    import vqgan_cli.demo as demo_pkg

    monkeypatch.setattr(demo_pkg, "gradio_available", lambda: False)
    r = runner.invoke(cli_app, ["demo", "--prior", "whatever.safetensors"])
    assert r.exit_code == 2
    assert 'pip install -e ".[demo]"' in " ".join(r.output.split())
    assert "Traceback" not in r.output


def test_main_thread_runner_runs_jobs_on_the_serving_thread(demo, tmp_path) -> None:
    import threading

    from vqgan_cli.demo.jobs import MainThreadRunner

    runner = MainThreadRunner()
    req, _, _ = demo.build_request(SampleForm(size="16x16"), tmp_path)
    job = Job(demo.models, req, demo.colours, dead_after=None)
    ran_on: list[threading.Thread] = []
    run_job = job.run

    def run() -> None:
        ran_on.append(threading.current_thread())
        run_job()

    job.run = run  # type: ignore[method-assign]
    job.start(runner)
    threading.Thread(target=lambda: (job.wait(30), runner.closed.set()), daemon=True).start()
    runner.serve_forever(poll=0.05)
    assert ran_on == [threading.current_thread()]
    assert job.report is not None and job.report.files[0].is_file()
