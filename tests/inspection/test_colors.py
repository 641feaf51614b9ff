"""The diverging colour scale of token contributions: sign -> hue, magnitude -> saturation, clamped."""

from __future__ import annotations

import math

from ippo.inspection.colors import MISSING, NEGATIVE, POSITIVE, color_scale, contribution_color


def rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def distance_from_white(hex_color: str) -> int:
    return sum(255 - c for c in rgb(hex_color))


def test_zero_is_white_and_the_ends_are_the_scale_colours():
    assert contribution_color(0.0, 1.0) == "#ffffff"
    assert rgb(contribution_color(2.0, 2.0)) == POSITIVE
    assert rgb(contribution_color(-2.0, 2.0)) == NEGATIVE


def test_sign_picks_the_hue():
    r, _, b = rgb(contribution_color(0.5, 1.0))
    assert b > r  # positive (with the validation set): blue
    r, _, b = rgb(contribution_color(-0.5, 1.0))
    assert r > b  # negative (against it): red


def test_magnitude_saturates_monotonically_and_is_clamped():
    pos = [distance_from_white(contribution_color(v, 1.0)) for v in (0.0, 0.1, 0.3, 0.6, 1.0)]
    neg = [distance_from_white(contribution_color(-v, 1.0)) for v in (0.0, 0.1, 0.3, 0.6, 1.0)]
    assert pos == sorted(pos) and len(set(pos)) == 5
    assert neg == sorted(neg) and len(set(neg)) == 5
    assert contribution_color(7.5, 1.0) == contribution_color(1.0, 1.0)  # beyond the scale: clamped
    assert contribution_color(-1e9, 1.0) == contribution_color(-1.0, 1.0)
    # the same value on a larger scale is paler
    assert distance_from_white(contribution_color(0.5, 4.0)) < distance_from_white(contribution_color(0.5, 1.0))


def test_nothing_to_show():
    assert contribution_color(math.nan, 1.0) == MISSING and contribution_color(math.inf, 1.0) == MISSING
    assert contribution_color(0.3, 0.0) == "#ffffff"  # a zero scale: every token contributes nothing


def test_color_scale_is_a_high_quantile_of_the_magnitudes():
    values = [0.0] * 50 + [float(k) for k in range(1, 101)] + [-1e6]  # one extreme token
    assert 95 <= color_scale(values) <= 100  # the extreme does not wash every other token out
    assert color_scale([0.0, math.nan]) == 0.0
    assert color_scale([-3.0]) == 3.0
