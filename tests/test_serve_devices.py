"""One server, several decoding devices: two CPU "devices" with the tiny model at 64 px.

Placement and admission on a :class:`SchedulerPool` with capacities set by hand, then a
real server on loopback: two viewers land on different devices, both receive every frame
as the offline decode makes it, ``/api/status`` shows both devices, and a viewer is
refused (``/api/ready`` says 503) only when both devices are full.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
websockets = pytest.importorskip("websockets", reason="the serve extra (websockets) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from promptus.backends import resolve_devices  # noqa: E402
from promptus.bitstream import to_bytes  # noqa: E402
from promptus.config import ServerConfig  # noqa: E402
from promptus.errors import PromptusError  # noqa: E402
from promptus.streaming import AdmissionError, SchedulerPool, StreamScheduler, backend_decoders, create_app  # noqa: E402
from promptus.streaming.devices import capacity_status, replicate_models, scheduler_pool  # noqa: E402
from promptus.streaming.routes.view import FRAME_HEADER  # noqa: E402
from promptus.streaming.viewer import encode_jpeg  # noqa: E402
from test_streaming import ServerThread, make_clip  # noqa: E402

CPU2 = [torch.device("cpu"), torch.device("cpu")]


def test_devices_option_reads_all_lists_and_repeats_and_says_what_is_wrong():
    assert resolve_devices("cpu,cpu") == CPU2
    assert resolve_devices(" cpu ") == [torch.device("cpu")]
    assert len(resolve_devices(None)) == 1  # no --devices: the one device of today
    for bad, words in (("gpu:0", "no device"), ("cpu,,cpu", "empty name"), ("meta", "only cpu and cuda")):
        with pytest.raises(PromptusError, match=words):
            resolve_devices(bad)
    if not torch.cuda.is_available():
        with pytest.raises(PromptusError, match="no CUDA GPU"):
            resolve_devices("all")
        with pytest.raises(PromptusError, match="CUDA"):
            resolve_devices("cuda:0")
    else:
        assert resolve_devices("all") == [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


@pytest.fixture(scope="module")
def pool_of_two(tiny):
    return scheduler_pool(tiny, CPU2, backend="torch", headroom=0.9)


def test_a_new_stream_goes_to_the_least_loaded_device_and_is_refused_only_when_none_has_room(tiny, pool_of_two):
    pool = pool_of_two
    bs = make_clip(tiny, fps=30.0)
    pool.schedulers[0].capacity, pool.schedulers[1].capacity = 200.0, 100.0  # 180 and 90 usable frames/s
    handles = []
    try:
        # The lowest share of usable capacity promised first, then fewer streams: 0 (0/180 = 0/90, list order),
        # 1 (30/180 > 0/90), 0 (30/180 < 30/90), 1 (60/180 = 30/90, fewer streams), 0, 0, 1 (120/180 = 60/90), 0, 0
        for _ in range(9):
            handles.append(pool.open(bs.header, bs.init))
        placed = [0, 1, 0, 1, 0, 0, 1, 0, 0]
        assert [h.admission.device for h in handles] == placed
        assert [h.scheduler for h in handles] == [pool.schedulers[d] for d in placed]
        assert pool.schedulers[0].load == 180.0 and pool.schedulers[1].load == 90.0  # both full
        assert all(h.admission.realtime for h in handles)
        adm = pool.admit(30.0)
        assert not adm.admitted and adm.device is None and adm.streams == 9 and adm.capacity == 300.0
        with pytest.raises(AdmissionError, match="every (GPU|device) is busy") as e:
            pool.open(bs.header, bs.init)
        assert e.value.admission.load == 270.0 and e.value.admission.offer == pytest.approx(0.0, abs=1e-9)
        with pytest.raises(AdmissionError):  # nothing left on either device, not even at a lower rate
            pool.open(bs.header, bs.init, accept_lower=True)
        handles.pop(1).close()  # device 1 has 30 frames/s free again
        assert pool.admit(30.0).device == 1
        lower = pool.open(bs.header, bs.init, rate=60.0, accept_lower=True)  # 30 of the 60 asked for, on 1
        handles.append(lower)
        assert lower.admission.device == 1 and lower.rate == pytest.approx(30.0) and not lower.admission.realtime

        st = capacity_status(pool)
        assert [d["streams"] for d in st["devices"]] == [6, 3] and st["streams"] == 9
        assert st["capacity"] == 300.0 and st["usable"] == pytest.approx(270.0) and st["load"] == 270.0
        assert st["free"] == pytest.approx(0.0) and st["max_stream_fps"] == pytest.approx(0.0)
        assert [d["device"] for d in st["devices"]] == ["cpu", "cpu"] and st["utilisation"] == pytest.approx(1.0)
    finally:
        for h in handles:
            h.close()
        for s in pool.schedulers:
            s.capacity = math.nan


def test_a_new_clip_shape_builds_its_decoder_without_holding_up_other_viewers(tiny):
    base = backend_decoders(tiny, "torch", "cpu")
    gate, building = threading.Event(), threading.Event()

    def slow_for_32px(header):  # as a TensorRT build for a new shape: minutes
        if header.width == 32 and not gate.is_set():
            building.set()
            gate.wait(30)
        return base(header)

    pool = SchedulerPool([StreamScheduler(slow_for_32px, device="cpu") for _ in range(2)])
    warm, new = make_clip(tiny, fps=5.0), make_clip(tiny, size=32, fps=5.0)
    pool.calibrate(warm.header, warm.init, warm.keyframes, rounds=2)  # builds the 64 px decoder on both
    opened = []
    t = threading.Thread(target=lambda: opened.append(pool.open(new.header, new.init)))
    t.start()
    try:
        assert building.wait(30)
        h = pool.open(warm.header, warm.init)  # placed while the 32 px decoder is still being built
        assert not gate.is_set() and h.admission.device == 0 and not opened
    finally:
        gate.set()
        t.join(30)
    assert len(opened) == 1 and opened[0].admission.device == 1  # device 0 took a stream meanwhile
    for x in (h, *opened):
        x.close()


def test_one_device_keeps_the_status_of_today_and_counts_as_one_device(tiny, tmp_path):
    (tmp_path / "clip.promptus").write_bytes(to_bytes(make_clip(tiny)))
    app = create_app(tmp_path, decoder_for=backend_decoders(tiny, "torch", "cpu"))
    st = app.state.promptus.status()
    assert isinstance(app.state.promptus.scheduler, StreamScheduler)  # no pool: the server of today
    assert st["viewer"] and st["streams"] == 0 and st["capacity"] is None and st["headroom"] == 0.9
    assert len(st["devices"]) == 1 and st["devices"][0]["index"] == 0
    bare = create_app(tmp_path).state.promptus.status()
    assert not bare["viewer"] and bare["devices"] == [] and bare["capacity"] is None


def test_models_are_replicated_once_per_distinct_device(tiny):
    one, two = replicate_models(tiny, CPU2)
    assert one is tiny and two is tiny  # repeats of the models' own device share it
    with pytest.raises(PromptusError, match="at least one device"):
        SchedulerPool([])


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    bs = make_clip(tiny, frame_count=25, interval=4, fps=8.0)  # a busy CPU core makes ~20-50 tiny frames/s
    (root / "clip.promptus").write_bytes(to_bytes(bs))
    offline = backend_decoders(tiny, "torch", "cpu")(bs.header).decode_all(bs)
    pool = scheduler_pool(tiny, CPU2, backend="torch")
    limits = ServerConfig(recalibrate_idle_s=3600.0)  # the tests set capacities by hand: no remeasuring
    with ServerThread(create_app(root, scheduler=pool, limits=limits)) as server:  # calibrates both devices
        yield server, pool, bs, offline


async def _view(server, name: str, started: asyncio.Event | None = None):
    """One browser viewer over WebSocket: its messages (JSON decoded, frames as bytes) and close code."""
    msgs = []
    async with websockets.connect(server.ws(f"/ws/view/{name}")) as c:
        try:
            while True:
                m = await asyncio.wait_for(c.recv(), 30)
                msgs.append(json.loads(m) if isinstance(m, str) else m)
                if started is not None and isinstance(m, bytes):
                    started.set()
                if isinstance(msgs[-1], dict) and msgs[-1].get("type") == "end":
                    break
        except websockets.ConnectionClosed:
            pass
    return msgs, c.close_code


@pytest.mark.slow  # 3 s on 2 cores: full tier
def test_two_viewers_land_on_different_devices_and_get_every_frame_of_the_offline_decode(served):
    server, pool, bs, offline = served
    st = httpx.get(server.http("/api/status"), timeout=10).json()
    assert len(st["devices"]) == 2 and all(d["capacity"] > 0 for d in st["devices"])  # both calibrated
    assert st["capacity"] == pytest.approx(sum(d["capacity"] for d in st["devices"]))

    async def both():
        a_started, b_started = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(_view(server, "clip.promptus", a_started))
        b = asyncio.create_task(_view(server, "clip.promptus", b_started))
        await asyncio.wait_for(asyncio.gather(a_started.wait(), b_started.wait()), 30)
        during = await asyncio.to_thread(lambda: httpx.get(server.http("/api/status"), timeout=10).json())
        return await a, await b, during

    (ma, ca), (mb, cb), during = asyncio.run(both())
    assert ca == cb == 1000
    devices = {ma[0]["admission"]["device"], mb[0]["admission"]["device"]}
    assert ma[0]["type"] == mb[0]["type"] == "hello" and devices == {0, 1}
    assert during["streams"] == 2 and [d["streams"] for d in during["devices"]] == [1, 1]
    assert during["load"] == pytest.approx(16.0) and during["clients"] == 2
    for msgs in (ma, mb):
        frames = [m for m in msgs if isinstance(m, bytes)]
        assert [FRAME_HEADER.unpack(f[:8])[0] for f in frames] == list(range(bs.header.frame_count))
        quality = ServerConfig().jpeg_quality
        for i, f in enumerate(frames):  # the server's JPEG of each frame is the JPEG of the offline frame
            assert f[8:] == encode_jpeg(offline[i].numpy(), quality), f"frame {i} differs from the offline decode"
    deadline = time.monotonic() + 10  # the server closes a session once its socket is gone
    while (after := httpx.get(server.http("/api/status"), timeout=10).json())["streams"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["streams"] == 0 and all(d["frames"] >= bs.header.frame_count for d in after["devices"])


def test_a_viewer_is_refused_only_when_every_device_is_full(served):
    server, pool, bs, _ = served
    saved = [s.capacity for s in pool.schedulers]
    held = []
    try:
        for s in pool.schedulers:
            s.capacity = 10.0  # as if measured: 9 usable frames/s each, room for one viewer of the 8-fps clip
        held.append(pool.open(bs.header, bs.init))  # device 0 full; device 1 still has room
        assert httpx.get(server.http("/api/ready?fps=8"), timeout=10).status_code == 200
        held.append(pool.open(bs.header, bs.init))
        assert [h.admission.device for h in held] == [0, 1]
        r = httpx.get(server.http("/api/ready?fps=8"), timeout=10)
        assert r.status_code == 503 and not r.json()["ready"] and "is busy" in r.json()["reason"]
        assert httpx.get(server.http("/api/ready?fps=0.5"), timeout=10).status_code == 200  # 1 free on each
        assert httpx.get(server.http("/api/ready?fps=-1"), timeout=10).status_code == 422

        msgs, code = asyncio.run(_view(server, "clip.promptus"))
        assert code == 1013 and msgs[0]["type"] == "admission" and not msgs[0]["admitted"]
        assert msgs[0]["capacity"] == 20.0 and msgs[0]["streams"] == 2 and msgs[0]["offer"] == pytest.approx(1.0)
        assert "is busy" in msgs[1]["message"]
        st = httpx.get(server.http("/api/status"), timeout=10).json()
        assert st["max_stream_fps"] == pytest.approx(1.0) and st["free"] == pytest.approx(2.0)
        assert [d["streams"] for d in st["devices"]] == [1, 1]

        held.pop(0).close()  # device 0 has room again
        assert httpx.get(server.http("/api/ready?fps=8"), timeout=10).status_code == 200
    finally:
        for h in held:
            h.close()
        for s, cap in zip(pool.schedulers, saved):
            s.capacity = cap


@pytest.mark.slow  # paces streams for 2.5 s after calibrating two devices
def test_bench_stream_devices_admits_and_serves_real_time_streams_on_two_cpu_devices(tiny):
    from promptus.streaming.bench import admission_limit, bench_stream_devices, format_devices_table

    r = bench_stream_devices(["cpu", "cpu"], tiny, backend="torch", size=64, interval=4, fps=5.0, seconds=2.5,
                             max_streams=4)
    assert r["devices"] == ["cpu", "cpu"] and len(r["per_device"]) == 2
    assert r["capacity_fps"] == pytest.approx(sum(d["capacity_fps"] for d in r["per_device"]))
    expected = min(4, sum(admission_limit(d["capacity_fps"], 5.0, 0.9) for d in r["per_device"]))
    assert r["admitted_realtime"] == expected == sum(d["admitted"] for d in r["per_device"])
    assert r["limited"] == (expected == 4)
    if expected >= 2:  # least loaded first: both devices take streams
        assert all(d["admitted"] >= 1 for d in r["per_device"])
    assert 0 <= r["served_realtime"] <= r["admitted_realtime"] and 0 <= r["late_segments"] <= 1
    assert 0 < r["latency_ms_median"] <= r["latency_ms_p95"] and r["aggregate_fps"] > 0
    assert r["window_s"] == pytest.approx(1.5, abs=0.1)
    row = format_devices_table([r]).splitlines()[3].split()
    assert row[:3] == ["2", f"{r['capacity_fps']:.0f}", f"{r['admitted_realtime']}{'+' if r['limited'] else ''}"]


def test_serve_command_builds_one_scheduler_per_listed_device_and_one_without_the_option(tmp_path, monkeypatch,
                                                                                           capsys):
    import promptus.streaming.server as server
    from promptus.commands.main import main

    apps = []
    monkeypatch.setattr(server, "run_server", lambda app, **kw: apps.append(app))  # builds, does not serve
    assert main(["-q", "serve", str(tmp_path), "--model", "tiny", "--device", "cpu", "--backend", "torch"]) == 0
    assert main(["-q", "serve", str(tmp_path), "--model", "tiny", "--devices", "cpu,cpu", "--backend", "torch",
                 "--headroom", "0.5"]) == 0
    one, two = (app.state.promptus.scheduler for app in apps)
    assert isinstance(one, StreamScheduler)  # no --devices: the server of today
    assert isinstance(two, SchedulerPool) and [s.device for s in two.schedulers] == CPU2
    assert all(s.headroom == 0.5 and s.max_streams == 64 for s in two.schedulers)

    assert main(["serve", str(tmp_path), "--no-viewer", "--devices", "cpu,cpu"]) == 1
    assert "--no-viewer loads no model" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--model", "tiny", "--devices", "gpu:0"]) == 1
    assert "'gpu:0' is no device" in capsys.readouterr().err
