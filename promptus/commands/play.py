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
from .common import add_model_args, load_models

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
    query = [f"start={start}"] if start else []
    if fast:
        query.append("pace=fast")
    return url + ("&" if "?" in url else "?") + "&".join(query) if query else url


def run(args: argparse.Namespace) -> int:
    from ..backends import resolve_device
    from ..streaming import Receiver, backend_decoders
    from ..video import FrameWriter

    device = resolve_device(args.device)
    models = load_models(args, device)
    url = stream_url(args.url, args.start, args.fast)
    rx = Receiver(url, decoder_for=backend_decoders(models, args.backend, device, engine_dir=args.engine_dir))
    writer = None
    reported = 0

    async def go():
        nonlocal writer, reported
        last = 0.0
        async for seg in rx:
            if seg.catchup:
                continue
            if args.out:
                if writer is None:
                    writer = FrameWriter(args.out, rx.header.fps)
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
    print(f"\n{rx.stats.summary()}" + (f"; wrote {args.out}" if args.out else ""))
    return 0
