"""The Gradio page of ``vqgan demo``: layout and wiring only; the work is in :mod:`.app`.

Safety defaults: bound to 127.0.0.1 unless told otherwise, no share link, no analytics, uploads
capped (:data:`~vqgan_cli.demo.maps.MAX_UPLOAD_BYTES`), and the checkpoints are the ones named
on the command line (the page cannot name another). One sampling job runs at a time (the queue
shows each waiting page its place); Stop, map previews and the legend run beside it.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402

from vqgan_cli.demo.app import SOURCES, DemoApp, SampleForm, Update  # noqa: E402
from vqgan_cli.demo.jobs import MainThreadRunner  # noqa: E402
from vqgan_cli.demo.maps import MAX_UPLOAD_BYTES, MapError, legend_html, new_seed  # noqa: E402
from vqgan_cli.sample.inputs import SampleUsageError  # noqa: E402

CSS = ".vqgan-legend{font-size:0.9em;line-height:1.6} #status{min-height:2.5em}"


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def build(app: DemoApp) -> gr.Blocks:
    """The page for ``app``'s prior (map, class picker, low-resolution upload or nothing)."""
    mode, vocab = app.mode, app.vocab
    title = f"vqgan demo · {app.models.prior_path.name}"
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"### {title}\nprior `{app.prior_arg}` · tokenizer `{app.models.tokenizer_path}` · "
                    f"{app.factor}x{app.factor} px per token · crop {app.crop[1]}x{app.crop[0]} tokens")
        labels_state = gr.State(None)  # the labels of the map box (paint starts from them)
        with gr.Tab("Sample"):
            with gr.Row():
                with gr.Column(scale=1, min_width=320):
                    source = gr.Radio(list(SOURCES), value="built-in" if vocab and vocab.landscapes else "upload",
                                      label="map", visible=mode == "labels", elem_id="source")
                    with gr.Row(visible=mode == "labels" and bool(vocab and vocab.landscapes)):
                        map_seed = gr.Number(value=7, precision=0, label="built-in map seed", elem_id="map_seed")
                        new_map = gr.Button("new map", size="sm", elem_id="new_map")
                    upload = gr.File(label="segmentation map (PNG of label indices)" if mode != "map"
                                     else "conditioning map (PNG)", file_types=["image"], type="filepath",
                                     visible=mode in ("labels", "map"), elem_id="upload")
                    # (layers=False or eraser=False hide Gradio's whole toolbar; erased pixels read
                    # back as the map the painting started from)
                    paint = gr.ImageEditor(
                        label="paint a map (brush colours = labels)", type="numpy", image_mode="RGBA",
                        sources=(), visible=mode == "labels", elem_id="paint", transforms=(), format="png",
                        interactive=True,
                        brush=gr.Brush(colors=vocab.hex_colours(), color_mode="fixed", default_size=12)
                        if vocab else None)
                    to_canvas = gr.Button("paint on this map", size="sm", visible=mode == "labels")
                    n_classes = app.models.prior.cond.n_classes or 0
                    class_id = gr.Dropdown(list(range(n_classes)), value=0 if n_classes else None,
                                           label="class", visible=mode == "class")
                    lowres = gr.File(label="low-resolution image", file_types=["image"], type="filepath",
                                     visible=mode == "lowres", elem_id="lowres")
                    size = gr.Dropdown(app.size_choices(), value=app.default_size(), allow_custom_value=True,
                                       label=f"size WxH (multiples of {app.factor}, at least the crop)",
                                       visible=mode != "lowres", elem_id="size")
                    window = gr.Radio(["exact", "fast"], value="exact", label="window (beyond the crop)")
                    with gr.Row():
                        top_k = gr.Number(value=0, precision=0, minimum=0, label="top-k (0: all)")
                        temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
                        seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    with gr.Row():
                        go = gr.Button("Sample", variant="primary", elem_id="sample")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Column(scale=2):
                    status = gr.Markdown("ready", elem_id="status")
                    with gr.Row():
                        map_box = gr.Image(label="map", interactive=False, visible=mode in ("labels",),
                                           elem_id="map_box", format="png")
                        bicubic = gr.Image(label="bicubic", interactive=False, visible=mode == "lowres",
                                           format="png")
                        image = gr.Image(label="sample", interactive=False, elem_id="image", format="jpeg")
                    legend = gr.HTML(legend_html(None, vocab) if vocab else "", visible=vocab is not None)
                    agreement = gr.Markdown("", elem_id="agreement")
                    files = gr.File(label="PNG and JSON sidecar (as vqgan sample writes them)",
                                    file_count="multiple", interactive=False, elem_id="files")
                    command = gr.Textbox(label="the same image from the command line", interactive=False,
                                         elem_id="command")
        with gr.Tab("Reconstruct"):
            with gr.Row():
                rec_in = gr.File(label="an image", file_types=["image"], type="filepath", elem_id="rec_upload")
                rec_go = gr.Button("Reconstruct", elem_id="reconstruct")
            rec_status = gr.Markdown("", elem_id="rec_status")
            with gr.Row():
                rec_a = gr.Image(label="input", interactive=False, format="png")
                rec_b = gr.Image(label="reconstruction", interactive=False, format="png")

        def form_of(src: str, mseed: Any, up: str | None, pnt: Any, cls: Any, low: str | None, sz: str,
                    win: str, k: Any, temp: float, s: Any) -> SampleForm:
            return SampleForm(src or "built-in", int(mseed or 0), up, pnt, int(cls or 0), low, sz or "",
                              win, int(k) if k else None, float(temp), int(s or 0))

        form_inputs = [source, map_seed, upload, paint, class_id, lowres, size, window, top_k, temperature, seed]

        def preview(*args: Any) -> tuple[Any, Any, Any, Any, Any]:
            """Show the chosen map (no sampling; runs beside a sampling job); the painting
            canvas starts from it."""
            if mode != "labels":
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            form = form_of(*args)
            try:
                rgb, leg, labels = app.show_map(form)
            except (MapError, SampleUsageError) as e:
                return gr.skip(), gr.skip(), gr.skip(), f"**Error:** {e}", gr.skip()
            canvas = gr.skip() if form.source == "paint" else app.canvas_for(labels)
            return rgb, leg, labels, "map ready", canvas

        def sample(src: str, mseed: Any, up: str | None, pnt: Any, cls: Any, low: str | None, sz: str,
                   win: str, k: Any, temp: float, s: Any, labels: Any,
                   request: gr.Request) -> Iterator[tuple[Any, ...]]:
            form = form_of(src, mseed, up, pnt, cls, low, sz, win, k, temp, s)
            for u in app.sample(form, _session(request), labels):
                yield _outputs(u)

        def _outputs(u: Update) -> tuple[Any, ...]:
            def v(x: Any) -> Any:
                return gr.skip() if x is None else x
            return (v(u.image), v(u.status), v(u.files), v(u.agreement), v(u.command), v(u.map_image),
                    v(u.legend), v(u.bicubic))

        def stop_job(request: gr.Request) -> str:
            return app.stop(_session(request))

        def reconstruct(path: str | None) -> tuple[Any, Any, str]:
            try:
                a, b, text = app.reconstruct(path)
            except MapError as e:
                return None, None, f"**Error:** {e}"
            return a, b, text

        outs = [image, status, files, agreement, command, map_box, legend, bicubic]
        preview_outs = [map_box, legend, labels_state, status, paint]
        # map previews run beside a sampling job but one at a time, in order: a quick second
        # change cannot be overtaken by the first (the canvas and the map box stay the same map)
        fast = dict(concurrency_limit=1, concurrency_id="preview", show_progress="hidden")
        for trigger in (map_seed.submit, source.change, upload.upload, size.change):
            trigger(preview, form_inputs, preview_outs, **fast)
        new_map.click(lambda: new_seed(), None, map_seed, **fast).then(preview, form_inputs, preview_outs, **fast)
        to_canvas.click(lambda labels: app.canvas_for(labels) if labels is not None else gr.skip(),
                        labels_state, paint, **fast)
        run = go.click(sample, [*form_inputs, labels_state], outs, concurrency_id="model",
                       concurrency_limit=1, show_progress="minimal")
        stop.click(stop_job, None, status, cancels=[run], queue=False)
        rec_go.click(reconstruct, rec_in, [rec_a, rec_b, rec_status], concurrency_id="model", concurrency_limit=1)
        demo.load(preview, form_inputs, preview_outs, **fast)
        def closed(request: gr.Request) -> None:
            app.jobs.stop(_session(request))  # a closed tab ends its job

        demo.unload(closed)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve the page: local by default, no share link, uploads capped, the app's temp files allowed."""
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=False,
                max_file_size=MAX_UPLOAD_BYTES, prevent_thread_lock=not block, show_error=True,
                footer_links=[], css=CSS, ssr_mode=False, mcp_server=False)


def serve(prior: str, tokenizer: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          device: str = "auto") -> None:
    """Load the models once, serve the page, and sample on this (the main) thread until Ctrl-C."""
    runner = MainThreadRunner()
    app = DemoApp(prior, tokenizer, device, runner=runner)
    print(f"vqgan demo: {app.models.prior_path} ({app.mode}) on http://{host}:{port}  (Ctrl-C to stop)", flush=True)
    demo = build(app)
    launch(demo, host, port, block=False)
    try:
        runner.serve_forever()
    finally:
        runner.closed.set()
        demo.close()
