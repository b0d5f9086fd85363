"""Fixed-width slot packing: many tokens' integer debt profiles in one Paillier plaintext.

A Paillier ciphertext at 2048 bits costs one 4096-bit modular exponentiation to make and 512
bytes to send, whatever the plaintext. A borrower's debt profile is three small integers, so
encrypting them one by one wastes almost all of the ~2047 usable plaintext bits. Packing puts
many tokens' profiles side by side in one plaintext, and because Paillier addition is integer
addition of the plaintexts (mod n), adding packed ciphertexts adds every slot at once, as long
as no slot's sum carries into its neighbour and the whole sum stays below n.

Layout
    Token ``j`` of a plaintext occupies bits ``[j*T, (j+1)*T)`` where ``T = token_bits``;
    inside a token, field 0 takes the lowest bits, then field 1, and so on. A field whose single
    platform value lies in ``[0, 2**b)`` gets a slot of ``b + h`` bits, where the headroom is
    ``h = ceil(log2(max_contributors + 1))`` (``max_contributors.bit_length()``). The sum of at
    most ``max_contributors`` values is at most ``max_contributors * (2**b - 1) < 2**(b + h)``,
    so it always fits its slot: no carry, ever. (For a power-of-two count this is one bit more
    than strictly needed; the simple rule is kept because it is obviously safe.)

    Tokens per plaintext: ``floor((key_bits - 1) / token_bits)``. The packed integer, and any
    sum of at most ``max_contributors`` packed integers, is then below ``2**(key_bits - 1)``,
    and a ``key_bits``-bit modulus ``n`` satisfies ``2**(key_bits - 1) <= n``, so the sum is
    recovered exactly by decryption (which works mod n).

``DEBT_PROFILE_LAYOUT`` (max_contributors = 64, headroom 7 bits)
    field             contributor bound  slot bits  meaning
    debt_fen          < 2**36            43         outstanding principal in fen, up to
                                                    about RMB 687 million per platform
    active_loans      < 2**12            19         open loans (up to 4,095 per platform)
    has_active_loan   < 2**1             8          0 or 1; the sum counts his lenders

    70 bits per token, hence 29 tokens per plaintext at 2048 bits (2030 of 2047 bits used) and
    43 at 3072 bits (3010 of 3071). A 2,000-token query is 69 ciphertexts instead of 6,000.

Why the bounds are enforced here
    ``phe``'s own overflow check is a heuristic on its *encoding* layer (a decrypted value
    between ``n/3`` and ``2n/3`` is called an overflow); it knows nothing about slots, so a
    slot that overflows into its neighbour would decrypt to a plausible, silently wrong
    figure. Hence ``pack`` refuses any value outside ``[0, 2**contributor_bits)`` (and any
    non-integer array, where a float could hide a fraction or a NaN), and ``unpack`` refuses a
    plaintext with bits above the packed width, non-zero padding slots or a slot above
    ``max_sum(field)``. ``unpack`` can only *detect* some excesses (a carry between two inner
    slots is invisible after the fact), so callers must also keep the number of contributors
    to at most ``max_contributors`` (``check_contributors``); the encryption layer uses raw
    integer plaintexts and never ``phe``'s encoding, whose ``n/3`` rule would misread packed
    values.

Masks (key holder)
    The key holder must learn only sums. A later protocol step adds an additive mask to each
    platform's *whole packed plaintext* modulo n (masks that sum to 0 mod n over the
    platforms). The decrypted total is then ``(sum of packed values + sum of masks) mod n =
    sum of packed values`` because that sum is below ``2**(key_bits - 1) <= n``: the slot
    structure survives untouched, while a single platform's masked plaintext is uniform noise
    mod n with no visible slots.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# unpack returns int64, so every slot (and so every sum) must fit a signed 64-bit integer.
MAX_SLOT_BITS = 63


class SlotOverflowError(ValueError):
    """A value that does not fit its slot, or a decrypted sum that cannot be a valid one."""


class FieldSpec(BaseModel):
    """One integer field of a token's profile; each platform's value is in [0, 2**bits)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    contributor_bits: int = Field(ge=1, le=MAX_SLOT_BITS)


