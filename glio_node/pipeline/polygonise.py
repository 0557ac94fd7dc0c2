"""Label map -> valid polygons with holes, one (multi)polygon per class: pure numpy + shapely.

Why this way: rasterio/GDAL's ``polygonize`` is not a dependency, a per-pixel Python walk is far
too slow for a slide-sized label map, and a union of one box per pixel run costs GEOS seconds
per class.  Instead each class's boundary is built directly, with array operations:

1. One pass over the label map finds every unit pixel edge between two different labels (the
   map is padded with the background, so the raster edge closes every ring); only these edges,
   a small fraction of the pixels, are looked at again.  The boundary of class k is the set of
   those edges with class k on one side.
2. Collinear unit edges are merged into maximal runs (one segment per straight boundary piece),
   *except* at a vertex where four boundary edges of the class meet (two of its pixels touching
   only at a corner): runs end there, so the segments are noded.
3. ``shapely.polygonize`` turns the noded segments into the faces they enclose, holes assigned;
   every face is wholly inside the class or wholly outside it, and one interior point of each
   face, looked up in the label map, says which.  The inside faces are the answer.

Coordinates are raster pixel coordinates with QuPath's and the raster convention's corner
reading: x = column, y = row, pixel (row r, column c) is the square [c, c+1] x [r, r+1].  So the
polygons cover exactly the pixels of the class, and ``shapely.contains_xy`` at pixel centres
(c + 0.5, r + 0.5) gives the label map back.

Measured (tests/unit/test_polygonise.py prints it): a 4096x4096 label map of ten blob-shaped
classes with speckle, all classes plus the tissue outline, simplified, in about a second on the
project's 2-core development machine.  Memory: a few label-map-sized temporaries (1 byte/px)
for the first pass, then arrays the size of the boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry


def polygonise(mask: np.ndarray) -> MultiPolygon:
    """The pixels of the bool ``mask`` (rows, cols) as a valid MultiPolygon (holes kept).

    An empty mask gives an empty MultiPolygon.  Raises ``ValueError`` for a mask that is not
    2-D.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (rows, cols), got shape {mask.shape}")
    _, by_label = polygonise_labels(mask.view(np.uint8), [1], background=0)
    return by_label[1]


