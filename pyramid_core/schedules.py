"""Prompt schedules: a prompt that changes over the latent frames of a video.

A schedule is a list of (start latent frame, text) pairs, or the text form
``"0: a cat sleeps | 8: the cat wakes up"``; unit (latent frame) u uses the last entry whose start is <= u.
A plain prompt is a schedule with one entry. No torch import: the command line checks schedules first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

__all__ = ["PromptSchedule", "ScheduleSource", "is_schedule_text"]

_ENTRY = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$", re.DOTALL)
SEPARATOR = "|"


def is_schedule_text(text: object) -> bool:
    """Whether `text` is written in the schedule form (it starts with ``<latent frame>:``)."""
    return isinstance(text, str) and _ENTRY.match(text.split(SEPARATOR, 1)[0]) is not None


@dataclass(frozen=True)
class PromptSchedule:
    """(start latent frame, text) entries; the first starts at 0 and the starts increase."""

    entries: tuple[tuple[int, str], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("a prompt schedule needs at least one entry, e.g. '0: a cat sleeps'")
        previous = -1
        for start, text in self.entries:
            entry = f"{start}: {text}"
            if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                raise ValueError(f"prompt schedule entry {entry!r}: the start must be a latent frame >= 0")
            if previous < 0 and start != 0:
                raise ValueError(f"prompt schedule entry {entry!r}: the first entry must start at latent frame 0")
            if start <= previous:
                raise ValueError(f"prompt schedule entry {entry!r}: start frames must increase (previous {previous})")
            if not isinstance(text, str):
                raise ValueError(f"prompt schedule entry {entry!r}: the text must be a string")
            previous = start

    @classmethod
    def parse(cls, source: ScheduleSource) -> PromptSchedule:
        """A schedule from a plain prompt, the text form, (start, text) pairs, or a schedule."""
        if isinstance(source, PromptSchedule):
            return source
        if isinstance(source, str):
            if not is_schedule_text(source):
                return cls(((0, source),))
            entries = []
            for part in source.split(SEPARATOR):
                match = _ENTRY.match(part)
                if match is None:
                    raise ValueError(
                        f"prompt schedule entry {part.strip()!r} is not '<latent frame>: <text>'; write the schedule "
                        "as '0: a cat sleeps | 8: the cat wakes up'"
                    )
                entries.append((int(match.group(1)), match.group(2)))
            return cls(tuple(entries))
        try:
            return cls(tuple((start, text) for start, text in source))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ValueError) and "prompt schedule" in str(exc):
                raise
            raise ValueError(f"a prompt schedule is a list of (start latent frame, text) pairs, got {source!r}") from None

    def at(self, unit: int) -> str:
        """The text in force at latent frame `unit`."""
        return next(text for start, text in reversed(self.entries) if start <= unit)

    def check_length(self, num_units: int) -> None:
        """Every entry must start inside a video of `num_units` latent frames."""
        for start, text in self.entries:
            if start >= num_units:
                raise ValueError(
                    f"prompt schedule entry {f'{start}: {text}'!r} starts at latent frame {start}, but the video has "
                    f"{num_units} (0..{num_units - 1}); lower the start or raise temp"
                )

    @property
    def texts(self) -> tuple[str, ...]:
        """The distinct texts, in order of first use."""
        return tuple(dict.fromkeys(text for _, text in self.entries))


ScheduleSource = Union[str, Sequence[tuple[int, str]], PromptSchedule]
