"""The Promptus Studio page: upload, encode at a chosen bitrate, follow and abort, compare (Gradio).

The page only calls the studio's plain modules (settings, uploads, jobs, session)
and shows what they return; every user mistake arrives as a PromptusError whose
message goes into the page's status box. Progress is pulled by a timer that is
active only while this session's encode runs.
"""

from __future__ import annotations

import atexit
import html
import logging
import math
import os
import threading
from pathlib import Path

# A local tool does not call home; set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..backends import BASELINE, quick_backends  # noqa: E402
from ..config import CodecConfig  # noqa: E402
from ..errors import PromptusError  # noqa: E402
from ..video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ensure_sample_clip  # noqa: E402
from .jobs import EncodeJob, EncodeOutcome, Progress, StudioModel, decoded_psnr, load_studio_model, run_decode_benchmark  # noqa: E402
from .session import OWNER_FILE, Session, SessionRegistry  # noqa: E402
from .settings import (  # noqa: E402
    DEFAULT_PRESET, PRESETS, SIZES, STUDIO_BACKENDS, StudioSettings, describe_rate, expected_rate, frames_to_encode,
    preset_by_label,
)
from .uploads import ClipInfo, UploadError, UploadLimits, human_bytes, prepare_clip, probe_frames  # noqa: E402

log = logging.getLogger(__name__)

MODES = ("Basic", "Advanced")
KEYFRAME_COLUMNS = ["keyframe", "frames", "iterations", "seconds", "ms / iteration", "closed-loop PSNR (dB)"]
NOMINAL_FPS = CodecConfig.fps  # the rate shown before a clip is chosen


def _banner(model: StudioModel) -> str:
    if model.tiny:
        return (
            '<div id="studio-banner" data-model="tiny" style="background:#fff3cd;border:2px solid #d39e00;'
            'border-radius:8px;padding:10px 14px;color:#533f03;font-weight:600">'
            "⚠ Tiny test model: no SD-Turbo weights in checkpoints/, so the studio runs the built-in "
            "random-weight model. Encoding, abort/resume, bitrates and timings are real; the pictures are "
            "not (this model cannot reconstruct real images). Put sd_turbo.safetensors in checkpoints/ "
            "(README, 'Model weights') and restart to use SD-Turbo.</div>")
    return (f'<div id="studio-banner" data-model="sd-turbo" style="padding:6px 2px;color:#555">'
            f"Model: SD-Turbo from {html.escape(model.spec)} on {model.device}.</div>")


def _status(kind: str, text: str) -> str:
    # Words, not emoji: a server or headless browser may lack an emoji font.
    word = {"error": "Error", "ok": "Ready", "done": "Done", "info": "", "busy": "Working", "stopping": "Stopping", "stop": "Stopped"}[kind]
    return f"**{word}:** {text}" if word else text


