"""Slot packing: geometry, exact round trips, and that a full-house sum can never carry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocols.packing import DEBT_PROFILE_LAYOUT, FieldSpec, SlotLayout, SlotOverflowError

L = DEBT_PROFILE_LAYOUT


def _max_values(layout: SlotLayout, tokens: int) -> np.ndarray:
    row = [(1 << f.contributor_bits) - 1 for f in layout.fields]
    return np.tile(np.array(row, dtype=np.int64), (tokens, 1))


def _random_values(layout: SlotLayout, tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cols = [rng.integers(0, 1 << f.contributor_bits, size=tokens) for f in layout.fields]
    return np.stack(cols, axis=1).astype(np.int64).reshape(tokens, len(layout.fields))


def test_debt_profile_geometry() -> None:
    assert [f.name for f in L.fields] == ["debt_fen", "active_loans", "has_active_loan"]
    assert L.headroom_bits == 7  # ceil(log2(65))
    assert [L.slot_bits(f) for f in L.fields] == [43, 19, 8]
    assert L.slot_bits("debt_fen") == 43
    assert L.token_bits == 70
    assert L.tokens_per_plaintext(2048) == 29
    assert L.tokens_per_plaintext(3072) == 43
    assert L.max_sum("has_active_loan") == 64
    assert L.max_sum("debt_fen") == 64 * (2**36 - 1)
    assert L.plaintexts_for(2000, 2048) == 69


@pytest.mark.parametrize("key_bits", [1024, 2048, 3072])
def test_full_plaintext_stays_below_half_the_modulus_range(key_bits: int) -> None:
    tpp = L.tokens_per_plaintext(key_bits)
    (p,) = L.pack(_max_values(L, tpp), key_bits)
    assert p.bit_length() <= key_bits - 1
    # The sum of max_contributors such plaintexts still fits: this is what decryption sees.
    assert (p * L.max_contributors).bit_length() <= key_bits - 1


@pytest.mark.parametrize("tokens", [0, 1, 28, 29, 30, 100])
def test_round_trip(tokens: int) -> None:
    values = _random_values(L, tokens, seed=tokens)
    packed = L.pack(values, 2048)
    assert len(packed) == -(-tokens // 29)
    back = L.unpack(packed, tokens, 2048)
    assert back.dtype == np.int64 and back.shape == (tokens, 3)
    np.testing.assert_array_equal(back, values)


def test_max_contributors_at_max_values_sum_exactly() -> None:
    """The no-overflow proof: 64 platforms, every slot at 2**bits - 1, decodes exactly."""
    tokens = 61  # three plaintexts at 2048 bits, the last one padded
    packed = L.pack(_max_values(L, tokens), 2048)
    total = [p * L.max_contributors for p in packed]  # == the sum of 64 identical vectors
    back = L.unpack(total, tokens, 2048)
    expected = np.array([L.max_sum(f) for f in L.fields], dtype=np.int64)
    np.testing.assert_array_equal(back, np.tile(expected, (tokens, 1)))


def test_one_contributor_too_many_is_refused() -> None:
    packed = L.pack(_max_values(L, 3), 2048)
    with pytest.raises(SlotOverflowError, match="exceeds max_sum"):
        L.unpack([p * (L.max_contributors + 1) for p in packed], 3, 2048)
    with pytest.raises(SlotOverflowError, match="65 contributors"):
        L.check_contributors(65)
    L.check_contributors(64)


def test_pack_rejects_out_of_bound_values_naming_row_field_value_and_bound() -> None:
    values = _random_values(L, 10)
    values[7, 1] = 4096
    with pytest.raises(SlotOverflowError) as exc:
        L.pack(values, 2048)
    msg = str(exc.value)
    assert "token row 7" in msg and "'active_loans'" in msg and "4096" in msg and "2**12" in msg
    values[7, 1] = 0
    values[3, 0] = -1
    with pytest.raises(SlotOverflowError, match=r"token row 3, field 'debt_fen': value -1"):
        L.pack(values, 2048)
    values[3, 0] = 0
    values[9, 2] = 2
    with pytest.raises(SlotOverflowError, match=r"row 9, field 'has_active_loan'"):
        L.pack(values, 2048)
    assert isinstance(SlotOverflowError("x"), ValueError)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, bool, object])
def test_pack_rejects_non_integer_dtypes(dtype: type) -> None:
    values = np.zeros((2, 3), dtype=dtype)
    with pytest.raises(SlotOverflowError, match="integer dtype"):
        L.pack(values, 2048)


def test_pack_accepts_unsigned_and_narrow_integer_dtypes() -> None:
    values = np.array([[5, 3, 1], [255, 0, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(L.unpack(L.pack(values, 2048), 2, 2048), values)
    big = np.array([[2**36 - 1, 1, 1]], dtype=np.uint64)
    np.testing.assert_array_equal(L.unpack(L.pack(big, 2048), 1, 2048), big.astype(np.int64))


def test_pack_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        L.pack(np.zeros((4, 2), dtype=np.int64), 2048)
    with pytest.raises(ValueError, match="shape"):
        L.pack(np.zeros(3, dtype=np.int64), 2048)


def test_unpack_rejects_bits_beyond_the_packed_width() -> None:
    width = 29 * 70
    with pytest.raises(SlotOverflowError, match="beyond the packed width"):
        L.unpack([1 << width], 29, 2048)
    with pytest.raises(SlotOverflowError, match="beyond the packed width"):
        L.unpack([-1], 29, 2048)
    # Padding slots of the last plaintext must be empty.
    with pytest.raises(SlotOverflowError, match="padding"):
        L.unpack([1 << (5 * 70)], 5, 2048)


def test_unpack_detects_carry_out_of_the_top_slot() -> None:
    """With too many contributors the top slot carries beyond the width: refused."""
    tiny = SlotLayout(fields=(FieldSpec(name="x", contributor_bits=1),), max_contributors=1)
    assert tiny.slot_bits("x") == 2
    tpp = tiny.tokens_per_plaintext(64)
    (p,) = tiny.pack(np.ones((tpp, 1), dtype=np.int64), 64)
    with pytest.raises(SlotOverflowError):
        tiny.unpack([p * 4], tpp, 64)


def test_unpack_rejects_wrong_plaintext_count() -> None:
    with pytest.raises(ValueError, match="need 2 plaintexts"):
        L.unpack([0], 30, 2048)


def test_layout_validation() -> None:
    with pytest.raises(ValidationError, match="unique"):
        SlotLayout(
            fields=(
                FieldSpec(name="a", contributor_bits=3),
                FieldSpec(name="a", contributor_bits=4),
            ),
            max_contributors=2,
        )
    with pytest.raises(ValidationError, match="int64"):
        SlotLayout(fields=(FieldSpec(name="a", contributor_bits=60),), max_contributors=64)
    with pytest.raises(ValidationError):
        SlotLayout(fields=(FieldSpec(name="a", contributor_bits=3),), max_contributors=0)
    with pytest.raises(ValidationError):
        SlotLayout(fields=(), max_contributors=3)
    with pytest.raises(ValidationError):
        FieldSpec(name="a", contributor_bits=0)
    with pytest.raises(ValidationError):
        L.max_contributors = 1000  # type: ignore[misc]  # frozen
    with pytest.raises(ValueError, match="cannot hold one"):
        L.tokens_per_plaintext(64)
    with pytest.raises(KeyError):
        L.slot_bits("nope")


@st.composite
def _layout_and_contributions(draw: st.DrawFn) -> tuple[SlotLayout, int, list[np.ndarray]]:
    n_fields = draw(st.integers(1, 4))
    bits = draw(st.lists(st.integers(1, 24), min_size=n_fields, max_size=n_fields))
    max_contributors = draw(st.integers(1, 70))
    layout = SlotLayout(
        fields=tuple(FieldSpec(name=f"f{i}", contributor_bits=b) for i, b in enumerate(bits)),
        max_contributors=max_contributors,
    )
    key_bits = draw(st.sampled_from([256, 1024, 2048]))
    tokens = draw(st.integers(0, 3 * layout.tokens_per_plaintext(key_bits) + 1))
    k = draw(st.integers(1, max_contributors))
    contributions = []
    for _ in range(k):
        cols = [
            draw(st.lists(st.integers(0, (1 << b) - 1), min_size=tokens, max_size=tokens))
            for b in bits
        ]
        contributions.append(np.array(cols, dtype=np.int64).T.reshape(tokens, n_fields))
    return layout, key_bits, contributions


@settings(max_examples=60, deadline=None)
@given(_layout_and_contributions())
def test_property_pack_unpack_and_sum(case: tuple[SlotLayout, int, list[np.ndarray]]) -> None:
    layout, key_bits, contributions = case
    tokens = contributions[0].shape[0]
    packed = [layout.pack(v, key_bits) for v in contributions]
    np.testing.assert_array_equal(layout.unpack(packed[0], tokens, key_bits), contributions[0])
    summed = [sum(ps) for ps in zip(*packed, strict=True)]
    assert all(s.bit_length() <= key_bits - 1 for s in summed)
    np.testing.assert_array_equal(
        layout.unpack(summed, tokens, key_bits), np.sum(contributions, axis=0)
    )
