"""Early stopping: the same decision on every worker, from the all-reduced validation metric."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.config import EarlyStoppingSettings


@dataclass
class EarlyStopping:
    """Tracks the best epoch of the monitored metric; `update` says whether to stop."""

    monitor: str = "val_loss"
    patience: int = 2
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0

    @classmethod
    def from_settings(cls, settings: EarlyStoppingSettings, state: dict | None = None):
        stopper = cls(monitor=settings.monitor, patience=settings.patience)
        if state:
            stopper.best = state.get("best")
            stopper.best_epoch = state.get("best_epoch")
            stopper.wait = int(state.get("wait", 0))
        return stopper

    def update(self, epoch: int, record: dict[str, float]) -> tuple[bool, bool]:
        """(this epoch is the best so far, training should stop now)."""
        value = record[self.monitor]
        lower_is_better = self.monitor.endswith("loss")
        improved = self.best is None or (
            value < self.best if lower_is_better else value > self.best
        )
        if improved:
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return improved, self.wait >= self.patience

    def state(self) -> dict:
        return asdict(self)
