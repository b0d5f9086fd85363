"""A platform's answering policy: which lenders it serves, for what, and how much.

MISSION.md lets each platform "decide which queries it answers". This is the file in which it
says so. ``fedcredit deploy init`` writes one per platform and this model validates it; the
ClientApp does not enforce it yet (later work), so the schema is strict now (unknown keys are
refused) to keep a typo from silently becoming an unenforced rule later.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PURPOSES = ("underwriting", "account-review")


class PlatformPolicy(BaseModel):
    """``policy.toml``: the lenders and purposes a platform answers, and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lenders: list[str] = Field(min_length=1, description="lender ids whose queries it answers")
    purposes: list[str] = Field(min_length=1, description="query purposes it accepts")
    rate_limit_per_lender_per_hour: int = Field(gt=0, le=10_000_000)
    max_batch: int = Field(gt=0, le=10_000_000, description="most applicants in one query")

    @field_validator("lenders", "purposes")
    @classmethod
    def _distinct_names(cls, values: list[str]) -> list[str]:
        if any(not value.strip() for value in values):
            raise ValueError("names must not be empty")
        if len(set(values)) != len(values):
            raise ValueError("names must be distinct")
        return values

    def to_toml(self) -> str:
        """The policy as TOML (tomllib reads; the stdlib writes none, and we need only this)."""

        def strings(values: list[str]) -> str:
            for value in values:
                if '"' in value or "\\" in value or "\n" in value:
                    raise ValueError(f"cannot write {value!r} as a plain TOML string")
            return "[" + ", ".join(f'"{value}"' for value in values) + "]"

        return (
            "# fedcredit platform policy (validated by fedcredit.deploy.policy.PlatformPolicy;\n"
            "# not enforced by the ClientApp yet).\n"
            f"lenders = {strings(self.lenders)}\n"
            f"purposes = {strings(self.purposes)}\n"
            f"rate_limit_per_lender_per_hour = {self.rate_limit_per_lender_per_hour}\n"
            f"max_batch = {self.max_batch}\n"
        )


def load_policy(path: Path) -> PlatformPolicy:
    """Read and validate a ``policy.toml`` (pydantic's ValidationError names the field)."""
    with path.open("rb") as fh:
        return PlatformPolicy.model_validate(tomllib.load(fh))


def write_policy(path: Path, policy: PlatformPolicy) -> None:
    text = policy.to_toml()
    if PlatformPolicy.model_validate(tomllib.loads(text)) != policy:  # round trip, or refuse
        raise ValueError(f"{path}: the policy does not survive a TOML round trip")
    path.write_text(text, encoding="utf-8")
