"""One progress line per epoch or round, readable in a log file (progress bars vanish without a terminal)."""

from __future__ import annotations

import time


def clock(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepProgress:
    """Elapsed time and ETA over steps ``start+1 .. total`` (epochs or rounds) of a run."""

    def __init__(self, unit: str, total: int, start: int = 0):
        self.unit, self.total, self.start = unit, total, start
        self.began = time.monotonic()

    def line(self, step: int, values: dict[str, float | int | None]) -> str:
        """``epoch 3/30: loss 4.12, img/s 512, elapsed 0:01:23, ETA 0:10:11`` for finished step ``step``;
        ``values`` (name → number) go in between, None values are left out."""
        elapsed = time.monotonic() - self.began
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        shown = [f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                 for name, value in values.items() if value is not None]
        return f"{self.unit} {step}/{self.total}: " + ", ".join([*shown, f"elapsed {clock(elapsed)}",
                                                                   f"ETA {clock(eta)}"])
