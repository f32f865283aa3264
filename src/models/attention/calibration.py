"""Choosing AR's strategy, strength and gate on the validation split only.

The grid is every configured candidate strategy at every strength and gate, plus no AR. Each is
scored on the validation split; the objective is the smallest absolute validation excess gap
(``val/excess_gap``: the gap minus the Bayes-optimal gap, when the data set has bounds) or, where
no bounds exist, the smallest absolute ``val/modality_gap``, among the settings whose validation
accuracy is not below the no-AR accuracy minus ``tolerance``. No AR always qualifies, so a choice
always exists (and may be "none"). The record of every candidate's numbers is stored as JSON
beside the checkpoint and in MLflow; ``test``/``predict`` reuse it by the candidate's label, which
is looked up in the configured grid: nothing in the file is instantiated.
"""

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from src.models.attention.reallocator import GATES, Reallocator

#: Label of the no-AR entry of every grid.
NONE = "none"
#: Version of the stored record (bump when its fields change meaning).
RECORD_VERSION = 1

Objective = Literal["auto", "excess_gap", "modality_gap"]


class Calibration:
    """The calibration grid and rule (see the module docstring).

    Args:
        candidates: strategies to try (``class_path`` entries; their own strength and gate are
            replaced by each grid value). Default: ``Reweight`` with the over-relied
            modality's multiplier 0.25 and ``SpanMass`` toward the per-token-fair
            (``proportional``) share.
        strengths: strengths to try, each in ``(0, 1]``.
        gates: gates to try (``all``, ``conflict``).
        tolerance: how much validation accuracy (a fraction, 0.01 = one point) a choice may lose
            against no AR.
        objective: ``auto`` (``excess_gap`` when validation logs it, else ``modality_gap``),
            ``excess_gap`` or ``modality_gap``.
    """

    def __init__(
        self,
        candidates: list[Reallocator] | None = None,
        strengths: list[float] = [0.25, 0.5, 1.0],  # noqa: B006 - jsonargparse default
        gates: list[str] = ["all", "conflict"],  # noqa: B006 - jsonargparse default
        tolerance: float = 0.01,
        objective: Objective = "auto",
    ) -> None:
        if candidates is None:
            from src.models.attention.strategies import Reweight, SpanMass

            candidates = [Reweight(multipliers={"audio": 0.25}), SpanMass(target="proportional")]
        if not candidates:
            raise ValueError("AR calibration needs at least one candidate strategy")
        if not strengths or any(not 0.0 < float(s) <= 1.0 for s in strengths):
            raise ValueError(f"AR calibration strengths must be in (0, 1], got {strengths}")
        if not gates or any(g not in GATES for g in gates):
            raise ValueError(f"AR calibration gates must be among {GATES}, got {gates}")
        if tolerance < 0:
            raise ValueError(f"AR calibration tolerance must be >= 0, got {tolerance}")
        if objective not in ("auto", "excess_gap", "modality_gap"):
            raise ValueError(f"AR calibration objective {objective!r} is not known")
        self.candidates = list(candidates)
        self.strengths = [float(s) for s in strengths]
        self.gates = list(gates)
        self.tolerance = float(tolerance)
        self.objective = objective

    # ---------------------------------------------------------------- the grid

    def grid(self) -> list[Reallocator]:
        """Every candidate at every strength and gate (fresh copies, monitor off)."""
        out = []
        for candidate in self.candidates:
            for gate in self.gates:
                for strength in self.strengths:
                    entry = copy.deepcopy(candidate)
                    entry.set_strength(strength)
                    entry.set_gate(gate)
                    entry.monitor_enabled = False
                    out.append(entry)
        return out

    def identity(self) -> Reallocator:
        """The no-AR choice: the first candidate at strength 0 (its monitor still measures)."""
        entry = copy.deepcopy(self.candidates[0])
        entry.set_strength(0.0)
        entry.set_gate("all")
        return entry

    def signature(self) -> str:
        """A short hash of the grid and rule; a stored record is reused only when it matches."""
        spec = {
            "grid": [e.label() for e in self.grid()],
            "tolerance": self.tolerance,
            "objective": self.objective,
            "version": RECORD_VERSION,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def record_path(self, checkpoint: str | Path | None) -> Path | None:
        """Where the record of ``checkpoint`` lives: ``<ckpt stem>.ar-<signature>.json`` beside
        it (``None`` without a checkpoint: nothing to store it beside)."""
        if not checkpoint:
            return None
        checkpoint = Path(checkpoint)
        return checkpoint.with_name(f"{checkpoint.stem}.ar-{self.signature()}.json")

    # ---------------------------------------------------------------- choosing

    def run(self, evaluate: Callable[[Reallocator | None], dict[str, float]]) -> dict[str, Any]:
        """Score no AR and every grid entry with ``evaluate`` (validation metrics of one
        setting; ``None`` = no AR) and choose. Returns the record (see :meth:`choose`)."""
        baseline = evaluate(None)
        results = [(entry.label(), entry, evaluate(entry)) for entry in self.grid()]
        return self.choose(baseline, [(label, m) for label, _, m in results])

    def choose(
        self, baseline: dict[str, float], results: Sequence[tuple[str, dict[str, float]]]
    ) -> dict[str, Any]:
        """The record: every entry's numbers and the chosen label.

        Args:
            baseline: validation metrics without AR (keys ``val/acc``, ``val/modality_gap``,
                optionally ``val/excess_gap``).
            results: ``(label, metrics)`` of every grid entry, in grid order.
        """
        key = self._objective_key(baseline)
        floor = baseline["val/acc"] - self.tolerance
        rows = [_row(NONE, baseline, key, True)]
        rows += [_row(label, m, key, m["val/acc"] >= floor - 1e-12) for label, m in results]
        best = rows[0]
        for row in rows[1:]:  # strict: ties keep the earlier (weaker, or no AR) entry
            if row["feasible"] and row["objective"] < best["objective"]:
                best = row
        return {
            "version": RECORD_VERSION,
            "signature": self.signature(),
            "objective": key,
            "tolerance": self.tolerance,
            "accuracy_floor": floor,
            "chosen": best["label"],
            "entries": rows,
        }

    def _objective_key(self, baseline: dict[str, float]) -> str:
        if self.objective == "auto":
            key = "val/excess_gap" if "val/excess_gap" in baseline else "val/modality_gap"
        else:
            key = f"val/{self.objective}"
        if key not in baseline or "val/acc" not in baseline:
            raise ValueError(
                f"AR calibration needs {key} and val/acc on the validation split, which gave "
                f"{sorted(baseline)}: the split must hold video_aligned and audio_aligned samples"
            )
        return key

    def lookup(self, record: dict[str, Any], where: str | Path) -> Reallocator:
        """The configured grid entry a stored record chose (nothing from the file is built).

        Raises ``ValueError`` naming the file and field when the record does not fit.
        """
        for field, kind in (("version", int), ("signature", str), ("chosen", str)):
            if not isinstance(record.get(field), kind):
                raise ValueError(f"{where}: field {field!r} must be a {kind.__name__}")
        if record["version"] != RECORD_VERSION or record["signature"] != self.signature():
            raise ValueError(
                f"{where}: field 'signature' ({record['signature']}) does not match this "
                f"calibration grid ({self.signature()})"
            )
        return self.entry(record["chosen"], where)

    def entry(self, label: str, where: str | Path = "the calibration record") -> Reallocator:
        """The grid entry called ``label`` (``none``: :meth:`identity`), monitor as configured."""
        if label == NONE:
            return self.identity()
        for entry, candidate in zip(self.grid(), self._grid_sources(), strict=True):
            if entry.label() == label:
                entry.monitor_enabled = candidate.monitor_enabled
                return entry
        raise ValueError(f"{where}: field 'chosen' ({label!r}) is not in the calibration grid")

    def _grid_sources(self) -> list[Reallocator]:
        return [c for c in self.candidates for _ in self.gates for _ in self.strengths]


def _row(label: str, metrics: dict[str, float], key: str, feasible: bool) -> dict[str, Any]:
    value = float(metrics[key])
    return {
        "label": label,
        "val_acc": float(metrics["val/acc"]),
        "val_modality_gap": float(metrics.get("val/modality_gap", float("nan"))),
        "val_excess_gap": float(metrics["val/excess_gap"]) if "val/excess_gap" in metrics else None,
        "objective": abs(value),
        "feasible": bool(feasible),
    }


def read_record(path: Path) -> dict[str, Any]:
    """A stored calibration record (JSON object), with a clear error naming the file."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON calibration record ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a calibration record must be a JSON object")
    return record
