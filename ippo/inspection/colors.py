"""The diverging colour scale of token contributions: blue pulls with the validation set (it raises the episode's
score), red against it, white contributes nothing; the colour saturates at +-``scale`` (values beyond are clamped).
The intensity grows with the square root of |value| / scale, so that tokens well below the largest still show."""

from __future__ import annotations

import math

WHITE = (255, 255, 255)
POSITIVE = (67, 147, 195)  # ColorBrewer RdBu, light enough for black text
NEGATIVE = (214, 96, 77)
MISSING = "#d9d9d9"  # NaN / Inf


def contribution_color(value: float, scale: float, gamma: float = 0.5) -> str:
    """``#rrggbb`` for ``value`` on a scale saturating at +-``scale``: white at 0, ``POSITIVE`` at +scale and
    above, ``NEGATIVE`` at -scale and below, in between (|value| / scale) ** ``gamma`` of the way from white. A
    non-finite value is grey; ``scale <= 0`` (nothing to show) is white."""
    if not math.isfinite(value):
        return MISSING
    if not scale > 0 or not math.isfinite(scale):
        return "#ffffff"
    t = min(1.0, abs(value) / scale) ** gamma
    end = POSITIVE if value > 0 else NEGATIVE
    rgb = (round(w + t * (e - w)) for w, e in zip(WHITE, end))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def color_scale(values: list[float], quantile: float = 0.98) -> float:
    """Where the colours saturate: the ``quantile`` of |value| over the non-zero finite values (a few extreme
    tokens would otherwise leave every other one white); 0 when there are none."""
    mags = sorted(abs(v) for v in values if math.isfinite(v) and v != 0)
    if not mags:
        return 0.0
    return mags[min(len(mags) - 1, int(quantile * (len(mags) - 1) + 0.5))]