def polygonise_labels(
    label_map: np.ndarray, labels: Iterable[int], background: int
) -> tuple[MultiPolygon, dict[int, MultiPolygon]]:
    """The outline of everything not ``background``, and each of ``labels``' pixels, as
    polygons (see the module docstring).  Raises ``ValueError`` for a map that is not 2-D."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D (rows, cols), got shape {label_map.shape}")
    edges = _LabelEdges(label_map, background)
    outline = edges.polygons(lambda a: a != background, lambda r, c: label_map[r, c] != background)
    by_label = {
        k: edges.polygons(lambda a, k=k: a == k, lambda r, c, k=k: label_map[r, c] == k)
        for k in labels
    }
    return outline, by_label


class _LabelEdges:
    """Every unit edge between two different labels, with the label on each side."""

    def __init__(self, label_map: np.ndarray, background: int, band_px: int = 1 << 20):
        rows, cols = label_map.shape
        self.shape = (rows, cols)
        # Worked in bands of rows (about ``band_px`` pixels each) through one padded buffer, so
        # the temporaries are band-sized: a padded copy of the map and a comparison of it with
        # itself would be 2 B per label-map pixel.  Edges come out in the same (row-major) order.
        band = max(1, band_px // (cols + 2))
        buffer = np.full((band + 2, cols + 2), background, dtype=label_map.dtype)
        vertical: list[tuple[np.ndarray, ...]] = []  # (i, j, label left, label right) per band
        horizontal: list[tuple[np.ndarray, ...]] = []  # (i, j, label above, label below) per band
        for r0 in range(0, max(rows, 1), band):  # an empty map still gets one (empty) band
            r1 = min(rows, r0 + band)
            last = r1 == rows
            # buffer rows: label-map rows r0 - 1 .. r1 - 1 (background above row 0), and one row
            # of background below the last band for the edges under the map's last row.
            n = r1 - r0 + 1 + last
            padded = buffer[:n]
            padded[:] = background
            if r0 > 0:
                padded[0, 1:-1] = label_map[r0 - 1]
            padded[1 : r1 - r0 + 1, 1:-1] = label_map[r0:r1]
            # Vertical edge (i, j): x = j, y in [i, i+1], between pixel (i, j-1) and (i, j).
            left, right = padded[1 : r1 - r0 + 1, :-1], padded[1 : r1 - r0 + 1, 1:]
            i, j = np.nonzero(left != right)
            vertical.append((i + r0, j, left[i, j], right[i, j]))
            # Horizontal edge (i, j): y = i, x in [j, j+1], between pixel (i-1, j) and (i, j).
            up, down = padded[:-1, 1:-1], padded[1:, 1:-1]
            i, j = np.nonzero(up != down)
            horizontal.append((i + r0, j, up[i, j], down[i, j]))
        self.v_i, self.v_j, self.v_a, self.v_b = (np.concatenate(parts) for parts in zip(*vertical))
        self.h_i, self.h_j, self.h_a, self.h_b = (np.concatenate(parts) for parts in zip(*horizontal))

    def polygons(
        self,
        member: Callable[[np.ndarray], np.ndarray],
        inside: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ) -> MultiPolygon:
        """The faces of the region where ``member(label)`` holds; ``inside(rows, cols)`` says it
        of label-map pixels."""
        v = member(self.v_a) != member(self.v_b)
        h = member(self.h_a) != member(self.h_b)
        if not v.any():
            return MultiPolygon()
        segments = _noded_runs(self.v_i[v], self.v_j[v], self.h_i[h], self.h_j[h], self.shape)
        faces = shapely.get_parts(shapely.polygonize(shapely.linestrings(segments)))
        xy = np.floor(shapely.get_coordinates(shapely.point_on_surface(faces))).astype(np.int64)
        rows, cols = self.shape
        keep = inside(np.clip(xy[:, 1], 0, rows - 1), np.clip(xy[:, 0], 0, cols - 1))
        return MultiPolygon(list(faces[keep]))


def _noded_runs(
    v_i: np.ndarray, v_j: np.ndarray, h_i: np.ndarray, h_j: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Unit boundary edges merged into straight runs that end at every crossing vertex; an
    (n, 2, 2) float array of ((x0, y0), (x1, y1))."""
    width = shape[1] + 2  # vertex id = y * width + x, x in 0..cols, y in 0..rows
    v_i, v_j, h_i, h_j = (np.asarray(a, dtype=np.int64) for a in (v_i, v_j, h_i, h_j))
    ends = np.concatenate([v_i * width + v_j, (v_i + 1) * width + v_j, h_i * width + h_j, h_i * width + h_j + 1])
    ids, degree = np.unique(ends, return_counts=True)
    crossing = ids[degree == 4]  # two pixels of the class touching only at this corner

    def runs(line: np.ndarray, pos: np.ndarray, vertex: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        """Runs of consecutive ``pos`` on each ``line``; a run breaks at a crossing vertex."""
        order = np.lexsort((pos, line))
        line, pos = line[order], pos[order]
        joins = (line[1:] == line[:-1]) & (pos[1:] == pos[:-1] + 1)
        joins &= ~np.isin(vertex(line[1:], pos[1:]), crossing)
        start = np.ones(len(line), dtype=bool)
        start[1:] = ~joins
        end = np.ones(len(line), dtype=bool)
        end[:-1] = ~joins
        return line[start], pos[start], pos[end] + 1

    x, y0, y1 = runs(v_j, v_i, lambda x, y: y * width + x)
    vertical = np.stack([np.stack([x, y0], 1), np.stack([x, y1], 1)], 1)
    y, x0, x1 = runs(h_i, h_j, lambda y, x: y * width + x)
    horizontal = np.stack([np.stack([x0, y], 1), np.stack([x1, y], 1)], 1)
    return np.concatenate([vertical, horizontal]).astype(np.float64)


def simplify(geometry: MultiPolygon, tolerance: float) -> MultiPolygon:
    """Douglas-Peucker with topology preserved (holes stay holes, nothing self-crosses).

    ``tolerance`` is in the geometry's units (raster pixels).  Parts that vanish are dropped;
    the result is a valid MultiPolygon (``make_valid`` only if GEOS ever returns an invalid one).
    """
    if geometry.is_empty or tolerance <= 0:
        return geometry
    out: BaseGeometry = shapely.simplify(geometry, tolerance, preserve_topology=True)
    if not out.is_valid:  # pragma: no cover - GEOS's topology-preserving simplifier keeps validity
        out = shapely.make_valid(out)
    return as_multipolygon(out)


def as_multipolygon(geometry: BaseGeometry) -> MultiPolygon:
    """The polygonal parts of ``geometry`` as one MultiPolygon (points and lines dropped)."""
    parts = [p for p in shapely.get_parts(geometry) if isinstance(p, (Polygon, MultiPolygon))]
    nested = [q for p in parts for q in (p.geoms if isinstance(p, MultiPolygon) else [p])]
    return MultiPolygon([q for q in nested if not q.is_empty])


SIMPLIFY_TOLERANCE_PX = 0.5
"""Douglas-Peucker tolerance of region polygons, in label-map pixels (1 µm with the demo bundle's
2 µm/px segmentation network): no vertex of a simplified outline is more than half a label-map
pixel from the pixel-exact outline.  That straightens the pixel staircases of oblique edges
(their corners lie within 0.36 px of the line) but never collapses a single pixel (its corners
are 0.71 px from its diagonal), so small regions keep their area.  docs/viewer.md states it."""


@dataclass(frozen=True)
class RegionPolygons:
    """The label map as polygons, computed once per job for the GeoJSON and the ANN.

    Coordinates are label-map pixels (corner reading, see the module docstring); ``mm_per_px``
    is the label map's spacing, so x * mm_per_px is the distance in mm from the total pixel
    matrix's left edge.
    """

    tissue: MultiPolygon  # everything the label map calls tissue (any class)
    regions: tuple[MultiPolygon, ...]  # index i: pixels of region class i (empty if absent)
    mm_per_px: float
    tolerance_px: float  # the simplification applied


def region_polygons(
    label_map: np.ndarray,
    n_classes: int,
    mm_per_px: float,
    background: int,
    tolerance_px: float = SIMPLIFY_TOLERANCE_PX,
) -> RegionPolygons:
    """Polygonise and simplify the tissue outline and every class of ``label_map``."""
    outline, by_label = polygonise_labels(label_map, range(n_classes), background)
    return RegionPolygons(
        tissue=simplify(outline, tolerance_px),
        regions=tuple(simplify(by_label[i], tolerance_px) for i in range(n_classes)),
        mm_per_px=mm_per_px,
        tolerance_px=tolerance_px,
    )
