"""Community detection over cluster co-occurrences (the "CD" of Leopart's CBFE + CD), with Infomap.

The fine foreground clusters (plus the background label) are nodes; two clusters are linked when
each is, on average over the images it appears in, a frequent spatial neighbour of the other.
Infomap's modules then merge clusters into object-level segments. Details follow Leopart's
``experiments/fully_unsup_seg/fully_unsup_seg.py`` (MkuuWaUjinga/leopart, copied by vpariza/NeCo):
- per image, skimage's grey-level co-occurrence matrix of the cluster map at distances 1 and 2
  and the 8 angles the reference lists (including its 4*pi/3, sic), summed, diagonal zeroed,
  rows normalised; summed over images and divided by the number of images in which each cluster
  has a co-occurrence with another cluster;
- an undirected edge (i, j) of weight min(a_ij, a_ji) when both directions reach the threshold;
- Infomap two-level, undirected, with the Markov time and 20 preferred modules; clusters without
  any edge are not in the graph and all end in segment 0 (the reference's merge map starts at 0).

Infomap 2.16 rejects seed 0, so run r uses seed r + 1 (the reference used seeds 0-9 on Infomap 1.x).
"""

from __future__ import annotations

import numpy as np
from infomap import Infomap, Options

ANGLES = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi, 4 * np.pi / 3, 3 * np.pi / 2, 7 * np.pi / 4)


def _offset(angle: float, distance: int) -> tuple[int, int]:
    """skimage graycomatrix's offset of a pair's second pixel: (round(sin * d), round(cos * d)), half away from 0."""

    def half_away(v: float) -> int:
        return int(np.copysign(np.floor(abs(v) + 0.5), v))

    return half_away(np.sin(angle) * distance), half_away(np.cos(angle) * distance)


def cooccurrence_matrix(cluster_maps: np.ndarray, num_clusters: int, distances=(1, 2), chunk: int = 32) -> np.ndarray:
    """(num_clusters, num_clusters) averaged row-normalised co-occurrences of (N, H, W) integer cluster maps.

    The counts are skimage's ``graycomatrix`` summed over distances and angles, taken for ``chunk`` images at
    once with one bincount of shifted pixel pairs (the per-image graycomatrix loop is ~100x slower at 250 levels).
    """
    if num_clusters > 256:
        raise ValueError(f"skimage's graycomatrix supports at most 256 levels, got {num_clusters} clusters")
    maps = np.asarray(cluster_maps, np.int32)
    _, h, w = maps.shape
    offsets = [_offset(a, d) for d in distances for a in ANGLES]
    levels2 = num_clusters * num_clusters
    total = np.zeros((num_clusters, num_clusters))
    appearances = np.zeros(num_clusters)
    for start in range(0, len(maps), chunk):
        block = maps[start : start + chunk]
        image = np.arange(len(block), dtype=np.int32)[:, None, None] * levels2
        pairs = []
        for dr, dc in offsets:
            r0, r1, c0, c1 = max(0, -dr), min(h, h - dr), max(0, -dc), min(w, w - dc)
            first = block[:, r0:r1, c0:c1]
            second = block[:, r0 + dr : r1 + dr, c0 + dc : c1 + dc]
            differ = first != second  # same-cluster pairs are the zeroed diagonal: skip them early
            pairs.append((image + first * num_clusters + second)[differ])
        counts = np.bincount(np.concatenate(pairs), minlength=len(block) * levels2).astype(np.float64)
        counts = counts.reshape(len(block), num_clusters, num_clusters)
        row_sum = counts.sum(axis=2, keepdims=True)
        total += np.divide(counts, row_sum, out=np.zeros_like(counts), where=row_sum != 0).sum(axis=0)
        appearances += (row_sum[:, :, 0] > 0).sum(axis=0)
    # Rows of clusters that never co-occur stay 0 (the reference divides 0 by 0; either way they get no edge).
    return np.divide(total, appearances[:, None], out=np.zeros_like(total), where=appearances[:, None] != 0)


def graph_edges(adjacency: np.ndarray, weight_threshold: float) -> list[tuple[int, int, float]]:
    """Undirected edges (i, j >= i, weight) where both a_ij and a_ji reach ``weight_threshold``."""
    both = (adjacency >= weight_threshold) & (adjacency.T >= weight_threshold)
    i, j = np.nonzero(np.triu(both))
    weights = np.minimum(adjacency[i, j], adjacency[j, i])
    return [(int(a), int(b), float(w)) for a, b, w in zip(i, j, weights)]


def detect_communities(
    edges: list[tuple[int, int, float]], *, markov_time: float, seed: int, preferred_modules: int
) -> dict[int, int]:
    """Infomap module id of every node that has an edge."""
    if not edges:
        return {}
    options = Options(
        directed=False,
        two_level=True,
        seed=seed,
        markov_time=markov_time,
        silent=True,
        preferred_number_of_modules=preferred_modules,
    )
    infomap = Infomap(options=options)
    infomap.add_links(edges)
    return {int(node): int(module) for node, module in infomap.run().modules().items()}


def merge_lookup(communities: dict[int, int], size: int) -> np.ndarray:
    """(size,) merged id of every cluster label: its module, 0 for labels outside the graph."""
    lookup = np.zeros(size, np.int64)
    for cluster, module in communities.items():
        if cluster < size:
            lookup[cluster] = module
    return lookup
