"""Tile and temporal-chunk plans of the causal video VAE, and the official tile blending/stitching."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

TILE_OVERLAP = 0.25  # official overlap of neighbouring tiles (encode and decode)


@dataclass(frozen=True)
class TilePlan:
    """Where tiles start (input units), their size (input units) and the output blend / keep extents."""

    row_starts: list[int]
    col_starts: list[int]
    size: int
    blend: int
    keep: int

    def windows(self) -> Iterator[tuple[int, int, int, int]]:
        """Row-major ``(row, col, start_h, start_w)`` of every tile."""
        for r, i in enumerate(self.row_starts):
            for c, j in enumerate(self.col_starts):
                yield r, c, i, j


def tile_plan(height: int, width: int, tile: int, out_tile: int, stride: int) -> TilePlan:
    """Tiles of ``tile`` input units every ``stride``; outputs of ``out_tile`` blend over ``TILE_OVERLAP``."""
    blend = int(out_tile * TILE_OVERLAP)
    return TilePlan(list(range(0, height, stride)), list(range(0, width, stride)), tile, blend, out_tile - blend)


def chunk_ranges(num_frames: int, window_size: int) -> list[tuple[int, int]]:
    """Official chunking: the first chunk has window_size + 1 frames, every later one window_size."""
    ranges, start, end = [], 0, min(window_size + 1, num_frames)
    while start < num_frames:
        ranges.append((start, end))
        start, end = end, min(end + window_size, num_frames)
    return ranges


def _blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    extent = min(above.shape[3], tile.shape[3], extent)
    for y in range(extent):
        tile[:, :, :, y, :] = above[:, :, :, -extent + y, :] * (1 - y / extent) + tile[:, :, :, y, :] * (y / extent)


def _blend_cols(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    extent = min(left.shape[4], tile.shape[4], extent)
    for x in range(extent):
        tile[:, :, :, :, x] = left[:, :, :, :, -extent + x] * (1 - x / extent) + tile[:, :, :, :, x] * (x / extent)


def stitch(grid: list[list[torch.Tensor]], blend: int, keep: int) -> torch.Tensor:
    """Official tile stitching: linear blends with the (already blended) tile above and to the left,
    in place and row-major, then each tile cropped to ``keep`` rows/columns."""
    rows = []
    for r, row in enumerate(grid):
        for c, tile in enumerate(row):
            if r > 0:
                _blend_rows(grid[r - 1][c], tile, blend)
            if c > 0:
                _blend_cols(row[c - 1], tile, blend)
        rows.append(torch.cat([tile[:, :, :, :keep, :keep] for tile in row], dim=4))
    return torch.cat(rows, dim=3)
