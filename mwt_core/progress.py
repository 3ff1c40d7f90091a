"""Training progress records: what a run reports, and reading records stored by older versions.

Kept free of torch so the API can read stored progress without importing it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    """A progress report; ``test_acc`` is set on epoch ends."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    ce: float
    cohesion_loss: float  # loss terms, not the modularization's cohesion/coupling metrics
    coupling_loss: float
    train_acc: float
    test_acc: float | None
    kernel_rate: float | None
    elapsed_s: float
    eta_s: float
    # Set on epoch ends: accuracy on the run's validation slice (None: no slice).
    val_acc: float | None = None
    # The kernel budget in force (the guard may have relaxed it); None: no budget.
    kernel_budget: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Progress records written before the loss terms were renamed (job rows, model manifests'
# ``history``, checkpoints) used the metric names for them; readers map them forward.
LEGACY_PROGRESS_KEYS = {"cohesion": "cohesion_loss", "coupling": "coupling_loss"}


def progress_record(record: dict[str, Any]) -> dict[str, Any]:
    """A stored progress/history record with today's key names (old records are renamed)."""
    out = dict(record)
    for old, new in LEGACY_PROGRESS_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def budget_text(report: dict[str, Any] | None) -> str:
    """A run's kernel budget for a person (``TrainResult.budget``, a model's ``kernel_budget``
    metric): the share of kernels asked, the share reached, and how often the accuracy guard
    loosened it; ``"none"`` where the run had no budget."""
    if not report or report.get("target_krr") is None or report["target_krr"] >= 1:
        return "none"

    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    text = f"asked {pct(report['target_krr'])}, reached {pct(report.get('kernel_rate'))}"
    if report.get("relaxed"):
        text += f" (the guard loosened it {report['relaxed']}x, to {pct(report.get('final_target'))})"
    return text
