"""``promptus play``: receive a prompt stream, regenerate it in real time, print live numbers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from ..backends import backend_names
from ..config import DEFAULT_ENGINE_DIR
from ..errors import PromptusError
from .common import add_model_args, add_threads_arg, load_models, use_threads

log = logging.getLogger("promptus")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "play", help="receive a prompt stream and regenerate it live",
        description="Connect to a prompt stream (ws://HOST:PORT/ws/prompts/CLIP from `promptus serve`), decode "
                    "each segment as soon as the keyframe closing it arrives, and print the frame rate, kbit/s and "
                    "latency as it goes. Damaged or lost records are reported and concealed (the last good prompt "
                    "is held; decoding resynchronises at the next good record).")
    p.add_argument("url", help="the stream's URL, e.g. ws://127.0.0.1:8000/ws/prompts/clip.promptus "
                               "(an http:// URL of the server plus a clip name works too)")
    p.add_argument("--out", default=None, help="write the frames to this .mp4/.mkv file or PNG folder")
    p.add_argument("--start", type=int, default=0, help="start at this keyframe (exact: earlier ones are "
                                                        "regenerated unseen)")
    p.add_argument("--fast", action="store_true", help="ask the server for the stream as fast as possible")
    add_model_args(p)
    add_threads_arg(p)
    p.add_argument("--backend", default="auto", choices=backend_names(auto=True), help="decoder backend (default: auto)")
    p.add_argument("--engine-dir", default=DEFAULT_ENGINE_DIR, help=f"TensorRT engine cache (default: {DEFAULT_ENGINE_DIR}/)")
    p.set_defaults(func=run)


def stream_url(url: str, start: int, fast: bool) -> str:
    """``url`` as a ws:// prompt-stream URL with the start and pace in its query."""
    if url.startswith(("http://", "https://")):
        base, _, rest = url.partition("://")
        host, _, path = rest.partition("/")
        if not path.startswith("ws/prompts/"):
            path = "ws/prompts/" + path.removeprefix("files/")
        url = f"{'wss' if base == 'https' else 'ws'}://{host}/{path}"
    if not url.startswith(("ws://", "wss://")):
        raise PromptusError(f"{url!r} is not a stream URL; give ws://HOST:PORT/ws/prompts/CLIP")
    if not url.split("?")[0].partition("/ws/prompts/")[2].strip("/"):
        raise PromptusError(f"{url!r} names no clip: add the clip's name, e.g. {url.rstrip('/')}"
                            f"{'' if '/ws/prompts' in url else '/ws/prompts'}/demo.promptus (the server's page at "
                            "http://HOST:PORT/ lists its clips)")
    query = [f"start={start}"] if start else []
    if fast:
        query.append("pace=fast")
    return url + ("&" if "?" in url else "?") + "&".join(query) if query else url


def check_server(url: str, timeout: float = 5.0) -> None:
    """Raise a :class:`PromptusError` when nothing listens at the host and port of ``url``."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        raise PromptusError(f"no server at {parts.hostname}:{port} ({e.strerror or e}); start one with "
                            "'promptus serve FOLDER' or check the URL") from None


def run(args: argparse.Namespace) -> int:
    from ..backends import resolve_device
    from ..streaming import Receiver, backend_decoders
    from ..video import FrameWriter

    url = stream_url(args.url, args.start, args.fast)
    check_server(url)  # "no server" in a second, not after the model has loaded
    device = resolve_device(args.device)
    models = load_models(args, device)
    use_threads(args, models.name, device)
    rx = Receiver(url, decoder_for=backend_decoders(models, args.backend, device, engine_dir=args.engine_dir))
    writer = None
    reported = 0
    shown = [None, 0]  # the first frame shown and the frames after the last one

    async def go():
        nonlocal writer, reported
        last = 0.0
        async for seg in rx:
            if seg.catchup:
                continue
            if shown[0] is None:
                shown[0] = seg.start
            shown[1] = seg.stop
            if args.out:
                if writer is None:  # PNGs keep the clip's frame numbers when playing from a seek point
                    writer = FrameWriter(args.out, rx.header.fps, first=seg.start)
                await asyncio.to_thread(writer.write_batch, seg.frames)  # the network keeps being read
            for d in rx.stats.damage[reported:]:
                print(f"\nconcealed: {d}", file=sys.stderr)
            reported = len(rx.stats.damage)
            now = time.perf_counter()
            if now - last >= 1.0 and not args.quiet:
                last = now
                s = rx.stats
                print(f"\rframe {seg.stop:6d}/{rx.header.frame_count}  {s.live_fps():6.1f} fps  "
                      f"{s.live_kbps():7.1f} kbit/s  latency {1000 * seg.latency:6.1f} ms  "
                      f"concealed {len(s.damage)}", end="", file=sys.stderr, flush=True)

    try:
        asyncio.run(go())
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        for d in rx.stats.damage[reported:]:
            print(f"\nconcealed: {d}", file=sys.stderr)
    span = f"frames {shown[0]}–{shown[1] - 1} of {rx.header.frame_count}: " if shown[0] is not None else ""
    print(f"\n{span}{rx.stats.summary()}" + (f"; wrote {args.out}" if args.out else ""))
    return 0
