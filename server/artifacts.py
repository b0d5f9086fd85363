"""What the bureau keeps from a run: models with their metadata, totals, the run summary.

Every file is written to a temporary name and renamed into place, so a crashed run never
leaves a half-written model or summary behind for someone to load.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch

from protocols.model import TREE_KINDS, build_model, state_fingerprint
from server.training import TrainedModel


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    text = json.dumps(_clean(data), indent=2)
    return _atomic(path, lambda p: p.write_text(text + "\n"))


def model_name(trained: TrainedModel) -> str:
    return f"model-{trained.kind}-{trained.feature_set}"


def save_model(
    out_dir: Path, trained: TrainedModel, platforms: list[dict[str, Any]], metrics: dict[str, Any]
) -> dict[str, str]:
    """``model-<kind>-<features>.pt`` (a torch state dict) and its ``.json`` metadata.

    Boosted trees (kind ``gbdt``) are saved as JSON beside the same metadata
    (``server.boosting.save_boosted``).
    """
    if trained.kind in TREE_KINDS:
        from server.boosting import save_boosted

        return save_boosted(out_dir, trained, platforms, metrics)  # type: ignore[arg-type]
    model = build_model(trained.kind, len(trained.features))
    model.load_state_dict(trained.arrays.to_torch_state_dict())
    name = model_name(trained)
    weights = _atomic(out_dir / f"{name}.pt", lambda p: torch.save(model.state_dict(), p))
    meta = {
        "format": "fedcredit-model/v1",
        "model": trained.kind,
        "feature_set": trained.feature_set,
        "features": trained.features,
        "scaler": trained.scaler.to_dict(),
        # Applied before the scaler: robust = transform(x), input = (robust - mean) / std.
        "robust_transform": trained.robust.to_dict() if trained.robust is not None else None,
        "rounds": trained.rounds,
        "training": trained.convergence(),
        "weights_file": weights.name,
        "weights_sha256": state_fingerprint(model),
        "platforms": [
            {"platform": p["platform"], "fingerprint": p["fingerprint"], "rows": p["train_rows"]}
            for p in platforms
        ],
        "held_out": metrics,
        "history": trained.history,
        "privacy": trained.privacy,
        "secure_aggregation": trained.secure_aggregation,
        "dropped_platforms": trained.dropped,
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "flwr_version": flwr.__version__,
        "torch_version": torch.__version__,
        "output": "log-odds of default; probability = sigmoid(output)",
    }
    meta_path = write_json(out_dir / f"{name}.json", meta)
    return {"weights": str(weights), "metadata": str(meta_path)}
