"""Shared hypothesis strategies for hostile wire input: JSON values, hostile scalars, mutations.

``mutate_json`` takes a valid JSON document and changes exactly one thing in it (a node deleted,
replaced by a hostile value chosen for its type, or an unknown key added), so that a good share
of the examples are *near* valid: they pass the outer checks and exercise the inner ones.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

from protocols.blinding import SMALL_ORDER_U, P

# Scalars of every JSON type, including ones that break naive parsers and validators.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
)

json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)


def _u_hex(u: int) -> str:
    return u.to_bytes(32, "little").hex()


# 64-hex strings that are well formed but must be refused as group elements or keys.
HOSTILE_KEY_HEX = [
    "00" * 32,  # identity / u = 0
    _u_hex(1),
    _u_hex(P - 1),
    *(_u_hex(u) for u in SMALL_ORDER_U),
    _u_hex(P),  # u = p (non-canonical 0)
    _u_hex(P + 1),  # non-canonical 1
    "ff" * 32,  # top bit set
    _u_hex(2),  # u = 2 is on the twist of Curve25519
    # Ed25519 small-order points and a non-canonical encoding
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]

HOSTILE_STRINGS = [
    "",
    " ",
    "x",
    "0" * 31,
    "0" * 32,
    "0" * 33,
    "0" * 16,
    "0" * 15,
    "0" * 17,
    "0" * 32 + "\n",
    "\n" + "0" * 32,
    "A" * 32,
    "g" * 32,
    "\u0660" * 32,  # Arabic-Indic digits: \d would match them, [0-9] must not
    "a" * 64,
    "a" * 65,
    "a\n",
    "a b",
    "a/b",
    "..",
    "\u00e9",
    "p" * 200,
    "debt-profile/v1",
    "debt-profile/v2",
    "fedcredit-roster/v1",
    "fedcredit-identity/v1",
    *HOSTILE_KEY_HEX,
]

HOSTILE_NUMBERS = [
    0,
    1,
    -1,
    2,
    3,
    24,
    31,
    32,
    33,
    64,
    65,
    100,
    101,
    2**31,
    2**31 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64,
    10**30,
    -(10**30),
    49_999,
    50_000,
    50_001,
    5_000_000,
    5_000_001,
    0.0,
    0.5,
    1.0,
    1.5,
    -0.0,
    1e-300,
    1e300,
    float("nan"),
    float("inf"),
    float("-inf"),
]

hostile_scalars = st.one_of(
    st.sampled_from([None, True, False, [], {}, *HOSTILE_NUMBERS, *HOSTILE_STRINGS]),
    json_values,
)


@st.composite
def _string_variant(draw: st.DrawFn, value: str) -> str:
    kind = draw(st.sampled_from(["append", "drop", "upper", "replace", "newline", "double"]))
    if kind == "append":
        return value + draw(st.characters())
    if kind == "drop":
        return value[:-1]
    if kind == "upper":
        return value.upper()
    if kind == "newline":
        return value + "\n"
    if kind == "double":
        return value + value
    if not value:
        return draw(st.characters())
    i = draw(st.integers(0, len(value) - 1))
    return value[:i] + draw(st.characters()) + value[i + 1 :]


def hostile_for(value: Any) -> st.SearchStrategy[Any]:
    """Hostile replacements for ``value``: close variants of it first, then anything at all."""
    options: list[st.SearchStrategy[Any]] = [hostile_scalars]
    if isinstance(value, bool):
        options.append(st.sampled_from([0, 1, "true", None]))
    elif isinstance(value, int):
        options.append(
            st.sampled_from([value + 1, value - 1, -value, value * 2**40, str(value), float(value)])
        )
    elif isinstance(value, float):
        options.append(st.sampled_from([-value, value * 1e300, str(value), 0.0, 1.0, 1]))
    elif isinstance(value, str):
        options.append(_string_variant(value))
    elif isinstance(value, list):
        variants: list[Any] = [[], value + value, list(reversed(value))]
        if value:
            variants += [[value[0], *value], value[:-1], [*value, value[-1]]]
            variants.append([value[0]] * 65)
        variants.append([*value, *(f"p{i}" for i in range(70))])
        options.append(st.sampled_from(variants))
    return st.one_of(*options)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


_MUTATIONS = st.sampled_from(["replace", "replace", "replace", "delete", "add"])


@st.composite
def mutate_json(draw: st.DrawFn, doc: Any, extra_keys: list[str] | None = None) -> Any:
    """``doc`` with one node deleted, replaced by a hostile value, or an unknown key added."""
    doc = copy.deepcopy(doc)
    paths = _paths(doc)
    path = draw(st.sampled_from(paths))
    node = _get(doc, path)
    kind = draw(_MUTATIONS)
    if kind == "add" and isinstance(node, dict):
        key = draw(st.one_of(st.sampled_from(extra_keys or ["extra"]), st.text(max_size=8)))
        node[key] = draw(json_values)
        return doc
    if not path:  # the root itself
        return draw(hostile_for(doc))
    parent = _get(doc, path[:-1])
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(hostile_for(node))
    return doc


# Values a Flower ConfigRecord accepts, for binary fields and stray record entries.
config_values = st.one_of(
    st.binary(max_size=80),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=10),
    st.booleans(),
    st.lists(st.binary(max_size=8), max_size=3),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    st.lists(st.text(max_size=4), max_size=3),
)
