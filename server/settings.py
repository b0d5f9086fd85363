"""The bureau's run configuration, validated in one place.

Flower hands the ServerApp a flat run config (``[tool.flwr.app.config]`` in pyproject.toml,
overridden by ``flwr run --run-config``); this model names every key, its default and its
bounds, so a typo or an out-of-range value stops the run before any message is sent, with the
key named. pyproject.toml must declare the same keys (Flower ignores overrides of undeclared
keys); a test keeps the two in step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocols.model import parse_model_kinds

STAGES = ("train", "query", "cross")


class SettingsError(ValueError):
    pass


class FederationSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    out_dir: str = Field(default="fedcredit-run", alias="out-dir", min_length=1)
    stages: str = Field(default="train,query,cross")
    model: str = Field(
        default="mlp", description="lr, mlp, gbdt or a comma list; the first is primary"
    )
    num_rounds: int = Field(default=20, alias="num-rounds", ge=1, le=1000)
    local_epochs: int = Field(default=1, alias="local-epochs", ge=1, le=100)
    learning_rate: float = Field(default=0.05, alias="learning-rate", gt=0, le=1)
    lr_schedule: Literal["constant", "cosine"] = Field(default="cosine", alias="lr-schedule")
    batch_size: int = Field(default=256, alias="batch-size", ge=1, le=65536)
    test_share: float = Field(default=0.3, alias="test-share", gt=0, lt=1)
    # Convergence (server/convergence.py): num-rounds is a ceiling once validation-share > 0.
    validation_share: float = Field(default=0.2, alias="validation-share", ge=0, lt=1)
    patience: int = Field(default=5, ge=1, le=1000)
    local_steps: int = Field(default=0, alias="local-steps", ge=0, le=100_000)
    server_optimizer: Literal["fedavg", "fedadam", "fedyogi"] = Field(
        default="fedavg", alias="server-optimizer"
    )
    server_learning_rate: float = Field(default=0.01, alias="server-learning-rate", gt=0, le=1)
    robust_features: bool = Field(default=True, alias="robust-features")
    key_bits: Literal[2048, 3072] = Field(default=2048, alias="key-bits")
    query_batch: int = Field(default=3000, alias="query-batch", ge=1, le=50_000)
    query_limit: int = Field(default=0, alias="query-limit", ge=0)
    min_nodes: int = Field(default=2, alias="min-nodes", ge=1, le=64)
    min_participants: int = Field(default=3, alias="min-participants", ge=2, le=64)
    query_timeout: float = Field(default=300.0, alias="query-timeout", gt=0)
    keyholder_url: str = Field(default="", alias="keyholder-url")
    keyholder_token_file: str = Field(default="", alias="keyholder-token-file")
    keyholder_ca: str = Field(default="", alias="keyholder-ca")
    node_wait: float = Field(default=120.0, alias="node-wait", gt=0)
    timeout: float = Field(default=1800.0, gt=0)
    seed: int = Field(default=0, ge=0)
    # Mask every training sum (protocols/secure_sum.py); false keeps the plain replies.
    secure_aggregation: bool = Field(default=True, alias="secure-aggregation")
    # Federated gradient boosting (model kind gbdt; protocols/gbdt.py).
    gbdt_trees: int = Field(default=100, alias="gbdt-trees", ge=1, le=2000)
    gbdt_depth: int = Field(default=5, alias="gbdt-depth", ge=1, le=8)
    gbdt_learning_rate: float = Field(default=0.1, alias="gbdt-learning-rate", gt=0, le=1)
    gbdt_bins: int = Field(default=64, alias="gbdt-bins", ge=2, le=255)
    # A path to serve.toml turns the run into the standing lender service (docs/lender-query.md).
    serve_config: str = Field(default="", alias="serve-config")
    # Sample-level DP-SGD on every platform (docs/privacy.md): 0 is off.
    dp_epsilon: float = Field(default=0.0, alias="dp-epsilon", ge=0, le=1000)
    dp_delta: float = Field(default=1e-5, alias="dp-delta", gt=0, lt=1)
    # A trained MLP's per-row gradient norms on the default data: about 5 for defaulters,
    # 0.15 for the rest; 3 clips the largest without drowning the rest in noise.
    dp_clip_norm: float = Field(default=3.0, alias="dp-clip-norm", gt=0, le=1000)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: str) -> str:
        names = [s.strip() for s in value.split(",") if s.strip()]
        unknown = [s for s in names if s not in STAGES]
        if unknown or not names:
            raise ValueError(f"unknown stages {unknown}: choose from {', '.join(STAGES)}")
        # "cross" without "query" trains on totals delivered earlier in the same run (kept in
        # each node's state: the demo's DP federations after the bureau's run); a node that
        # has none refuses ("cross-platform features requested before ... its totals").
        return ",".join(names)

    @field_validator("model")
    @classmethod
    def _models(cls, value: str) -> str:
        return parse_model_kinds(value)

    @property
    def stage_list(self) -> list[str]:
        return self.stages.split(",")

    @property
    def models(self) -> list[str]:
        return self.model.split(",")

    @classmethod
    def from_run_config(cls, run_config: dict[str, object]) -> FederationSettings:
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as exc:
            problems = "; ".join(
                f"run config {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise SettingsError(problems) from None

    def as_run_config(self) -> dict[str, object]:
        return self.model_dump(by_alias=True)