def _enlarge(image: np.ndarray, at_least: int = 256) -> np.ndarray:
    """Small previews scaled up by whole pixels, so that a 64-px frame stays visible and sharp."""
    k = max(1, at_least // image.shape[0])
    return image.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else image


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def progress_html(p: Progress | None) -> str:
    """The progress bar; its data attributes let tests and scripts read it."""
    if p is None:
        return '<div id="studio-progress-bar" data-state="idle" data-done="0" data-total="0"></div>'
    pct = 100 * p.fraction
    colour = {"aborted": "#d97706", "failed": "#dc2626", "done": "#16a34a"}.get(p.state, "#2563eb")
    detail = (f"keyframe {p.keyframe + 1} of {p.keyframes} · iteration {p.iteration}/{p.iterations} · "
              f"loss {_fmt(p.loss, '.4f')} · PSNR {_fmt(p.psnr, '.2f')} dB" if p.iterations else p.message)
    return (
        f'<div id="studio-progress-bar" data-state="{p.state}" data-done="{p.done}" data-total="{p.total}" '
        f'data-keyframe="{p.keyframe}">'
        f'<div style="background:#e5e7eb;border-radius:6px;height:18px;overflow:hidden">'
        f'<div style="width:{pct:.1f}%;height:100%;background:{colour};transition:width .3s"></div></div>'
        f'<div style="margin-top:4px;font-size:14px">{p.state} · {pct:.0f}% · {html.escape(detail)} · '
        f"{p.elapsed:.1f} s</div></div>")


class Studio:
    """One studio server: the model, the sessions and the page (``.blocks``)."""

    def __init__(self, model: StudioModel, *, defaults: StudioSettings | None = None,
                 limits: UploadLimits | None = None, workdir: str | Path | None = None, poll_s: float = 0.5):
        self.model = model
        self.defaults = defaults or model.defaults()
        self.limits = limits or UploadLimits()
        # Inside Gradio's own upload folder by default: Gradio then serves the session's files
        # where they are instead of copying them to its cache, so removing the folder removes all.
        self.sessions = SessionRegistry(workdir if workdir is not None else gr.utils.get_upload_folder())
        self.machine = threading.Lock()  # one encode or benchmark at a time on this machine
        self.poll_s = poll_s
        self._sample: ClipInfo | None = None
        self._sample_lock = threading.Lock()
        self.blocks = self._build()
        self.blocks.promptus_studio = self
        atexit.register(self.close)

    def close(self) -> None:
        """Stop every encode and remove every session's files."""
        self.sessions.close_all()

    # ------------------------------------------------------------ serving

    def mount_kwargs(self) -> dict:
        # Only published files are served; sessions' uploads, encodes and checkpoints never are.
        r = self.sessions
        return dict(max_file_size=self.limits.max_bytes, allowed_paths=[str(r.public)],
                    blocked_paths=[str(r.private), str(r.root / OWNER_FILE)], footer_links=[],
                    theme=offline_theme(), css=STUDIO_CSS)

    def launch(self, host: str = "127.0.0.1", port: int = 7860, **kwargs):
        return self.blocks.launch(server_name=host, server_port=port, **self.mount_kwargs(), **kwargs)

    # ------------------------------------------------------------- helpers

    def _session(self, request: gr.Request) -> Session:
        return self.sessions.get(getattr(request, "session_hash", None))

    def _settings(self, mode, preset, rank, interval, size, iters_first, iters, init_latent, init_precision,
                  perceptual, backend, max_frames) -> StudioSettings:
        if mode == "Basic":
            return self.defaults.with_preset(preset_by_label(preset))
        values = dict(rank=rank, interval=interval, size=size, iters_first=iters_first, iters=iters,
                      max_frames=max_frames)
        for name, v in values.items():
            if v is None or (isinstance(v, float) and not v.is_integer()):
                raise PromptusError(f"{name.replace('_', ' ')} needs a whole number (got {v!r})")
        return StudioSettings(**{k: int(v) for k, v in values.items()}, init_latent=init_latent,
                              init_precision=init_precision, perceptual=bool(perceptual), backend=backend)

    def _rate_text(self, settings: StudioSettings, clip: ClipInfo | None) -> str:
        if clip is None:
            n, fps = settings.max_frames, NOMINAL_FPS
        else:
            n, fps = frames_to_encode(settings, clip.frame_count), clip.fps
        rate = expected_rate(settings.codec(fps), n, settings.init_precision, self.model.identity)
        iters = settings.total_iterations(n)
        return (describe_rate(rate, nominal=clip is None) +
                f"\n\nTraining: {settings.iters_first} iterations for keyframe 0, {settings.iters} for each later "
                f"one ({iters:,} in all); perceptual loss {'on' if settings.perceptual else 'off'}, init latent "
                f"from {settings.init_latent}, closed loop on the {settings.backend} backend.")

    def _sample_clip(self) -> ClipInfo:
        with self._sample_lock:
            if self._sample is None:
                folder = ensure_sample_clip(self.sessions.private / "sample" / "sky")
                self._sample = probe_frames(folder, "sample clip (sky, made in code)", self.limits)
            return self._sample

    # ------------------------------------------------------------ handlers

    def on_settings(self, request: gr.Request, *values):
        try:
            s = self._session(request)
            return self._rate_text(self._settings(*values), s.clip)
        except PromptusError as e:
            return _status("error", str(e))

    def on_preset(self, preset):
        p = preset_by_label(preset)
        return gr.update(value=p.rank), gr.update(value=p.interval)

    def on_mode(self, mode):
        return gr.update(visible=mode == "Basic"), gr.update(visible=mode == "Advanced")

    def on_upload(self, request: gr.Request, file, *values):
        try:
            s = self._session(request)
            if s.busy:
                raise PromptusError("an encode is running; abort it before loading another clip")
            s.set_clip(None)
            if file is None:
                return "", _status("info", "Upload a clip or pick the sample."), self.on_settings(request, *values)
            if self.sessions.inside(file):  # a path the page never uploads: a visitor naming a server file
                raise PromptusError("the upload did not arrive; upload the clip again")
            try:
                clip = prepare_clip(file, s.upload_dir, self.limits)
            except UploadError:
                Path(file).unlink(missing_ok=True)  # a refused upload goes at once, not when Gradio's cache expires
                raise
            s.set_clip(clip)
        except PromptusError as e:
            return "", _status("error", f"cannot use this upload: {e}"), self.on_settings(request, *values)
        return (clip.describe(), _status("ok", "clip loaded: choose a bitrate and press Encode."),
                self.on_settings(request, *values))

    def on_sample(self, request: gr.Request, *values):
        try:
            s = self._session(request)
            if s.busy:
                raise PromptusError("an encode is running; abort it before loading another clip")
            s.set_clip(self._sample_clip())
        except PromptusError as e:
            return "", _status("error", str(e)), self.on_settings(request, *values)
        return (s.clip.describe(), _status("ok", "sample clip loaded: choose a bitrate and press Encode."),
                self.on_settings(request, *values))

    def _buttons(self, running: bool, can_resume: bool = False):
        return (gr.update(interactive=not running), gr.update(interactive=running),
                gr.update(interactive=can_resume and not running))

    def on_encode(self, request: gr.Request, *values):
        return self._start(values, resume=False, request=request)

    def on_resume(self, request: gr.Request, *values):
        return self._start(values, resume=True, request=request)

    def _start(self, values, *, resume: bool, request: gr.Request):
        try:
            s = self._session(request)
            if s.clip is None:
                raise PromptusError("upload a clip (or pick the sample) first")
            if resume:
                if s.job is None or s.job.snapshot().state != "aborted":
                    raise PromptusError("there is no stopped encode to resume; press Encode")
                settings = s.job.settings  # a resume must use the settings of the run it continues
            else:
                settings = self._settings(*values)
            job = s.start(EncodeJob(self.model, settings, s.clip, s.out, resume=resume, machine=self.machine))
        except PromptusError as e:
            return (_status("error", str(e)), gr.Timer(active=False), *self._buttons(False, self._can_resume(request)))
        what = "resuming" if resume else "encoding"
        return (_status("busy", f"{what} {job.frame_count} frames, {job.keyframes} keyframes…"),
                gr.Timer(active=True), *self._buttons(True))

    def _can_resume(self, request) -> bool:
        s = self._session(request)
        return s.job is not None and s.job.snapshot().state == "aborted"

    def on_abort(self, request: gr.Request):
        s = self._session(request)
        if s.job is None or s.job.snapshot().finished:
            return _status("info", "nothing is running")
        s.job.abort()
        return _status("stopping", "after the current iteration…")

    def on_tick(self, request: gr.Request):
        """Progress, preview and status; the results once, when an encode has finished."""
        s = self._session(request)
        job = s.job
        skip_results = tuple(gr.skip() for _ in range(self._n_results))
        if job is None:
            return (progress_html(None), gr.skip(), gr.skip(), gr.Timer(active=False), *self._buttons(False),
                    *skip_results)
        p = job.snapshot()
        preview = gr.skip()
        if (job, p.done) != s.previewed:  # a new iteration since the last tick: a new picture
            image = job.preview()
            if image is not None:
                preview, s.previewed = str(s.view("preview", _enlarge(image))), (job, p.done)
        if not p.finished:
            if job.aborting:
                status = _status("stopping", "after the current iteration…")
            else:
                status = _status("busy", p.message if p.state != "encoding" else
                                 f"encoding keyframe {p.keyframe + 1} of {p.keyframes}")
            return (progress_html(p), preview, status, gr.skip(), *self._buttons(True), *skip_results)
        kind = {"done": "done", "aborted": "stop", "failed": "error"}[p.state]
        message = p.message + (" — see the Results tab." if p.state == "done" else "")
        results = skip_results
        if p.state == "done" and s.shown_job is not job and job.outcome is not None:
            s.shown_job = job
            results = self._results(s, job.outcome)
        return (progress_html(p), preview, _status(kind, message), gr.Timer(active=False),
                *self._buttons(False, p.state == "aborted"), *results)

    # ------------------------------------------------------------- results

    _n_results = 10

    @staticmethod
    def _pair(session: Session, o: EncodeOutcome, i: int) -> tuple[str, str]:
        return (str(session.view("original", _enlarge(o.original[i].numpy()))),
                str(session.view("decoded", _enlarge(o.decoded[i].numpy()))))

    def _results(self, session: Session, o: EncodeOutcome):
        res, e = o.result, o.expected
        parity = ("the decoder reproduced the encoder's closed loop exactly" if o.matches_closed_loop else
                  "**the decoder's frames differ from the encoder's closed loop** (different backend or device?)")
        ssim_text = (f"mean SSIM {float(np.mean(o.ssim)):.4f}" if o.ssim is not None else
                     f"SSIM unavailable ({o.ssim_note})")
        summary = (
            f"### {o.file_bytes:,} bytes → **{o.kbps:.1f} kbit/s** (every byte of the file, {o.duration_s:.2f} s)\n\n"
            f"Expected before encoding: {e.kbps:.1f} kbit/s ({e.file_bytes:,} bytes with the codes stored raw); "
            f"keyframe records alone {o.factor_kbps:.1f} kbit/s.\n\n"
            f"{res.frame_count} frames, {len(res.keyframes)} keyframes · PSNR {decoded_psnr(o):.2f} dB (of the clip's "
            f"mean MSE), mean per-frame {float(np.mean(o.psnr)):.2f} dB · "
            f"{ssim_text} · decoded in {o.decode_seconds:.2f} s with {html.escape(o.decode_backend)}; {parity}."
            + ("\n\n*Tiny test model: these pictures and quality numbers say nothing about SD-Turbo.*"
               if self.model.tiny else ""))
        frames = np.arange(len(o.psnr))
        psnr_df = pd.DataFrame({"frame": frames, "PSNR (dB)": np.where(np.isfinite(o.psnr), o.psnr, np.nan)})
        ssim_df = (pd.DataFrame({"frame": frames, "SSIM": o.ssim}) if o.ssim is not None
                   else pd.DataFrame({"frame": [], "SSIM": []}))
        n = len(o.psnr)
        return (
            summary,
            str(session.publish(o.videos["side_by_side"])),
            gr.update(maximum=n - 1, value=0, interactive=True),
            self._pair(session, o, 0),
            psnr_df,
            ssim_df,
            gr.update(value=str(session.publish(o.path)), interactive=True),
            gr.update(value=str(session.publish(o.videos["decoded"])), interactive=True),
            f"```\n{o.report}\n```",
            self._keyframe_table(o),
        )

    def on_frame(self, request: gr.Request, index):
        session = self._session(request)
        job = session.shown_job
        if job is None or job.outcome is None:
            return gr.skip(), gr.skip()
        o = job.outcome
        i = int(min(max(index or 0, 0), len(o.psnr) - 1))
        ssim = f", SSIM {o.ssim[i]:.4f}" if o.ssim is not None else ""
        return self._pair(session, o, i), f"frame {i}: PSNR {_fmt(o.psnr[i], '.2f')} dB{ssim}"

    # --------------------------------------------------------- performance

    @staticmethod
    def _keyframe_table(o: EncodeOutcome) -> pd.DataFrame:
        rows = [(r.keyframe, f"{r.frames[0]}–{r.frames[1]}", r.iterations, round(r.seconds, 2),
                 round(1000 * r.seconds / r.iterations, 1), round(r.psnr, 2)) for r in o.result.keyframes]
        return pd.DataFrame(rows, columns=KEYFRAME_COLUMNS)

    def on_bench(self, backends, size, batch):
        """A generator: says at once what runs and for about how long, then gives the table."""
        chosen = [BASELINE, *(b for b in backends or [] if b != BASELINE)]
        yield (_status("busy", f"measuring {', '.join(chosen)} at {size}×{size}, batch {batch}: each backend is "
                                  "built, warmed up and timed in turn (about a minute on a CPU, longer with "
                                  "compilation); the table appears when all are done."), gr.skip())
        try:
            result = run_decode_benchmark(self.model, list(backends or []), size=int(size), batch=int(batch),
                                          machine=self.machine)
        except PromptusError as e:
            yield _status("error", str(e)), gr.skip()
            return
        rows = []
        for r in result["rows"]:
            ok = r["status"] == "ok"
            num = lambda x, d=1: round(x, d) if ok and math.isfinite(x) else None  # noqa: E731
            rows.append({"backend": r["backend"], "status": r["status"], "FPS": num(r["fps_gpu"]),
                         "FPS to host": num(r["fps_host"]), "segment ms": num(r["segment_ms"], 2),
                         "UNet ms": num(r["unet_ms"], 2), "TAESD ms": num(r["decoder_ms"], 2),
                         "vs eager": f"{r['speedup']:.2f}×" if ok and math.isfinite(r["speedup"]) else None})
        note = (f"{result['device']}, torch {result['torch']}, model {result['model']}, {size}×{size}, "
                f"batch {batch}, {result['frames_timed']} frames timed, {result['dtype']}. Eager is the baseline; "
                "'compile' is torch.compile, 'torch' CUDA-graph replay (plain fp32 on a CPU). FPS: frames made on "
                f"the device; FPS to host: frames copied back too; segment ms: one segment of {batch} frames.")
        yield note, pd.DataFrame(rows)

    def on_unload(self, request: gr.Request):
        self.sessions.close(getattr(request, "session_hash", None))

    # ---------------------------------------------------------------- page

    def _build(self) -> gr.Blocks:
        d, m = self.defaults, self.model
        accept = sorted(VIDEO_SUFFIXES) + [".zip"]
        sizes = sorted(set(SIZES) | {d.size})
        with gr.Blocks(title="Promptus Studio", analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as blocks:
            gr.Markdown("# Promptus Studio\nVideo compressed into prompts: encode a clip at a chosen bitrate, "
                        "watch it train, compare the regenerated video with the original.")
            gr.HTML(_banner(m))
            with gr.Tabs():
                with gr.Tab("Encode", id="encode"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            upload = gr.File(label=f"Clip: a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a zip of "
                                                   f"frames, up to {human_bytes(self.limits.max_bytes)}",
                                             file_types=accept, type="filepath", elem_id="studio-upload")
                            sample = gr.Button("Use the sample clip", elem_id="studio-sample", size="sm")
                            clip_md = gr.Markdown(elem_id="studio-clip")
                            mode = gr.Radio(list(MODES), value="Basic", label="Mode", elem_id="studio-mode")
                            with gr.Group(visible=True) as basic:
                                preset = gr.Radio([p.label for p in PRESETS], value=DEFAULT_PRESET.label,
                                                  label="Bitrate preset", elem_id="studio-preset")
                            with gr.Group(visible=False) as advanced:
                                with gr.Row():
                                    rank = gr.Slider(1, 64, value=d.rank, step=1, label="Rank r",
                                                     elem_id="studio-rank")
                                    interval = gr.Slider(1, 60, value=d.interval, step=1,
                                                         label="Keyframe interval T", elem_id="studio-interval")
                                with gr.Row():
                                    size = gr.Dropdown(sizes, value=d.size, label="Frame size (px)")
                                    max_frames = gr.Number(d.max_frames, precision=0, label="Max frames",
                                                           minimum=2)
                                with gr.Row():
                                    iters_first = gr.Number(d.iters_first, precision=0, minimum=1,
                                                            label="Iterations, keyframe 0")
                                    iters = gr.Number(d.iters, precision=0, minimum=1, label="Iterations, later keyframes")
                                with gr.Row():
                                    init_latent = gr.Radio(["vae", "taesd"] if m.has_vae else ["taesd"],
                                                           value=d.init_latent, label="Init latent from")
                                    init_precision = gr.Radio(["fp16", "int8", "fp32"], value=d.init_precision,
                                                              label="Init latent precision")
                                with gr.Row():
                                    perceptual = gr.Checkbox(d.perceptual, label="Perceptual (VGG-19) loss",
                                                             interactive=m.vgg is not None,
                                                             info=None if m.vgg is not None else
                                                             "off: the tiny model" if m.tiny else
                                                             "off: no VGG-19 weights here (--vgg PATH)")
                                    backend = gr.Dropdown(offered_backends(m.device.type), value=d.backend,
                                                          label="Decoder backend (closed loop and decode)")
                            rate_md = gr.Markdown(self._rate_text(d, None), elem_id="studio-rate")
                            with gr.Row():
                                encode_btn = gr.Button("Encode", variant="primary", elem_id="studio-encode")
                                abort_btn = gr.Button("Abort", variant="stop", interactive=False,
                                                      elem_id="studio-abort")
                                resume_btn = gr.Button("Resume", interactive=False, elem_id="studio-resume")
                        with gr.Column(scale=1):
                            status = gr.Markdown(_status("info", "Upload a clip or pick the sample."),
                                                 elem_id="studio-status")
                            progress = gr.HTML(progress_html(None), elem_id="studio-progress")
                            preview = gr.Image(label="Keyframe: original | current reconstruction", type="filepath",
                                               interactive=False, elem_id="studio-preview", height=280)
                with gr.Tab("Results", id="results"):
                    results_md = gr.Markdown("No encode has finished yet.", elem_id="studio-results")
                    video = gr.Video(label="Original | decoded", interactive=False, elem_id="studio-video",
                                     autoplay=False, loop=True)
                    with gr.Row():
                        frame = gr.Slider(0, 1, value=0, step=1, label="Frame", interactive=False,
                                          elem_id="studio-frame")
                        frame_md = gr.Markdown(elem_id="studio-frame-info")
                    compare = gr.ImageSlider(label="Original ↔ decoded (drag the handle)", type="filepath",
                                             interactive=False, elem_id="studio-compare")
                    with gr.Row():
                        psnr_plot = gr.LinePlot(x="frame", y="PSNR (dB)", title="PSNR per frame",
                                                elem_id="studio-psnr")
                        ssim_plot = gr.LinePlot(x="frame", y="SSIM", title="SSIM per frame", elem_id="studio-ssim")
                    with gr.Row():
                        dl_promptus = gr.DownloadButton("Download .promptus", interactive=False,
                                                        elem_id="studio-download-promptus")
                        dl_mp4 = gr.DownloadButton("Download decoded mp4", interactive=False,
                                                   elem_id="studio-download-mp4")
                    report = gr.Markdown(elem_id="studio-report")
                with gr.Tab("Performance", id="performance"):
                    gr.Markdown("Decode speed of each backend on this machine, measured by the library's decode "
                                "benchmark (random prompts, the studio's model); eager is the baseline. Running it "
                                "takes the machine for a while, like an encode.")
                    with gr.Row():
                        bench_backends = gr.CheckboxGroup([b for b in offered_backends(m.device.type)
                                                           if b != BASELINE],
                                                          value=quick_backends(m.device.type),
                                                          label=f"Backends besides {BASELINE}")
                        bench_size = gr.Dropdown(sizes, value=d.size, label="Frame size (px)")
                        bench_batch = gr.Number(d.interval, precision=0, minimum=1, label="Batch (frames per segment)")
                    bench_btn = gr.Button("Run the decode benchmark", elem_id="studio-bench")
                    bench_md = gr.Markdown(elem_id="studio-bench-info")
                    bench_table = gr.Dataframe(pd.DataFrame(columns=["backend", "status"]),
                                               elem_id="studio-bench-table", interactive=False)
                    gr.Markdown("### Last encode, per keyframe")
                    keyframe_table = gr.Dataframe(pd.DataFrame(columns=KEYFRAME_COLUMNS),
                                                  elem_id="studio-keyframe-table", interactive=False)
            timer = gr.Timer(self.poll_s, active=False)

            settings = [mode, preset, rank, interval, size, iters_first, iters, init_latent, init_precision,
                        perceptual, backend, max_frames]
            buttons = [encode_btn, abort_btn, resume_btn]
            results = [results_md, video, frame, compare, psnr_plot, ssim_plot, dl_promptus, dl_mp4, report,
                       keyframe_table]
            assert len(results) == self._n_results
            quiet = dict(show_progress="hidden")

            upload.upload(self.on_upload, [upload, *settings], [clip_md, status, rate_md])
            upload.clear(self.on_upload, [upload, *settings], [clip_md, status, rate_md])
            sample.click(self.on_sample, settings, [clip_md, status, rate_md])
            mode.change(self.on_mode, mode, [basic, advanced], **quiet)
            preset.change(self.on_preset, preset, [rank, interval], **quiet)
            for c in settings:
                c.change(self.on_settings, settings, rate_md, **quiet)
            encode_btn.click(self.on_encode, settings, [status, timer, *buttons])
            resume_btn.click(self.on_resume, settings, [status, timer, *buttons])
            abort_btn.click(self.on_abort, None, status, **quiet)
            timer.tick(self.on_tick, None, [progress, preview, status, timer, *buttons, *results], **quiet)
            frame.change(self.on_frame, frame, [compare, frame_md], **quiet)
            bench_btn.click(self.on_bench, [bench_backends, bench_size, bench_batch], [bench_md, bench_table])
            blocks.unload(self.on_unload)
        return blocks


#: Backends that only pay on a CUDA GPU: not offered on a CPU machine (torch.compile compiles for minutes there).
GPU_ONLY_BACKENDS = ("compile", "tensorrt")
#: The disabled Abort button stays readable; wide tables scroll inside their box instead of being cut off.
STUDIO_CSS = """
#studio-abort:disabled, #studio-abort[disabled] { background: #e5e7eb !important; color: #4b5563 !important;
  border-color: #d1d5db !important; opacity: 1 !important; }
#studio-bench-table, #studio-keyframe-table { max-width: 100%; overflow-x: auto; }
"""


def offline_theme():
    """Gradio's default theme with the system's fonts: its web fonts cannot load on an offline machine, and a
    page that mixes them with a fallback renders some letters in another typeface."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def offered_backends(device_type: str) -> list[str]:
    """The backends the page offers on this machine (the GPU-only ones only with CUDA)."""
    return [b for b in STUDIO_BACKENDS if device_type == "cuda" or b not in GPU_ONLY_BACKENDS]


def build_studio(model: str | StudioModel = "auto", *, checkpoints: str = "checkpoints", device: str = "auto",
                 taesd: str | None = None, vgg: str | None = None, defaults: StudioSettings | None = None,
                 limits: UploadLimits | None = None, workdir: str | Path | None = None,
                 poll_s: float = 0.5) -> gr.Blocks:
    """The studio page as a ``gradio.Blocks`` (its :class:`Studio` is ``.promptus_studio``).

    ``model`` is ``"auto"`` (SD-Turbo from ``checkpoints/`` when there, else the tiny
    model), anything :func:`promptus.load_models` accepts, or a loaded
    :class:`StudioModel`. Serve it with :func:`mount_studio` or ``blocks.promptus_studio.launch()``.
    """
    if not isinstance(model, StudioModel):
        model = load_studio_model(model, checkpoints=checkpoints, device=device, taesd=taesd, vgg=vgg)
    return Studio(model, defaults=defaults, limits=limits, workdir=workdir, poll_s=poll_s).blocks


def mount_studio(app, path: str = "/studio", blocks: gr.Blocks | None = None, **build_kwargs):
    """Serve the studio from the FastAPI ``app`` under ``path``; returns ``app``.

    ``blocks`` is a page from :func:`build_studio`; without it one is built with ``build_kwargs``.
    """
    blocks = blocks or build_studio(**build_kwargs)
    studio: Studio = blocks.promptus_studio
    gr.mount_gradio_app(app, blocks, path, **studio.mount_kwargs())
    state = getattr(app.state, "promptus", None)
    if state is not None:  # the streaming server: its shutdown (SIGTERM included) removes the visitors' files
        mounted = [r.app for r in app.routes if getattr(r, "path", None) == path.rstrip("/")
                   and hasattr(getattr(r, "app", None), "stop_event")]
        for page in mounted:  # an open page's heartbeat stream ends when the server begins to stop
            state.on_stopping.append(page.stop_event.set)
        state.on_shutdown.append(studio.close)
    return app
