"""Sample-level differential privacy for a platform's local training: DP-SGD with Opacus.

Each platform trains with DP-SGD (per-sample gradient clipping to ``clip_norm``, Gaussian
noise of ``noise_multiplier * clip_norm`` on every batch's summed gradient, batches drawn by
Poisson sampling) through Opacus, and accounts for it with Opacus' RDP accountant. The
guarantee is per training row of that platform, against everyone who sees what the platform
sends: every round's model update is a post-processing of the DP-SGD steps, and the
accountant composes every step of every round.

On a SuperNode every message starts a fresh ClientApp process, so nothing can carry an
accountant from one round to the next. The noise multiplier is therefore fixed up front from
the whole schedule the bureau announces (rounds x local epochs x steps per epoch, at the
platform's own sampling rate): ``plan`` is a pure function of those numbers, so every round
of a platform computes the same noise multiplier, and the accountant of round ``r`` starts
from the ``(r - 1) x steps`` steps the earlier rounds took.

The noise and the Poisson sampling draw from a generator seeded from the operating system's
entropy, never from the run's seed: the bureau knows that seed, and noise it can predict it
can subtract. Opacus' ``secure_mode`` (a cryptographic RNG against floating-point attacks)
needs ``torchcsprng``, which has no wheels for current torch; it is not used.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

ACCOUNTANT = "rdp"
MECHANISM = "DP-SGD (Opacus): per-sample clipping, Gaussian noise, Poisson sampling"


@dataclass(frozen=True)
class DPPlan:
    """The noise one platform adds to reach (epsilon, delta) over the whole schedule."""

    epsilon: float
    delta: float
    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    total_steps: int

    def spent(self, steps: int) -> float:
        """Epsilon spent after ``steps`` DP-SGD steps of this plan (Opacus' RDP accountant)."""
        from opacus.accountants import create_accountant

        if steps <= 0:
            return 0.0
        accountant = create_accountant(mechanism=ACCOUNTANT)
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(delta=self.delta))


def plan(
    epsilon: float,
    delta: float,
    clip_norm: float,
    rows: int,
    batch_size: int,
    epochs: int,
    rounds: int,
) -> DPPlan:
    """The noise multiplier that spends exactly (at most) ``epsilon`` over every round.

    The sampling rate is Opacus' own for a loader of ``rows`` rows in batches of
    ``batch_size`` (one over the number of batches), so the plan and the accountant agree.
    """
    if not (epsilon > 0 and 0 < delta < 1 and clip_norm > 0):
        raise ValueError("DP needs epsilon > 0, 0 < delta < 1 and a positive clipping norm")
    if rows < 1 or batch_size < 1 or epochs < 1 or rounds < 1:
        raise ValueError("DP needs at least one row, batch, epoch and round")
    from opacus.accountants.utils import get_noise_multiplier

    batches = math.ceil(rows / batch_size)
    sample_rate = 1.0 / batches
    steps_per_round = epochs * batches
    total = rounds * steps_per_round
    sigma = get_noise_multiplier(
        target_epsilon=epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=total,
        accountant=ACCOUNTANT,
        epsilon_tolerance=0.005,
    )
    return DPPlan(
        epsilon=epsilon,
        delta=delta,
        clip_norm=clip_norm,
        noise_multiplier=float(sigma),
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        total_steps=total,
    )


Batches = Callable[[], Iterator[tuple[Any, Any]]]

# Opacus' hooks see inputs that need no gradient (the rows), which torch reports on every
# backward pass; Opacus only needs the parameters' gradients.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)


class _Rows:
    """Rows as a map-style dataset that hands out a whole batch at once (``__getitems__``):
    torch's default fetch of one row at a time made DP-SGD ten times slower than SGD."""

    def __init__(self, X: Any, y: Any) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.X[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[Any, Any]:
        return self.X[indices], self.y[indices]


def _as_batch(batch: tuple[Any, Any]) -> tuple[Any, Any]:
    return batch


@dataclass
class DPSGD:
    """One round of DP-SGD under ``plan``, having already taken ``steps_before`` steps.

    ``protocols.model.train_local`` calls ``make_private`` to swap in Opacus' model wrapper,
    optimiser and Poisson loader, then ``close``; ``spent_epsilon`` is then what the
    accountant says the platform has spent so far, this round included.
    """

    plan: DPPlan
    steps_before: int = 0
    steps_taken: int = 0
    _engine: Any = field(default=None, repr=False)

    def make_private(
        self, model: Any, optimiser: Any, X: Any, y: Any, batch_size: int
    ) -> tuple[Any, Any, Batches]:
        import torch
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        noise = torch.Generator().manual_seed(secrets.randbits(63))
        sampling = torch.Generator().manual_seed(secrets.randbits(63))
        loader = DataLoader(
            _Rows(X, y), batch_size=batch_size, generator=sampling, collate_fn=_as_batch
        )
        self._engine = PrivacyEngine(accountant=ACCOUNTANT)
        if self.steps_before:
            self._engine.accountant.history = [
                (self.plan.noise_multiplier, self.plan.sample_rate, self.steps_before)
            ]
        net, dp_optimiser, dp_loader = self._engine.make_private(
            module=model,
            optimizer=optimiser,
            data_loader=loader,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.clip_norm,
            poisson_sampling=True,
            noise_generator=noise,
        )
        if not math.isclose(1.0 / len(dp_loader), self.plan.sample_rate):
            raise RuntimeError("Opacus' sampling rate differs from the DP plan's")

        def batches() -> Iterator[tuple[Any, Any]]:
            for xb, yb in dp_loader:
                self.steps_taken += 1
                yield xb, yb

        return net, dp_optimiser, batches

    def close(self, net: Any) -> None:
        """Remove Opacus' hooks, so the plain model can be saved and sent."""
        net._close()

    @property
    def spent_epsilon(self) -> float:
        if self._engine is None:
            return self.plan.spent(self.steps_before)
        return float(self._engine.accountant.get_epsilon(delta=self.plan.delta))

    def metrics(self) -> dict[str, float | int]:
        """What the platform reports with its update (``dp-*`` train metrics)."""
        return {
            "dp-epsilon-spent": self.spent_epsilon,
            "dp-noise-multiplier": self.plan.noise_multiplier,
            "dp-sample-rate": self.plan.sample_rate,
            "dp-steps": self.steps_before + self.steps_taken,
        }
