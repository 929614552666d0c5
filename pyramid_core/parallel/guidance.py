"""CFG-parallel: the two ranks of a pair run the DiT on one guidance branch each and share the velocities.

The sampler's CFG batch is [negative; positive] (`guided_velocity`); branch 0 (negative) runs on the pair's
first rank, branch 1 (positive) on the second, each with its own row of the text embeddings and mask. An
all-gather puts both velocities on both ranks, which then form u + g * (c - u) from the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.attention import HostTextMask
from ..text import TextEmbeddings
from .comm import Channel

__all__ = ["CfgParallel"]


@dataclass(frozen=True, eq=False)
class CfgParallel:
    """A pair of ranks splitting the CFG batch; this rank computes batch row `branch` (0 negative, 1 positive)."""

    channel: Channel

    @property
    def branch(self) -> int:
        return self.channel.rank

    def branch_text(self, text: TextEmbeddings, mask: HostTextMask) -> tuple[TextEmbeddings, HostTextMask]:
        """This branch's row of a CFG text batch [negative; positive] and of its host mask."""
        if text.batch_size != 2:
            raise ValueError(f"CFG-parallel needs the CFG text batch [negative; positive], got batch {text.batch_size}")
        return text[self.branch], HostTextMask(mask.mask[self.branch : self.branch + 1])

    def gather(self, velocity: torch.Tensor) -> torch.Tensor:
        """The CFG batch [negative; positive] of velocities from each rank's own branch [1, ...]."""
        return torch.cat(self.channel.all_gather(velocity))
