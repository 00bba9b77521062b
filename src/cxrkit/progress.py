"""Progress of a long scoring loop as a log line every half minute: `cxr predict` and the
evaluation were silent for minutes on large sets, and CI kills a job that prints nothing
for ten."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("cxrkit.progress")

EVERY_SECONDS = 30.0


class ScoringProgress:
    """`done(n)` after each batch: a line "scored 3,200/20,000 films, ~240 s left" at most
    every `every` seconds, none for a loop shorter than that."""

    def __init__(self, total: int, what: str = "films", every: float | None = None):
        self.total, self.what = total, what
        self.every = EVERY_SECONDS if every is None else every
        self.start = self.last = time.monotonic()
        self.count = 0

    def done(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last < self.every or self.count >= self.total:
            return
        self.last = now
        left = (self.total - self.count) * (now - self.start) / self.count
        log.info("scored %s/%s %s, ~%.0f s left", f"{self.count:,}", f"{self.total:,}",
                 self.what, left)
