"""Step progress on rank 0: a tqdm bar on a terminal, plain periodic lines in a log file (Slurm ``.out``),
where a bar's carriage returns would pile up into one unreadable line."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, desc: str, total: int, initial: int, enabled: bool, every_s: float = 30.0):
        self.desc, self.total, self.enabled, self.every_s = desc, total, enabled, every_s
        self.tty = enabled and sys.stdout.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) if self.tty else None
        self.start, self.start_step = time.monotonic(), initial
        self.last_line = self.start

    def update(self, step: int, loss: float) -> None:
        """Step `step` (1-based) is done with this loss."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            return
        now = time.monotonic()
        if self.enabled and (now - self.last_line >= self.every_s or step == self.total):
            self.last_line = now
            rate = (step - self.start_step) / max(now - self.start, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            print(
                f"[{self.desc}] step {step}/{self.total} loss {loss:.4f} {rate:.2f} steps/s eta {eta:.0f} s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
