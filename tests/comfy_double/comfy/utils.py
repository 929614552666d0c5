"""Double of `comfy.utils.ProgressBar` (no throttling: every update reaches the hook)."""
from __future__ import annotations

PROGRESS_BAR_HOOK = None
UPDATES: list[tuple] = []  # (value, total, has_preview)


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        UPDATES.append((value, self.total, preview is not None))
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)
