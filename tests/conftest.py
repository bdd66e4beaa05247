"""Shared fixtures: tiny random-weight models and legacy prompt folders built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """The weights memo (promptus/weights_memo.py) of every test, and of the commands they start, in a
    temporary folder: tests never write the user's ~/.cache/promptus."""
    import os

    folder = tmp_path_factory.mktemp("promptus-cache")
    saved = os.environ.get("PROMPTUS_CACHE_DIR")
    os.environ["PROMPTUS_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("PROMPTUS_CACHE_DIR", None)
    else:
        os.environ["PROMPTUS_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def tiny():
    from promptus.models import tiny_models

    return tiny_models()


def make_legacy_folder(folder, *, keyframes=3, interval=4, rank=2, latent=8, seed=0, tokens=77, dim=1024):
    """A folder in the public release's layout, written with torch.save like the release does.

    Returns the dict of originals {index: {...}} and the init latent.
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    originals = {}
    for k in range(keyframes):
        d = {}
        for name, shape in (("U", (tokens, rank)), ("V", (rank, dim))):
            x = torch.randn(shape, generator=g) * (k + 1)
            lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
            scale = torch.tensor((hi - lo) / 255, dtype=torch.float32)
            zp = torch.round(torch.clamp(255 - hi / scale, 0, 255))
            d[name] = torch.clamp(torch.round(x / scale + zp), 0, 255).to(torch.uint8)
            d[f"{name}_scale"] = scale
            d[f"{name}_zero_point"] = zp
        torch.save(d, folder / f"frame_{k * interval:05d}.prompt")
        originals[k * interval] = d
    init = torch.randn(1, 4, latent, latent, generator=g)
    torch.save(init, folder / "init.pth")
    return originals, init


def release_dequantize(d, name):
    """The release's own arithmetic: scale · (q − zero_point) on tensors."""
    return d[f"{name}_scale"] * (d[name] - d[f"{name}_zero_point"])


@pytest.fixture
def legacy_folder(tmp_path):
    folder = tmp_path / "rank2_interval4"
    originals, init = make_legacy_folder(folder)
    return folder, originals, init


def np_equal(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


# ---- test tiers -------------------------------------------------------------------------------
# A plain `python3 -m pytest -q` runs the fast tier (a few minutes on 2 cores); PROMPTUS_TESTS=full
# (what CI sets) or `--tier full` runs everything. Deselected tests are counted in the summary,
# never reported as passed.
import os  # noqa: E402
import shutil  # noqa: E402

FULL_ONLY = ("slow", "browser")


def pytest_addoption(parser):
    parser.addoption("--tier", choices=("fast", "full"), default=None,
                     help="fast: leave out tests marked slow or browser (default); full: everything "
                          "(also PROMPTUS_TESTS=full, as CI runs it)")


def _tier(config):
    return config.getoption("--tier") or os.environ.get("PROMPTUS_TESTS", "fast")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU here (marked gpu)"))
        if "ffmpeg" in item.keywords and shutil.which("ffmpeg") is None:
            item.add_marker(pytest.mark.skip(reason="ffmpeg is not installed here (apt-get install ffmpeg; CI does)"))
    if _tier(config) == "full" or config.getoption("-m"):
        return  # an explicit -m expression chooses for itself
    kept, left = [], []
    for item in items:
        (left if any(m in item.keywords for m in FULL_ONLY) else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept
        config._promptus_left_out = len(left)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_promptus_left_out", 0)
    if n:
        terminalreporter.write_line(
            f"fast tier: {n} tests marked slow or browser were not run "
            "(PROMPTUS_TESTS=full python3 -m pytest -q runs them, as CI does)")


def pytest_runtest_logreport(report):
    # PROMPTUS_TEST_TIMES=FILE appends "seconds nodeid" per test as it finishes (for choosing the tiers).
    path = os.environ.get("PROMPTUS_TEST_TIMES")
    if path and report.when == "call":
        with open(path, "a") as f:
            f.write(f"{report.duration:.2f} {report.nodeid}\n")


# ---- torch's thread count put back after a test that changes it

@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
