"""Ulysses sequence parallelism inside the DiT: each rank holds a shard of the tokens, attention sees them all.

The joint sequence of one forward, [text; video] in the order the DiT attends over it, is cut into `size`
contiguous shards of equal length S = ceil(L / size); the last shard(s) end in zero padding. A rank keeps its
shard as a text part and a video part (either may be empty) and runs every per-token op (linears, norms, MLP,
modulation, RoPE with its slice of the tables) on it. Around attention an all-to-all turns q/k/v
[B, H, S, D] (all heads, own tokens) into [B, H/size, size*S, D] (own heads, every token); since the shards are
contiguous in the global order, dropping the padded tail gives the global sequence with no reordering, and the
existing frame-causal attention runs on it with the full `TokenLayout`. A second all-to-all brings the output
back to [B, H, S, D]. Padding never reaches attention; its per-token results are discarded.

The last block computes only the current clip's tokens, the tail of the sequence: each rank keeps the part
of its shard that lies in that tail (`SequenceShard.kept`), and `gather_kept` collects those rows (after
the output projection, C channels per token) so every rank has the whole velocity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .comm import Channel

__all__ = ["SequenceParallel", "SequenceShard", "sp_degrees"]

AttentionCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sp_degrees(heads: int) -> list[int]:
    """The sequence-parallel degrees a DiT with `heads` attention heads supports (the divisors of `heads`)."""
    return [d for d in range(1, heads + 1) if heads % d == 0]


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """A sequence-parallel group (`configure_dit(model, sequence_parallel=...)`); shards are made per forward."""

    channel: Channel

    @property
    def size(self) -> int:
        return self.channel.size

    @property
    def rank(self) -> int:
        return self.channel.rank

    def check_heads(self, heads: int) -> None:
        """ValueError naming the degrees that work when `heads` does not split over this group."""
        if heads % self.size:
            raise ValueError(
                f"sequence parallelism over {self.size} ranks needs the attention heads ({heads}) divisible by "
                f"{self.size}; degrees that work for this DiT: {', '.join(map(str, sp_degrees(heads)))}"
            )

    def shard(self, text_len: int, video_len: int) -> SequenceShard:
        """This rank's shard of a forward with `text_len` text and `video_len` video tokens."""
        return SequenceShard(self, text_len, video_len)


@dataclass(frozen=True, eq=False)
class SequenceShard:
    """This rank's contiguous slice [start, end) of one forward's padded joint sequence (host integers only)."""

    parallel: SequenceParallel
    text_len: int
    video_len: int

    @property
    def length(self) -> int:
        """Real tokens of the joint sequence."""
        return self.text_len + self.video_len

    @property
    def per_rank(self) -> int:
        """Tokens each rank holds, padding included: ceil(length / size)."""
        return -(-self.length // self.parallel.size)

    @property
    def start(self) -> int:
        return self.parallel.rank * self.per_rank

    @property
    def end(self) -> int:
        return self.start + self.per_rank

    @property
    def text(self) -> tuple[int, int]:
        """The global text positions [first, stop) in this shard."""
        return min(self.start, self.text_len), min(self.end, self.text_len)

    @property
    def video(self) -> tuple[int, int]:
        """The video token positions [first, stop) in this shard (counted from the first video token)."""
        first = min(max(self.start, self.text_len), self.length)
        stop = min(max(self.end, self.text_len), self.length)
        return first - self.text_len, stop - self.text_len

    @property
    def pad(self) -> int:
        """Padding rows at the end of this shard."""
        return max(0, self.end - max(self.start, self.length))

    @property
    def local_text_len(self) -> int:
        """Text tokens in this shard (they come first in it)."""
        return self.text[1] - self.text[0]

    def split(self, context: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's text [B, t, D] and video [B, v + pad, D] rows of the full streams (padding: zeros)."""
        context = context[:, self.text[0] : self.text[1]]
        video = video[:, self.video[0] : self.video[1]]
        if self.pad:
            video = torch.cat([video, video.new_zeros(video.shape[0], self.pad, *video.shape[2:])], dim=1)
        return context, video

    def local_rope(self, tables: torch.Tensor) -> torch.Tensor:
        """The video rows of this shard of host RoPE tables [2, N, D] (cos, sin), padding rotated by zero."""
        local = tables[:, self.video[0] : self.video[1]]
        if self.pad:
            identity = torch.zeros(2, self.pad, tables.shape[-1], dtype=tables.dtype)
            identity[0] = 1.0  # cos 1, sin 0
            local = torch.cat([local, identity], dim=1)
        return local.contiguous()

    def kept(self, count: int, rank: int | None = None) -> int:
        """Rows of this shard (or rank `rank`'s) in the last `count` real tokens and the padding after them: what
        the last block keeps."""
        start = self.start if rank is None else rank * self.per_rank
        return max(0, start + self.per_rank - max(start, self.length - count))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: AttentionCall) -> torch.Tensor:
        """`attention` over the whole sequence for this rank's heads; q, k, v and the result: [B, H, S, D] local."""
        size, channel = self.parallel.size, self.parallel.channel
        batch, heads, tokens, dim = q.shape
        if heads % size:
            self.parallel.check_heads(heads)
        if tokens != self.per_rank:
            raise ValueError(f"sequence shard holds {self.per_rank} tokens, attention got {tokens}")
        own = heads // size
        if q.dtype == k.dtype == v.dtype:  # one exchange for all three
            stacked = torch.stack([q, k, v]).view(3, batch, size, own, tokens, dim).permute(2, 0, 1, 3, 4, 5)
            gathered = channel.all_to_all(stacked).permute(1, 2, 3, 0, 4, 5).reshape(3, batch, own, -1, dim)
            q, k, v = gathered[:, :, :, : self.length].unbind(0)
        else:
            q, k, v = (self._gather_heads(t) for t in (q, k, v))
        out = attention(q, k, v)  # [B, own, length, D]
        padded = out.new_zeros(batch, own, size * tokens, dim)
        padded[:, :, : self.length] = out
        back = channel.all_to_all(padded.view(batch, own, size, tokens, dim).permute(2, 0, 1, 3, 4))
        return back.permute(1, 0, 2, 3, 4).reshape(batch, heads, tokens, dim)

    def _gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] own tokens -> [B, H/size, length, D] own heads over every (unpadded) token."""
        size = self.parallel.size
        batch, heads, tokens, dim = t.shape
        chunks = t.reshape(batch, size, heads // size, tokens, dim).permute(1, 0, 2, 3, 4)
        gathered = self.parallel.channel.all_to_all(chunks).permute(1, 2, 0, 3, 4).reshape(batch, heads // size, -1, dim)
        return gathered[:, :, : self.length]

    def gather_kept(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """The last `count` real tokens [B, count, C] on every rank, from each rank's `kept(count)` rows [B, k, C]."""
        size, rank = self.parallel.size, self.parallel.rank
        kept = [self.kept(count, r) for r in range(size)]
        widest = max(kept)
        if rows.shape[1] != kept[rank]:
            raise ValueError(f"rank {rank} keeps {kept[rank]} rows of the last block, got {rows.shape[1]}")
        if rows.shape[1] < widest:
            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], widest - rows.shape[1], *rows.shape[2:])], dim=1)
        parts = self.parallel.channel.all_gather(rows)
        return torch.cat([part[:, :n] for part, n in zip(parts, kept)], dim=1)[:, :count]

