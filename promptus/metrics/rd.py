"""Rate–distortion: Bjøntegaard deltas (VCEG-M33) between two rate–quality curves.

``bd_rate``/``bd_quality``: log-rate as a cubic polynomial of quality (or quality
of log-rate), integrated over the quality (log-rate) range where both curves overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import PromptusError


def _finite_curve(rates: Sequence[float], quality: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rates, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if r.shape != q.shape:
        raise PromptusError(f"a rate–distortion curve needs as many rates ({r.size}) as quality values ({q.size})")
    keep = np.isfinite(r) & np.isfinite(q) & (r > 0)
    return r[keep], q[keep]


def _fit_degree(*xs: np.ndarray) -> int:
    # The classic method fits a cubic (4+ points); shorter curves get the highest degree they determine.
    return min([3] + [len(np.unique(x)) - 1 for x in xs])


def bd_rate(anchor_rates: Sequence[float], anchor_quality: Sequence[float],
            test_rates: Sequence[float], test_quality: Sequence[float]) -> float | None:
    """Bjøntegaard delta rate in percent: the test codec's average bitrate change at equal quality.

    Negative means the test codec needs fewer bits than the anchor. log10(rate) is
    fitted as a cubic polynomial of quality per curve (a lower degree for curves
    of fewer than 4 distinct points) and the fits are integrated over the quality
    range both curves cover. Returns None when that range is empty or a curve has
    fewer than 2 usable points (non-finite values are dropped).
    """
    r1, q1 = _finite_curve(anchor_rates, anchor_quality)
    r2, q2 = _finite_curve(test_rates, test_quality)
    deg = _fit_degree(q1, q2)
    if deg < 1:
        return None
    lo, hi = max(q1.min(), q2.min()), min(q1.max(), q2.max())
    if not hi > lo:
        return None
    p1 = np.polyint(np.polyfit(q1, np.log10(r1), deg))
    p2 = np.polyint(np.polyfit(q2, np.log10(r2), deg))
    avg = ((np.polyval(p2, hi) - np.polyval(p2, lo)) - (np.polyval(p1, hi) - np.polyval(p1, lo))) / (hi - lo)
    return float((10.0**avg - 1.0) * 100.0)


def bd_quality(anchor_rates: Sequence[float], anchor_quality: Sequence[float],
               test_rates: Sequence[float], test_quality: Sequence[float]) -> float | None:
    """Bjøntegaard delta quality (e.g. BD-PSNR in dB): the test codec's average quality change at equal rate.

    Quality is fitted as a cubic polynomial of log10(rate) and integrated over the
    overlapping log-rate range; None where the rate ranges don't overlap.
    """
    r1, q1 = _finite_curve(anchor_rates, anchor_quality)
    r2, q2 = _finite_curve(test_rates, test_quality)
    l1, l2 = np.log10(r1) if r1.size else r1, np.log10(r2) if r2.size else r2
    deg = _fit_degree(l1, l2)
    if deg < 1:
        return None
    lo, hi = max(l1.min(), l2.min()), min(l1.max(), l2.max())
    if not hi > lo:
        return None
    p1 = np.polyint(np.polyfit(l1, q1, deg))
    p2 = np.polyint(np.polyfit(l2, q2, deg))
    return float(((np.polyval(p2, hi) - np.polyval(p2, lo)) - (np.polyval(p1, hi) - np.polyval(p1, lo))) / (hi - lo))
