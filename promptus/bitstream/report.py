"""What ``promptus info`` prints about a file: its layout, the bytes of each part, the
entropy-coding gain, and the two bitrates (all bytes, factor codes only)."""

from __future__ import annotations

from dataclasses import dataclass

from ..prompts import kbps
from .entropy import CODERS
from .parser import RecordInfo, StreamParser, as_bytes
from .spec import KEYF_FIXED, plural


def layout(data: bytes) -> list[RecordInfo]:
    """Every part of a valid file in order, from the signature to the end record; sizes sum to ``len(data)``."""
    parser = StreamParser()
    parser.feed(as_bytes(data))
    parser.close()
    return list(parser.records)


def _printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (\\x1b, \\u202e...):
    a header's strings must not reach a terminal as escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class FileRate:
    """The bitrates of a .promptus file over its clip's duration (frame count / fps).

    ``total_kbps`` counts every byte of the file; ``factors_kbps`` the keyframe
    factor codes as stored (after entropy coding), without their scales and zero
    points, the header, the init latent or the framing. ``promptus info``,
    ``promptus encode`` and the sweep print these two numbers and no others.
    """

    total_bytes: int
    factor_bytes: int
    duration_s: float

    @property
    def total_kbps(self) -> float:
        return kbps(self.total_bytes, self.duration_s)

    @property
    def factors_kbps(self) -> float:
        return kbps(self.factor_bytes, self.duration_s)

    def describe(self) -> str:
        """One line: both rates, labelled as ``info`` and ``encode`` print them."""
        return (f"{self.total_kbps:.2f} kbit/s (all bytes), {self.factors_kbps:.2f} kbit/s (factor codes only) "
                f"over {self.duration_s:.3f} s")


def _factor_code_bytes(records: list[RecordInfo]) -> int:
    return sum(r.payload - KEYF_FIXED.size for r in records if r.raw_codes is not None)


def file_rate(data: bytes) -> FileRate:
    """:class:`FileRate` of a complete, valid file's bytes (BitstreamError otherwise)."""
    data = as_bytes(data)
    parser = StreamParser()
    parser.feed(data)
    bs = parser.close()
    return FileRate(len(data), _factor_code_bytes(parser.records), bs.header.duration_s)


def describe(data: bytes) -> str:
    """The report of ``promptus info``: header fields, bytes per part, entropy gain and kbit/s.

    Bitrates are over the clip duration ``frame_count / fps`` with 1 kbit = 1000 bit:
    "total" counts every byte of the file, "factors only" the keyframe code bytes
    as stored (after entropy coding, without scales and zero points).
    """
    data = as_bytes(data)
    parser = StreamParser()
    parser.feed(data)
    bs = parser.close()
    records = parser.records
    h, cfg = bs.header, bs.header.config
    by_name = {r.name: r for r in records}
    keyf = [r for r in records if r.raw_codes is not None]
    init_rec = next(r for r in records if r.name.startswith("init latent"))
    framed = [r for r in records if r.name != "magic+version"]
    framing = sum(r.size - r.payload for r in framed)
    stored_codes = _factor_code_bytes(records)
    rate = FileRate(len(data), stored_codes, h.duration_s)
    raw_codes = sum(r.raw_codes for r in keyf)
    codec_counts = {c: sum(r.codec == c for r in keyf) for c in CODERS.names}
    duration = h.duration_s

    lines = [
        f"promptus bitstream, format version {parser.version}, {len(data)} bytes",
        f"  frame size   {cfg.width}×{cfg.height}",
        f"  fps          {cfg.fps:g}",
        f"  frames       {h.frame_count} ({duration:.3f} s)",
        f"  rank         {cfg.rank}",
        f"  interval     {cfg.interval} ({plural(h.keyframe_count, 'keyframe')})",
        f"  noise        seed {cfg.seed}, {cfg.noise_generator}",
        f"  mix          {cfg.mix:g}",
        f"  quantizer    {cfg.quant_bits} bits",
        f"  embedding    {cfg.tokens} tokens × {cfg.embed_dim}, timestep {cfg.timestep}",
        f"  latent       {cfg.latent_channels}×{cfg.height // cfg.latent_factor}×{cfg.width // cfg.latent_factor}, "
        f"init latent {bs.init.precision}",
        f"  model        {_printable(h.model.name)} (digest {h.model.hexdigest})",
        "",
        f"  {'part':<28}{'bytes':>10}{'share':>9}",
    ]
    parts = [
        ("magic/version", by_name["magic+version"].size),
        ("header", by_name["header"].payload),
        (f"init latent ({bs.init.precision})", init_rec.payload),
        (f"keyframes ({len(keyf)})", sum(r.payload for r in keyf)),
        (f"framing ({len(framed)} records)", framing),
    ]
    if by_name["end"].payload:
        parts.append(("file digest (SHA-256)", by_name["end"].payload))
    assert sum(n for _, n in parts) == len(data), "layout does not cover the file"
    for label, n in parts + [("total", len(data))]:
        lines.append(f"  {label:<28}{n:>10}{100 * n / len(data):>8.1f}%")
    used = ", ".join(f"{c} ×{n}" for c, n in codec_counts.items() if n)
    gain = 100 * (raw_codes - stored_codes) / raw_codes if raw_codes else 0.0
    lines += [
        "",
        f"  entropy coding: {raw_codes} raw code bytes → {stored_codes} stored ({gain:.2f}% saved; {used})",
        f"  bitrate: {rate.describe()} (1 kbit = 1000 bit)",
        "",
        f"  {'offset':>10}{'size':>9}  record",
    ]
    shown = records if len(records) <= 16 else records[:8] + [None] + records[-4:]
    for r in shown:
        if r is None:
            lines.append(f"  {'...':>10}{'':>9}  ({len(records) - 12} more records)")
        else:
            extra = f" [{r.codec}, {r.raw_codes} raw code bytes]" if r.codec else ""
            lines.append(f"  {r.offset:>10}{r.size:>9}  {r.name}{extra}")
    return "\n".join(lines)
