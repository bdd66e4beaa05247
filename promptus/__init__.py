"""Promptus: video compressed into prompts for SD-Turbo.

The public API::

    import promptus
    bs = promptus.read("clip.promptus")        # a Bitstream: .header, .init, .keyframes
    bs.header.rank, bs.keyframes[1].U          # dequantized float32 factors
    promptus.write("copy.promptus", bs)        # atomic; entropy-codes the factors when it wins
    frames = promptus.decode("clip.promptus", model="tiny")   # uint8 N×H×W×3

    models = promptus.load_models("tiny")
    promptus.Encoder(promptus.CodecConfig(width=64, height=64), promptus.TrainConfig(perceptual=False),
                     models).encode("frames/", "clip.promptus")
"""

from .bitstream import (
    Bitstream, Header, InitLatent, Keyframe, StreamParser, from_bytes, iter_records, read,
    to_bytes, write,
)
from .config import CodecConfig, ModelIdentity, TrainConfig
from .decoder import ClipState, Decoder, Segment, decode
from .encoder import EncodeResult, Encoder
from .pipeline import PipelinedDecoder
from .errors import BitstreamError, EncodeAborted, ModelNotFoundError, PromptusError, VideoError
from .legacy import load_legacy, write_legacy
from .prompts import QuantizedTensor, embedding, estimate_rate, quantize_tensor

__version__ = "0.1.0"


def load_models(*args, **kwargs):
    """Load SD-Turbo + TAESD (see :func:`promptus.models.load_models`)."""
    from .models import load_models as _load

    return _load(*args, **kwargs)


__all__ = [
    "Bitstream", "BitstreamError", "ClipState", "CodecConfig", "Decoder", "EncodeAborted", "EncodeResult", "Encoder",
    "PipelinedDecoder", "TrainConfig", "Header", "InitLatent", "Keyframe", "ModelIdentity",
    "ModelNotFoundError", "PromptusError", "QuantizedTensor", "Segment", "StreamParser", "VideoError", "decode",
    "embedding", "estimate_rate", "from_bytes", "iter_records", "load_legacy", "load_models", "quantize_tensor",
    "read", "to_bytes", "write", "write_legacy", "__version__",
]
