"""What the bureau records about a DP-SGD run: the budget asked for and what was spent.

Each platform reports its own accounting with every update (``dp-*`` train metrics, see
``protocols.dp``). Averaging those, as Flower does with metrics by default, would describe
no platform: the record keeps the largest epsilon spent (the weakest guarantee any platform
gave) and the range of noise multipliers (each platform's follows from its own row count).
"""

from __future__ import annotations

from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from protocols.dp import ACCOUNTANT, MECHANISM

DP_MAX = ("dp-epsilon-spent", "dp-steps", "dp-sample-rate")
DP_RANGE = "dp-noise-multiplier"


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted mean for ordinary metrics; maximum (and noise range) for ``dp-*``."""
    plain = [
        RecordDict(
            {
                name: MetricRecord({k: v for k, v in rec.items() if not k.startswith("dp-")})
                for name, rec in record.metric_records.items()
            }
        )
        for record in records
    ]
    out = aggregate_metricrecords(plain, weight_key)
    dp = [next(iter(r.metric_records.values())) for r in records]
    dp = [rec for rec in dp if DP_RANGE in rec]
    if dp:
        for key in DP_MAX:
            out[key] = max(rec[key] for rec in dp)  # type: ignore[type-var]
        noise = [float(rec[DP_RANGE]) for rec in dp]  # type: ignore[arg-type]
        out[f"{DP_RANGE}-min"], out[f"{DP_RANGE}-max"] = min(noise), max(noise)
        out["dp-platforms"] = len(dp)
    return out


def dp_metadata(
    epsilon: float, delta: float, clip_norm: float, last_round: MetricRecord | None, platforms: int
) -> dict[str, Any]:
    """The privacy block of a model's metadata and report; ``mechanism`` "none" when off.

    A DP run whose last round's metrics do not show every platform's accounting is refused:
    a model must not be labelled private on the word of some of its platforms.
    """
    if epsilon <= 0:
        return {"mechanism": "none", "epsilon": None, "delta": None}
    if last_round is None or int(last_round.get("dp-platforms", 0)) != platforms:  # type: ignore[arg-type]
        raise ValueError("a DP run in which not every platform reported its privacy accounting")
    return {
        "mechanism": MECHANISM,
        "unit": "one training row (a borrower at one platform)",
        "epsilon": epsilon,
        "delta": delta,
        "clipping_norm": clip_norm,
        "noise_multiplier": {
            "min": round(float(last_round[f"{DP_RANGE}-min"]), 4),  # type: ignore[arg-type]
            "max": round(float(last_round[f"{DP_RANGE}-max"]), 4),  # type: ignore[arg-type]
        },
        "accountant": f"opacus {ACCOUNTANT.upper()}",
        "epsilon_spent": round(float(last_round["dp-epsilon-spent"]), 4),  # type: ignore[arg-type]
        "steps": int(last_round["dp-steps"]),  # type: ignore[arg-type]
        "max_sample_rate": round(float(last_round["dp-sample-rate"]), 6),  # type: ignore[arg-type]
    }
