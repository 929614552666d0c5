"""The causal VAE's decode plan: temporal chunks x spatial tiles, decoded tile by tile (official order) or
chunk by chunk across all tiles (frames final as soon as their chunk is; a clip can be fed as it is made)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from .vae_tiling import TILE_OVERLAP, chunk_ranges, stitch, tile_plan

if TYPE_CHECKING:
    from .vae import CausalVideoVAE

StepCallback = Callable[[int, int], None]  # (decode steps done, total)


class ChunkDecoder:
    """Decodes a clip of `num_frames` latent frames [B,C,T,h,w] in chunks x tiles.

    `decode_piece(k, i, j, z)` decodes chunk k of the tile at (i, j) (z: the chunk's latent frames, all tiles);
    `decode_chunk(k, z)` decodes chunk k across every tile, keeping one conv-cache set per tile between
    chunks, and returns its finished frames [B,3,f,H,W]; chunks must come in order. `close()` drops the caches.
    """

    def __init__(self, vae: CausalVideoVAE, num_frames: int, height: int, width: int, *, temporal_chunk: bool,
                 window_size: int, tile_sample_min_size: int, tiling: bool, out_device: Optional[torch.device],
                 step_callback: Optional[StepCallback] = None):
        if temporal_chunk and window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.vae, self.temporal_chunk, self.out_device = vae, temporal_chunk, out_device
        tile_latent = int(tile_sample_min_size / vae.downsample_scale)
        self.plan = None
        if tiling and (height > tile_latent or width > tile_latent):
            stride = int(tile_latent * (1 - TILE_OVERLAP))
            if stride < 1:
                raise ValueError(f"tile_sample_min_size={tile_sample_min_size} is too small; use at least 16")
            self.plan = tile_plan(height, width, tile_latent, tile_sample_min_size, stride)
        self.chunks = chunk_ranges(num_frames, window_size) if temporal_chunk else [(0, num_frames)]
        self.windows = list(self.plan.windows()) if self.plan else [(0, 0, 0, 0)]
        self.size = self.plan.size if self.plan else max(height, width)
        self.convs = vae._conv_layers(vae.post_quant_conv, vae.decoder)
        self.steps, self.done, self.step_callback = len(self.windows) * len(self.chunks), 0, step_callback
        self.tile_caches: dict[tuple[int, int], list[Optional[torch.Tensor]]] = {}
        self.next_chunk = 0
        if step_callback is not None:
            step_callback(0, self.steps)

    def decode_piece(self, k: int, i: int, j: int, z: torch.Tensor) -> torch.Tensor:
        """Chunk k of the tile whose top-left latent corner is (i, j); `z` holds the chunk's frames."""
        piece = z[:, :, :, i:i + self.size, j:j + self.size]
        decoded = self.vae._decode_chunk(piece, self.temporal_chunk, first_chunk=k == 0)
        if self.out_device is not None:
            decoded = decoded.to(self.out_device)
        self.done += 1
        if self.step_callback is not None:
            self.step_callback(self.done, self.steps)
        return decoded

    def empty_grid(self) -> list[list[Optional[torch.Tensor]]]:
        return [[None] * len(self.plan.col_starts) for _ in self.plan.row_starts] if self.plan else [[None]]

    def finish(self, grid: list[list[torch.Tensor]]) -> torch.Tensor:
        """The tiles of one chunk (or of the whole clip) blended into frames."""
        return stitch(grid, self.plan.blend, self.plan.keep) if self.plan else grid[0][0]

    def decode_chunk(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """Chunk k (the next one) across every tile; `z` holds exactly its latent frames."""
        if k != self.next_chunk:
            raise ValueError(f"chunks decode in order: expected chunk {self.next_chunk}, got {k}")
        grid = self.empty_grid()
        vae = self.vae
        for r, c, i, j in self.windows:
            if k > 0:
                vae._restore_caches(self.convs, self.tile_caches.pop((r, c)))
            grid[r][c] = self.decode_piece(k, i, j, z)
            self.tile_caches[(r, c)] = vae._take_caches(self.convs)
        self.next_chunk += 1
        return self.finish(grid)

    def first_frame(self, k: int) -> int:
        """Index of the first video frame chunk k produces."""
        start = self.chunks[k][0]
        return 0 if start == 0 else self.vae.temporal_ratio * (start - 1) + 1

    def close(self) -> None:
        self.tile_caches.clear()
        self.vae.clear_caches()
