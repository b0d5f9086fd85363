"""A platform's answering policy: which lenders it serves, for what, and how much.

MISSION.md lets each platform "decide which queries it answers". This is the file in which it
says so. ``fedcredit deploy init`` writes one per platform and this model validates it; the
ClientApp enforces it on every lender question (``clients/lender_policy.py``); the schema is
strict (unknown keys are refused) so that a typo never becomes a silently unenforced rule.
``lender_keys`` pins each served lender's Ed25519 public key (hex), with which the platform
verifies the lender's signed consent records.
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
    lender_keys: dict[str, str] = Field(
        default_factory=dict, description="lender id -> Ed25519 public key (64 hex characters)"
    )

    @field_validator("lender_keys")
    @classmethod
    def _hex_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for name, key in keys.items():
            if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                raise ValueError(f"lender {name!r}: key must be 64 lower-case hex characters")
        return keys

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
            "# enforced by the ClientApp on every lender question).\n"
            f"lenders = {strings(self.lenders)}\n"
            f"purposes = {strings(self.purposes)}\n"
            f"rate_limit_per_lender_per_hour = {self.rate_limit_per_lender_per_hour}\n"
            f"max_batch = {self.max_batch}\n"
            + (
                "\n[lender_keys]\n"
                + "".join(f'{strings([k])[1:-1]} = "{v}"\n' for k, v in self.lender_keys.items())
                if self.lender_keys
                else ""
            )
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
