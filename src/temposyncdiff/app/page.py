"""tsd-app's page (Gradio): the model, a photo or video and speech in; the video, its summary or the error line out."""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
from omegaconf import DictConfig

from temposyncdiff.app.jobs import Request, error_line, generate, summary_lines
from temposyncdiff.app.models import find_models
from temposyncdiff.inference.precision import RUNTIMES
from temposyncdiff.utils.task import USER_ERRORS

log = logging.getLogger(__name__)

INTRO = """# TempoSyncDiff
A photo (animated) or a talking video (re-voiced) plus speech in, a talking-head video out, generated on this machine
by the same pipeline as `tsd-infer`."""
CSS = "#tsd-message { color: var(--error-text-color); font-weight: 600; }"


def build_page(app: DictConfig) -> gr.Blocks:
    """The Blocks of the page; generation runs in Gradio's queue, ``app.concurrency`` jobs at a time, beside the
    other requests."""

    def model_choices():
        labels = [m.label for m in find_models(app.model_dirs)]
        return gr.Dropdown(choices=labels, value=labels[0] if labels else None)

    def run(model, face, audio, text, steps, paste_back, runtime, threads, progress=gr.Progress()):  # noqa: B008
        request = Request(model, face, audio, text or "", steps, paste_back, runtime, threads)
        progress(0, desc="checking the inputs, loading the model")
        try:
            video, report = generate(
                app, request, lambda frames, total: progress.tqdm(frames, desc="generating", total=total, unit="frames")
            )
        except USER_ERRORS as err:
            return None, None, "", error_line(err, request.uploads())
        except Exception as err:  # a bug: its traceback goes to the server's log, the page gets one line
            log.exception("tsd-app: generation failed")
            return None, None, "", f"error: generation failed ({type(err).__name__}); the server's log has the details"
        return str(video), str(video), summary_lines(report), ""

    form = app.form
    with gr.Blocks(title="TempoSyncDiff", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(label="Model", elem_id="tsd-model")
                face = gr.File(
                    label="Photo or video: the face", file_types=["image", "video"], type="filepath", elem_id="tsd-face"
                )
                audio = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath", elem_id="tsd-audio")
                text = gr.Textbox(
                    label="... or a sentence to speak (espeak-ng; used without speech audio)",
                    lines=2,
                    elem_id="tsd-text",
                )
                with gr.Row():
                    steps = gr.Number(label="Steps (0: the model's own)", value=form.steps)
                    threads = gr.Number(label="Threads (0: the idle cores)", value=form.threads)
                with gr.Row():
                    runtime = gr.Radio(list(RUNTIMES), value=form.runtime, label="Runtime (onnx: tsd-export's graphs)")
                    paste_back = gr.Checkbox(value=form.paste_back, label="Paste the face back into the whole photo")
                button = gr.Button("Generate", variant="primary", elem_id="tsd-generate")
            with gr.Column():
                message = gr.Markdown(elem_id="tsd-message")
                video = gr.Video(
                    label="Talking head", interactive=False, buttons=["download"], height=360, elem_id="tsd-video"
                )
                summary = gr.Markdown(elem_id="tsd-summary")
                download = gr.File(label="sample.mp4", interactive=False, elem_id="tsd-download")
        button.click(
            run,
            [model, face, audio, text, steps, paste_back, runtime, threads],
            [video, download, summary, message],
            concurrency_limit=app.concurrency,
        )
        page.load(model_choices, outputs=model)
    return page.queue(max_size=app.queue_size)


def launch(app: DictConfig) -> None:
    """Serve the page on ``app.host``:``app.port`` until Ctrl-C: no share link unless asked, no analytics, no monitoring
    or run history; uploads over ``app.max_file_size`` are refused; the samples folder may be served."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own requests to itself at start
    build_page(app).launch(
        server_name=app.host,
        server_port=app.port,
        share=app.share,
        max_file_size=app.max_file_size,
        allowed_paths=[str(Path(app.paths.outputs_dir) / "samples")],
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        run_history=False,
        show_error=False,
        css=CSS,
    )
