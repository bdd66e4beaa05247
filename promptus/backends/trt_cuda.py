"""The CUDA calls the TensorRT code makes, in one object.

Engines need a current device, streams, device buffers, free-memory queries, PyTorch's
cached memory released, the driver's CUDA version and CUDA graphs. They all go through
:data:`CUDA` (a :class:`TorchCuda`, PyTorch underneath), so that tests on machines
without a GPU can put a recorder in its place and check the order of our calls.
Code reads ``trt_cuda.CUDA`` at call time for that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import sys

import torch

log = logging.getLogger(__name__)


class TorchCuda:
    """CUDA through PyTorch (and the driver's version through the driver library)."""

    def available(self) -> bool:
        return torch.cuda.is_available()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def device(self, device: torch.device):
        """Context manager: ``device`` is the current CUDA device inside."""
        return torch.cuda.device(device)

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def use_stream(self, stream):
        """Context manager: ``stream`` is the current stream inside."""
        return torch.cuda.stream(stream)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        """(free, total) bytes of ``device``, as the driver sees them."""
        return torch.cuda.mem_get_info(device)

    def release_cached_memory(self) -> None:
        """Give the memory PyTorch keeps cached (freed tensors) back to the driver, for TensorRT to use."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, stream):
        """Context manager: work enqueued on ``stream`` inside is captured into ``graph``."""
        return torch.cuda.graph(graph, stream=stream)

    def driver_version(self) -> tuple[int, int] | None:
        """The newest CUDA version the installed driver supports, e.g. (13, 0); None if it cannot be asked."""
        names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", ctypes.util.find_library("cuda")]
        for name in filter(None, names):
            with contextlib.suppress(OSError, AttributeError):
                lib = ctypes.CDLL(name)
                version = ctypes.c_int(0)
                if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                    return version.value // 1000, (version.value % 1000) // 10
        return None


#: The CUDA calls in use (tests substitute a recorder).
CUDA = TorchCuda()

__all__ = ["CUDA", "TorchCuda"]
