"""The training views' random framing: crop, rotation and shift in one resample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from cxrkit.data.transforms import Framing, RandomFraming, frame
from tests.conftest import synthetic_film

S = 64


def film(size: tuple[int, int] = (S, S), seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.array(synthetic_film("PNEUMONIA", seed, size)))[None]


def bright_square(at: tuple[int, int], side: int = 8) -> torch.Tensor:
    x = torch.zeros(1, S, S, dtype=torch.uint8)
    x[0, at[1]:at[1] + side, at[0]:at[0] + side] = 255
    return x


def centroid(x: torch.Tensor) -> tuple[float, float]:
    weights = x[0].double()
    ys, xs = torch.meshgrid(torch.arange(S).double(), torch.arange(S).double(), indexing="ij")
    return float((xs * weights).sum() / weights.sum()), float((ys * weights).sum() / weights.sum())


def test_the_whole_film_unrotated_is_the_film_itself():
    x = film()
    assert torch.equal(frame(x, S, Framing(0, 0, S, S)), x)


def test_a_crop_matches_torchvision_resized_crop():
    x = film((80, 96))  # a film larger than the view, not square
    ours = frame(x, S, Framing(left=10, top=20, width=60, height=56))
    theirs = v2.functional.resized_crop(x, top=20, left=10, height=56, width=60, size=[S, S],
                                        antialias=True)
    assert ours.shape == (1, S, S) and ours.dtype == torch.uint8
    assert (ours.float() - theirs.float()).abs().mean() < 2.0  # gray levels of 255


def test_a_shift_moves_the_content_by_that_many_output_pixels():
    x = bright_square(at=(20, 30))
    moved = frame(x, S, Framing(0, 0, S, S, shift=(10.0, -6.0)))
    (x0, y0), (x1, y1) = centroid(x), centroid(moved)
    assert x1 - x0 == pytest.approx(10, abs=0.05) and y1 - y0 == pytest.approx(-6, abs=0.05)


def test_a_quarter_turn_is_clockwise_about_the_centre():
    x = film()
    turned = frame(x, S, Framing(0, 0, S, S, angle=90.0))
    clockwise = torch.rot90(x, k=-1, dims=(-2, -1))
    assert (turned.int() - clockwise.int()).abs().max() <= 1


def test_outside_the_film_is_black():
    x = torch.full((1, S, S), 200, dtype=torch.uint8)
    turned = frame(x, S, Framing(0, 0, S, S, angle=45.0))
    assert turned[0, 0, 0] == 0 and turned[0, S // 2, S // 2] == 200


def test_frame_names_what_it_takes():
    with pytest.raises(ValueError, match="uint8 grayscale film"):
        frame(torch.zeros(3, S, S), S, Framing(0, 0, S, S))


def test_random_framing_stays_in_its_ranges_and_follows_the_seed():
    framing = RandomFraming(S, scale=(0.75, 1.0), ratio=(0.9, 1.1), degrees=7.0, translate=0.05)
    torch.manual_seed(0)
    drawn = [framing.sample(80, 96) for _ in range(500)]
    for f in drawn:
        assert 0.75 * 0.95 <= f.width * f.height / (80 * 96) <= 1.0  # clamped boxes lose a little
        assert f.width <= 96 and f.height <= 80 and f.left >= 0 and f.top >= 0
        assert f.left + f.width <= 96 + 1e-9 and f.top + f.height <= 80 + 1e-9
        assert abs(f.angle) <= 7.0 and all(abs(d) <= 0.05 * S for d in f.shift)
    angles = [f.angle for f in drawn]  # the ranges are used, not just respected
    assert min(angles) < -6 and max(angles) > 6
    assert math.isclose(np.mean(angles), 0, abs_tol=0.6)
    torch.manual_seed(0)
    assert framing.sample(80, 96) == drawn[0]
    x = film((80, 96))
    torch.manual_seed(1)
    a, b = framing(x), framing(x)
    torch.manual_seed(1)
    assert torch.equal(framing(x), a) and not torch.equal(a, b)
