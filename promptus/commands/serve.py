"""``promptus serve``: stream the .promptus files of a folder, with a live browser viewer."""

from __future__ import annotations

import argparse
import logging

from ..backends import backend_names
from ..config import DEFAULT_ENGINE_DIR, ServerConfig
from ..errors import PromptusError
from .common import add_model_args, add_threads_arg, honour_ctrl_c, load_models, use_threads

log = logging.getLogger("promptus")


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "serve", help="stream .promptus files over the network, with a live viewer at /",
        description="Serve the .promptus files under ROOT: prompt streams over WebSocket paced at the clip's real "
                    "time (with seeking), plain downloads with range requests, and a browser viewer at / that "
                    "regenerates a clip on this machine's GPU (CPU with --model tiny) and shows it over WebRTC, or "
                    "WebSocket where WebRTC cannot connect. Only files under ROOT are served.")
    s.add_argument("root", help="the folder of .promptus files to serve")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    add_model_args(s)
    add_threads_arg(s)
    s.add_argument("--devices", default=None, metavar="LIST",
                   help="decode viewers on several devices: 'all' (every CUDA GPU) or a list such as cuda:0,cuda:1; "
                        "one decoder and scheduler per device, a new viewer goes to the least loaded device with "
                        "room (default: the one --device; see docs/serving.md)")
    s.add_argument("--backend", default="auto", choices=backend_names(auto=True), help="decoder backend for the viewer (default: auto)")
    s.add_argument("--engine-dir", default=DEFAULT_ENGINE_DIR, help=f"TensorRT engine cache (default: {DEFAULT_ENGINE_DIR}/)")
    s.add_argument("--no-viewer", action="store_true",
                   help="load no model: serve prompt streams and files only (receivers decode themselves)")
    s.add_argument("--fast", action="store_true",
                   help="send prompt streams as fast as possible instead of at the clip's real time")
    s.add_argument("--max-clients", type=int, default=ServerConfig.max_clients,
                   help=f"open streams and viewers at most (default: {ServerConfig.max_clients})")
    s.add_argument("--webrtc-loopback", action="store_true",
                   help="keep WebRTC media on 127.0.0.1 (the browser must offer loopback candidates: Chromium "
                        "--allow-loopback-in-peer-connection; other browsers fall back to WebSocket)")
    s.add_argument("--headroom", type=float, default=ServerConfig.headroom,
                   help="share of the measured decoding capacity that admission control promises "
                        f"(default: {ServerConfig.headroom})")
    s.add_argument("--studio", action="store_true",
                   help="also serve Promptus Studio (encode, compare; needs the studio extra) at /studio")
    s.set_defaults(func=run)


#: Requests the viewer repeats every second or so: not worth a line of the access log each.
POLLED_PATHS = ("/api/status", "/api/streams", "/favicon")


class QuietPolls(logging.Filter):
    """Drops the access-log lines of the viewer's periodic polls (``GET /api/status`` every second)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = str(args[2]) if len(args) > 2 else ""
        return not path.startswith(POLLED_PATHS)


def uvicorn_log_config() -> dict:
    """uvicorn's own logging set-up, with the viewer's polls left out of the access log."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["quiet_polls"] = {"()": QuietPolls}
    config["handlers"]["access"]["filters"] = ["quiet_polls"]
    return config


def model_for_folder(args, root) -> str:
    """The ``--model`` for serving ``root``: with ``--model auto``, the built-in model that every file's header
    names (as ``decode`` takes it from one file), saying so; else ``args.model``."""
    from ..bitstream import Header, iter_records
    from ..errors import BitstreamError
    from ..streaming.library import ClipLibrary
    from .common import BUILT_IN_MODELS

    if args.model != "auto":
        return args.model
    names = set()
    library = ClipLibrary(root)
    for name in library.names():
        try:
            with open(library.resolve(name), "rb") as f:
                header = next(iter_records(f))
        except (BitstreamError, OSError, StopIteration):
            continue  # the listing reports a damaged file; it says nothing about the model
        if isinstance(header, Header):
            names.add(header.model.name)
    if len(names) == 1 and (name := names.pop()) in BUILT_IN_MODELS:
        log.info("serve: the files under %s were made with the built-in %s model; using it (--model chooses other "
                 "weights)", root, name)
        return BUILT_IN_MODELS[name]
    return args.model


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 - only whether the serve extra is installed
    except ImportError:
        raise PromptusError("promptus serve needs the serve extra: pip install 'promptus[serve]'") from None
    from ..backends import resolve_device, resolve_devices
    from ..streaming import backend_decoders
    from ..streaming.devices import scheduler_pool
    from ..streaming.scheduler import StreamScheduler
    from ..streaming.server import create_app, run_server

    honour_ctrl_c()
    limits = ServerConfig(max_clients=args.max_clients, headroom=args.headroom, webrtc_loopback=args.webrtc_loopback)
    scheduler = None
    if args.no_viewer and args.devices:
        raise PromptusError("--devices says where viewers are decoded, and --no-viewer loads no model: drop one")
    if not args.no_viewer:
        devices = resolve_devices(args.devices) if args.devices else [resolve_device(args.device)]
        args.model = model_for_folder(args, args.root)
        models = load_models(args, devices[0])
        use_threads(args, models.name, devices[0])
        if len(devices) == 1:
            decoders = backend_decoders(models, args.backend, devices[0], engine_dir=args.engine_dir)
            scheduler = StreamScheduler(decoders, headroom=limits.headroom, max_streams=limits.max_clients,
                                        device=devices[0])
        else:
            scheduler = scheduler_pool(models, devices, backend=args.backend, engine_dir=args.engine_dir,
                                       headroom=limits.headroom, max_streams=limits.max_clients)
            log.info("decoding viewers on %d devices: %s", len(devices), ", ".join(map(str, devices)))
    app = create_app(args.root, scheduler=scheduler, realtime=not args.fast, limits=limits)
    if args.studio:
        try:
            from ..studio import mount_studio
            mount_studio(app, "/studio", model=args.model, checkpoints=args.checkpoints, device=args.device,
                         taesd=args.taesd)
        except ImportError as e:
            raise PromptusError(f"--studio needs Gradio ({e}): pip install 'promptus[studio]'") from e
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: every machine that can reach it can read the files under %s", args.host,
                    args.root)
    print(f"serving {app.state.promptus.library.root} at http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    if args.studio:
        print(f"studio at http://{args.host}:{args.port}/studio/", flush=True)
    # Client messages are small control messages: the WebSocket layer refuses anything larger.
    run_server(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
               log_config=uvicorn_log_config())
    return 0
