"""A progress bar on stderr, without dependencies.

On a terminal one line is redrawn in place; elsewhere (a pipe, a log file)
a line is printed each time the label's first word changes, so that a log
shows where the run got to without thousands of lines.
"""

from __future__ import annotations

import sys
import time

BAR_WIDTH = 28


class Progress:
    """Counts *total* steps; ``step(label)`` marks one done."""

    def __init__(self, total: int, stream=None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.began = time.monotonic()
        self._last_section = None

    def step(self, label: str, count: int = 1) -> None:
        """*label* is what runs now; *count* steps are done with it."""
        self.done = min(self.done + count, self.total)
        self._show(label)

    def _show(self, label: str) -> None:
        elapsed = time.monotonic() - self.began
        fraction = self.done / self.total
        clock = f"{int(elapsed // 60)}:{int(elapsed % 60):02d}"
        if self.tty:
            filled = int(BAR_WIDTH * fraction)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            line = f"[{bar}] {fraction:4.0%} {clock}  {label}"
            width = 118
            self.stream.write("\r" + line[:width].ljust(width))
            self.stream.flush()
            return
        section = label.split(" · ")[0]
        if section != self._last_section:
            self._last_section = section
            self.stream.write(f"[{fraction:4.0%} {clock}] {section}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
