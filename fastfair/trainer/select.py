"""Model selection: the epoch whose validation metric is best is kept (its checkpoint is never
rotated away) and the final evaluation runs at it."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..metrics import METRICS, higher_is_better


def check_name(select_by: str | None) -> None:
    if select_by not in (None, "auto") and select_by not in METRICS:
        raise ValueError(f"select_by must be 'auto', null or one of {sorted(METRICS)}, "
                         f"got {select_by!r}")


@dataclass
class Selection:
    metric: str | None  # None: the last epoch
    higher: bool = True

    @classmethod
    def resolve(cls, select_by: str | None, num_groups: int) -> "Selection":
        if select_by == "auto":
            select_by = "worst_group_accuracy" if num_groups > 1 else None
        if select_by is None:
            return cls(None)
        check_name(select_by)
        return cls(select_by, higher_is_better(select_by))

    def update(self, state, val: dict) -> bool:
        """Record this epoch (``state.epoch`` just validated) if it is the best so far."""
        if self.metric is None:
            return False
        value = val.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        best = state.best_value
        # Ties go to the later epoch: it has trained longer, and a metric that never moves (worst-group
        # accuracy 0 with 100 tiny groups, say) must not pin the run at its first epoch.
        if best is not None and not (value >= best if self.higher else value <= best):
            return False
        state.best_value, state.best_epoch, state.best_step = float(value), state.epoch, state.step
        return True

    def record(self, state) -> dict:
        """Which epoch the final evaluation used, and why."""
        if self.metric is None or state.best_epoch is None:
            why = "select_by is null" if self.metric is None else f"no finite val/{self.metric}"
            return {"selected_epoch": state.epoch - 1, "selected_step": state.step, "select_by": None,
                    "reason": f"the last epoch ({why})"}
        return {"selected_epoch": state.best_epoch, "selected_step": state.best_step,
                "select_by": f"val/{self.metric}", "value": state.best_value,
                "reason": f"{'highest' if self.higher else 'lowest'} val/{self.metric} of {state.epoch} epochs"}
