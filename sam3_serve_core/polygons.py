"""Masks as polygons, for annotation tools (CVAT, Label Studio and COCO's polygon form import outlines).

OpenCV traces the outlines (`findContours`: each region's outer boundary and its holes) and simplifies them
(`approxPolyDP`, Douglas-Peucker), as the field does; no tracing is written here. It is imported when the
first outline is asked for, so a server built without it (an image that leaves out the `server` extra's
OpenCV) answers everything else.
"""

from __future__ import annotations

import numpy as np

from client.protocol import Polygon

# OpenCV's hierarchy row: next and previous at the same level, first child, parent.
_FIRST_CHILD, _PARENT, _NEXT = 2, 3, 0


def mask_polygons(mask: np.ndarray, tolerance: float) -> list[Polygon]:
    """Each region of a binary (H, W) mask (nonzero inside) as its outer ring with its holes, simplified so that
    no outline strays more than `tolerance` pixels from the traced one (0: every corner kept).

    A ring of fewer than three vertices (a region or a hole one pixel thin) is left out: annotation tools
    refuse such polygons, and its pixels lie on the outline, within the tolerance's reach.
    """
    import cv2

    binary = np.ascontiguousarray(mask != 0, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    links = hierarchy[0]
    polygons = []
    for index, contour in enumerate(contours):
        if links[index][_PARENT] != -1:
            continue  # a hole: taken with its region below
        exterior = _ring(contour, tolerance)
        if exterior is None:
            continue
        holes = []
        child = links[index][_FIRST_CHILD]
        while child != -1:
            hole = _ring(contours[child], tolerance)
            if hole is not None:
                holes.append(hole)
            child = links[child][_NEXT]
        polygons.append(Polygon(exterior=exterior, holes=holes))
    return polygons


def _ring(contour: np.ndarray, tolerance: float) -> list[tuple[int, int]] | None:
    import cv2

    points = cv2.approxPolyDP(contour, tolerance, True) if tolerance > 0 else contour
    if len(points) < 3:
        return None
    return [(int(x), int(y)) for x, y in points[:, 0]]
