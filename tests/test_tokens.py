"""Pseudonymous tokens: one person, one token, whatever the spelling; nothing else linkable."""

from __future__ import annotations

import pytest

from protocols.tokens import (
    InvalidFederationKey,
    InvalidNationalID,
    check_digit,
    generate_federation_key,
    key_id,
    normalise_national_id,
    read_federation_key,
    token_for_customer_number,
    token_for_national_id,
    write_federation_key,
)

VALID = "11010519491231002X"  # the GB 11643 standard's own example


def test_standard_example_check_digit():
    assert check_digit(VALID[:17]) == "X"


@pytest.mark.parametrize(
    "spelling",
    [
        "11010519491231002x",
        " 110105 19491231 002X ",
        "110105-19491231-002X",
        "１１０１０５１９４９１２３１００２Ｘ",  # noqa: RUF001 (full-width on purpose)
    ],
)
def test_spellings_of_one_id_give_one_token(spelling):
    key = generate_federation_key()
    assert normalise_national_id(spelling) == VALID
    assert token_for_national_id(key, spelling) == token_for_national_id(key, VALID)


def test_old_15_digit_id_maps_to_its_18_digit_form():
    key = generate_federation_key()
    assert normalise_national_id("110105491231002") == VALID
    assert token_for_national_id(key, "110105491231002") == token_for_national_id(key, VALID)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("110105194912310021", "check digit"),
        ("1101051949123100", "15 or 18"),
        ("11010519491231A02X", "digits"),
        ("", "15 or 18"),
    ],
)
def test_invalid_ids_are_refused_with_a_reason(raw, why):
    with pytest.raises(InvalidNationalID, match=why):
        normalise_national_id(raw)


def test_tokens_differ_across_keys_and_hide_the_id():
    a, b = generate_federation_key(), generate_federation_key()
    ta, tb = token_for_national_id(a, VALID), token_for_national_id(b, VALID)
    assert ta != tb
    assert len(ta) == 64 and int(ta, 16) >= 0
    assert VALID not in ta and VALID[:17] not in ta


def test_customer_numbers_are_namespaced():
    key = generate_federation_key()
    assert token_for_customer_number(key, "uci", "17") != token_for_customer_number(
        key, "other", "17"
    )


def test_key_file_round_trip_and_errors(tmp_path):
    key = generate_federation_key()
    path = tmp_path / "federation.key"
    write_federation_key(path, key)
    assert read_federation_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert key_id(key) == key_id(read_federation_key(path))
    (tmp_path / "short.key").write_text("abcd\n")
    with pytest.raises(InvalidFederationKey, match=r"short\.key"):
        read_federation_key(tmp_path / "short.key")
    (tmp_path / "bad.key").write_text("zz" * 32)
    with pytest.raises(InvalidFederationKey, match="hex"):
        read_federation_key(tmp_path / "bad.key")
    with pytest.raises(InvalidFederationKey, match="not found"):
        read_federation_key(tmp_path / "missing.key")
    with pytest.raises(InvalidFederationKey):
        token_for_national_id(b"short", VALID)
