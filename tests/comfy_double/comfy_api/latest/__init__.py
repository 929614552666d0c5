"""Double of `comfy_api.latest`: the VIDEO type pieces (Types.VideoComponents, InputImpl.VideoFromComponents)."""
from __future__ import annotations

import types
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional


@dataclass
class VideoComponents:
    images: Any
    frame_rate: Fraction
    audio: Optional[Any] = None
    metadata: Optional[dict] = None
    alpha: Optional[Any] = None


class VideoFromComponents:
    def __init__(self, components: VideoComponents, bit_depth: int = 8):
        self._components = components
        self.bit_depth = bit_depth

    def get_components(self) -> VideoComponents:
        return self._components

    def get_frame_count(self) -> int:
        return int(self._components.images.shape[0])

    def get_frame_rate(self) -> Fraction:
        return self._components.frame_rate

    def get_dimensions(self) -> tuple[int, int]:
        return int(self._components.images.shape[2]), int(self._components.images.shape[1])


Types = types.SimpleNamespace(VideoComponents=VideoComponents)
InputImpl = types.SimpleNamespace(VideoFromComponents=VideoFromComponents)
