"""Masks as polygons (`sam3_serve_core.polygons`): drawn back, they give the mask within the tolerance.

The bound held here: drawn back with OpenCV (`fillPoly`, holes cleared and their outline drawn back), every
pixel that differs from the mask lies within `tolerance + 1.5` pixels of the other side (the traced outline runs
through the boundary pixels' centres, a simplified one strays `tolerance` from it, and the distance transform
measured with is approximate by up to half a pixel); shapes of radius 15 or more keep an IoU of at least 0.95
at the default tolerance of 1 pixel.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from client.protocol import Polygon
from sam3_serve_core.polygons import mask_polygons


def draw(polygons: list[Polygon], shape: tuple[int, int]) -> np.ndarray:
    """The polygons drawn back as a 0/1 mask, each region with its holes on a canvas of its own (an island in
    a hole is a region of its own), then OR'd."""
    drawn = np.zeros(shape, np.uint8)
    for polygon in polygons:
        region = np.zeros(shape, np.uint8)
        cv2.fillPoly(region, [np.array(polygon.exterior, np.int32)], 1)
        for hole in polygon.holes:
            ring = np.array(hole, np.int32)
            cv2.fillPoly(region, [ring], 0)
            cv2.polylines(region, [ring], True, 1)  # the hole's outline runs through the region's own pixels
        drawn |= region
    return drawn


def assert_drawn_back_within(mask: np.ndarray, polygons: list[Polygon], tolerance: float) -> float:
    """Every differing pixel near the other side (the bound above); returns the IoU."""
    drawn = draw(polygons, mask.shape)
    padded = np.pad(mask, 1)  # beyond the image is outside: a region's edge along the image's edge is outline
    to_outside = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    to_inside = cv2.distanceTransform(1 - mask, cv2.DIST_L2, 5)
    missed, extra = (mask == 1) & (drawn == 0), (mask == 0) & (drawn == 1)
    assert to_outside[missed].max(initial=0) <= tolerance + 1.5
    assert to_inside[extra].max(initial=0) <= tolerance + 1.5
    union = np.count_nonzero(mask | drawn)
    return np.count_nonzero(mask & drawn) / union if union else 1.0


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    return ((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius**2).astype(np.uint8)


def test_a_rectangle_is_its_four_corners_and_draws_back_exactly():
    mask = np.zeros((40, 60), np.uint8)
    mask[5:20, 10:50] = 1
    (polygon,) = mask_polygons(mask, tolerance=1.0)
    assert sorted(polygon.exterior) == [(10, 5), (10, 19), (49, 5), (49, 19)] and polygon.holes == []
    np.testing.assert_array_equal(draw([polygon], mask.shape), mask)


def test_an_empty_mask_has_no_polygon():
    assert mask_polygons(np.zeros((30, 30), np.uint8), tolerance=1.0) == []


def test_a_ring_keeps_its_hole_and_an_island_in_the_hole_is_a_region_of_its_own():
    shape = (120, 120)
    mask = disc(shape, (60, 60), 50) - disc(shape, (60, 60), 30) + disc(shape, (60, 60), 10)
    ring, island = sorted(mask_polygons(mask, tolerance=1.0), key=lambda polygon: -len(polygon.exterior))
    assert len(ring.holes) == 1 and island.holes == []
    assert assert_drawn_back_within(mask, [ring, island], tolerance=1.0) >= 0.95


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_draw_back_within_the_tolerance(seed, tolerance):
    rng = np.random.default_rng(seed)
    shape = (200, 260)
    mask = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(1, 6)):
        centre = (int(rng.integers(30, 230)), int(rng.integers(30, 170)))
        mask |= disc(shape, centre, int(rng.integers(15, 40)))
    for _ in range(rng.integers(0, 3)):  # bites and holes
        centre = (int(rng.integers(30, 230)), int(rng.integers(30, 170)))
        mask &= 1 - disc(shape, centre, int(rng.integers(4, 12)))
    polygons = mask_polygons(mask, tolerance)
    iou = assert_drawn_back_within(mask, polygons, tolerance)
    if tolerance <= 1.0:
        assert iou >= 0.95
    if tolerance > 0:
        vertices = sum(len(polygon.exterior) for polygon in polygons)
        assert vertices < sum(len(c) for c in cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)[0])


def test_a_one_pixel_speck_and_line_are_left_out():
    mask = np.zeros((20, 20), np.uint8)
    mask[3, 3] = 1
    mask[10, 2:18] = 1
    assert mask_polygons(mask, tolerance=1.0) == []
