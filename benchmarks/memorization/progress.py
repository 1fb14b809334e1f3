"""One progress display for a whole benchmark: an overall line (training steps and runs done of the
total, with its ETA) above one bar per training run.

Everything is drawn by the process that owns :class:`Progress`; training loops only report events
(``start``, ``advance``, ``end``), in this process or, through :class:`QueueProgress`, from a
worker process (``python -m benchmarks.memorization run`` with ``workers: 2``), so bars of parallel runs never overwrite
each other.
"""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    """Draws the overall line and the per-run bars. ``trainings``: how many training runs the
    benchmark has; ``steps``: their training steps together."""

    def __init__(self, trainings: int, steps: int, enabled: bool = True, desc: str = "benchmark"):
        self.enabled, self.trainings, self.done = enabled, trainings, 0
        self.overall = tqdm(total=steps, desc=desc, unit="step", position=0, dynamic_ncols=True, mininterval=2.0,
                            disable=not enabled)
        self.bars: dict[str, tqdm] = {}
        self.remaining: dict[str, int] = {}
        self._postfix()

    def _postfix(self) -> None:
        self.overall.set_postfix_str(f"runs {self.done}/{self.trainings} done", refresh=False)

    def start(self, label: str, total: int) -> None:
        self.remaining[label] = total
        self.bars[label] = tqdm(total=total, desc=label, unit="step", position=1 + len(self.bars), leave=True,
                                dynamic_ncols=True, mininterval=2.0, disable=not self.enabled)

    def advance(self, label: str, n: int = 1, loss: float | None = None) -> None:
        bar = self.bars[label]
        bar.update(n)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.remaining[label] -= n
        self.overall.update(n)

    def end(self, label: str) -> None:
        """A run ended (a short stream may end it early: its steps left count as done)."""
        left = self.remaining.pop(label, 0)
        if left > 0:
            self.overall.update(left)
        self.bars[label].close()
        self.done += 1
        self._postfix()
        self.overall.refresh()

    def handle(self, event: tuple) -> None:
        """An event from :class:`QueueProgress`: ``(method name, *arguments)``."""
        getattr(self, event[0])(*event[1:])

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


class QueueProgress:
    """:class:`Progress`'s methods in a worker process: each call is put on ``queue`` as
    ``("progress", (method name, *arguments))`` for the owner to draw."""

    def __init__(self, queue):
        self.queue = queue

    def start(self, label: str, total: int) -> None:
        self.queue.put(("progress", ("start", label, total)))

    def advance(self, label: str, n: int = 1, loss: float | None = None) -> None:
        self.queue.put(("progress", ("advance", label, n, loss)))

    def end(self, label: str) -> None:
        self.queue.put(("progress", ("end", label)))