class SlotLayout(BaseModel):
    """The packing contract shared by every platform and the bureau for one kind of query."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fields: tuple[FieldSpec, ...] = Field(min_length=1)
    max_contributors: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> SlotLayout:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"field names must be unique: {names}")
        for f in self.fields:
            if self.slot_bits(f) > MAX_SLOT_BITS:
                raise ValueError(
                    f"field {f.name!r}: slot of {self.slot_bits(f)} bits exceeds "
                    f"{MAX_SLOT_BITS} (sums are returned as int64)"
                )
        return self

    # ------------------------------------------------------------------ geometry

    @property
    def headroom_bits(self) -> int:
        """``ceil(log2(max_contributors + 1))``: room for the sum's extra bits in every slot."""
        return self.max_contributors.bit_length()

    def _field(self, field: str | FieldSpec) -> FieldSpec:
        if isinstance(field, FieldSpec):
            if field not in self.fields:
                raise KeyError(f"field {field.name!r} is not part of this layout")
            return field
        for f in self.fields:
            if f.name == field:
                return f
        raise KeyError(f"no field {field!r}; fields are {[f.name for f in self.fields]}")

    def slot_bits(self, field: str | FieldSpec) -> int:
        """Width of the field's slot: contributor bits plus headroom."""
        return self._field(field).contributor_bits + self.headroom_bits

    def max_sum(self, field: str | FieldSpec) -> int:
        """The largest value a decrypted slot can legitimately hold."""
        return self.max_contributors * ((1 << self._field(field).contributor_bits) - 1)

    @property
    def token_bits(self) -> int:
        """Bits one token's profile occupies in a plaintext."""
        return sum(self.slot_bits(f) for f in self.fields)

    def tokens_per_plaintext(self, key_bits: int) -> int:
        """``floor((key_bits - 1) / token_bits)``, so every packed sum is < 2**(key_bits-1) <= n.

        Raises ValueError when not even one token fits.
        """
        tpp = (key_bits - 1) // self.token_bits
        if tpp < 1:
            raise ValueError(f"a {key_bits}-bit key cannot hold one {self.token_bits}-bit token")
        return tpp

    def plaintexts_for(self, tokens: int, key_bits: int) -> int:
        """How many plaintexts (and so ciphertexts) ``tokens`` tokens need."""
        return -(-tokens // self.tokens_per_plaintext(key_bits))

    def check_contributors(self, count: int) -> None:
        """Refuse to combine more contributions than the headroom was sized for."""
        if not 1 <= count <= self.max_contributors:
            raise SlotOverflowError(
                f"{count} contributors, but this layout's headroom allows 1 to "
                f"{self.max_contributors}"
            )

    # ------------------------------------------------------------------ pack / unpack

    def pack(self, values: np.ndarray, key_bits: int) -> list[int]:
        """Pack rows of per-token values (shape ``(tokens, len(fields))``) into plaintexts.

        Returns ``ceil(tokens / tokens_per_plaintext)`` Python ints; the last one is padded
        with zero slots. Raises SlotOverflowError for a non-integer array or any value
        outside ``[0, 2**contributor_bits)``, naming the row, field, value and bound.
        """
        values = np.asarray(values)
        n_fields = len(self.fields)
        if values.ndim != 2 or values.shape[1] != n_fields:
            raise ValueError(f"values must have shape (tokens, {n_fields}), got {values.shape}")
        if not np.issubdtype(values.dtype, np.integer):
            raise SlotOverflowError(
                f"values must have an integer dtype, got {values.dtype} "
                "(floats may hide fractions or NaN; cast explicitly after checking)"
            )
        for col, f in enumerate(self.fields):
            bound = 1 << f.contributor_bits
            column = values[:, col]
            # bound <= 2**62 (slots are <= 63 bits with >= 1 bit of headroom); NumPy compares
            # any integer dtype against a Python int exactly, even one its dtype cannot hold.
            bad = (column < 0) | (column >= bound)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise SlotOverflowError(
                    f"token row {row}, field {f.name!r}: value {int(column[row])} is outside "
                    f"[0, 2**{f.contributor_bits}) = [0, {bound})"
                )
        tpp = self.tokens_per_plaintext(key_bits)
        shifts = self._field_shifts()
        tb = self.token_bits
        plaintexts: list[int] = []
        rows = values.tolist()  # Python ints: exact at any width
        for start in range(0, len(rows), tpp):
            acc = 0
            for j, row in enumerate(rows[start : start + tpp]):
                token = 0
                for v, s in zip(row, shifts, strict=True):
                    token |= v << s
                acc |= token << (j * tb)
            plaintexts.append(acc)
        return plaintexts

    def unpack(self, plaintexts: list[int], tokens: int, key_bits: int) -> np.ndarray:
        """Split decrypted (summed) plaintexts back into an int64 array ``(tokens, F)``.

        Raises SlotOverflowError when a plaintext has bits beyond the packed width, a padding
        slot is non-zero, or a slot exceeds ``max_sum(field)``: each means more contributors
        than the layout allows, a mask that did not cancel, or a corrupt ciphertext.
        """
        tpp = self.tokens_per_plaintext(key_bits)
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        expected = -(-tokens // tpp)  # integer ceiling: exact for any token count
        if len(plaintexts) != expected:
            raise ValueError(
                f"{tokens} tokens need {expected} plaintexts at {key_bits} bits, "
                f"got {len(plaintexts)}"
            )
        tb = self.token_bits
        width = tpp * tb
        shifts = self._field_shifts()
        masks = [(1 << self.slot_bits(f)) - 1 for f in self.fields]
        limits = [self.max_sum(f) for f in self.fields]
        token_mask = (1 << tb) - 1
        out = np.zeros((tokens, len(self.fields)), dtype=np.int64)
        for i, p in enumerate(plaintexts):
            p = int(p)
            if p < 0 or p >> width:
                raise SlotOverflowError(
                    f"plaintext {i} has {p.bit_length()} bits, beyond the packed width of "
                    f"{width} bits: too many contributors, an uncancelled mask or corruption"
                )
            used = min(tpp, tokens - i * tpp)
            if p >> (used * tb):
                raise SlotOverflowError(
                    f"plaintext {i}: padding slots after token {i * tpp + used - 1} are not zero"
                )
            for j in range(used):
                token = (p >> (j * tb)) & token_mask
                row = i * tpp + j
                for col, (s, m, lim) in enumerate(zip(shifts, masks, limits, strict=True)):
                    v = (token >> s) & m
                    if v > lim:
                        raise SlotOverflowError(
                            f"token row {row}, field {self.fields[col].name!r}: sum {v} exceeds "
                            f"max_sum {lim} for {self.max_contributors} contributors"
                        )
                    out[row, col] = v
        return out

    def _field_shifts(self) -> list[int]:
        shifts, at = [], 0
        for f in self.fields:
            shifts.append(at)
            at += self.slot_bits(f)
        return shifts


DEBT_PROFILE_LAYOUT = SlotLayout(
    fields=(
        FieldSpec(name="debt_fen", contributor_bits=36),
        FieldSpec(name="active_loans", contributor_bits=12),
        FieldSpec(name="has_active_loan", contributor_bits=1),
    ),
    max_contributors=64,
)
"""The encrypted debt-profile query: what one platform says about one token."""


def debt_profile_layout(contributors: int) -> SlotLayout:
    """The debt-profile layout with headroom for exactly ``contributors`` platforms.

    A query's participant set is fixed before anyone encrypts, so each slot needs only
    ``contributors.bit_length()`` bits of headroom rather than the 7 of the 64-platform
    ``DEBT_PROFILE_LAYOUT``: 55 bits a token for three platforms, 37 tokens per 2048-bit
    plaintext instead of 29, and so a fifth fewer ciphertexts to make, send and decrypt.
    """
    return SlotLayout(fields=DEBT_PROFILE_LAYOUT.fields, max_contributors=contributors)
