"""The tnetstring codec: one table for both directions, strict rejection, streams, bounds, fuzzing.

Wire bytes in the tables are written by hand from the tnetstring format (length, colon,
payload, type tag), not produced by the code under test. Every valid wire goes through
``loads`` whole, through ``pop`` a byte at a time (each proper prefix must ask for more,
never yield a value) and followed by trailing data.
"""

from __future__ import annotations

import math
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaussette.protocols import tnetstring as t
from chaussette.protocols.errors import RemoteProtocolError


def same(a: object, b: object) -> bool:
    """Equal with equal types all the way down (1 == True == 1.0 does not count)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)  # type: ignore[arg-type]
    return a == b


# --------------------------------------------------------------------------- the table

# (id, value given to dumps, the wire, the value loads gives back)
CASES: list[tuple[str, object, bytes, object]] = [
    ("empty-string", b"", b"0:,", b""),
    ("bytes", b"hello", b"5:hello,", b"hello"),
    ("bytes-with-syntax", b"a:b,c\x00\xff]", b"8:a:b,c\x00\xff],", b"a:b,c\x00\xff]"),
    ("str-utf8", "caf\u00e9", b"5:caf\xc3\xa9,", b"caf\xc3\xa9"),
    ("int-zero", 0, b"1:0#", 0),
    ("int", 42, b"2:42#", 42),
    ("int-negative", -7, b"2:-7#", -7),
    ("int-big", 2**70, b"22:1180591620717411303424#", 2**70),
    ("float", 0.5, b"3:0.5^", 0.5),
    ("float-negative", -1.25, b"5:-1.25^", -1.25),
    ("float-exponent", 1e100, b"6:1e+100^", 1e100),
    ("float-inf", math.inf, b"3:inf^", math.inf),
    ("float-minus-inf", -math.inf, b"4:-inf^", -math.inf),
    ("float-nan", math.nan, b"3:nan^", math.nan),
    ("true", True, b"4:true!", True),
    ("false", False, b"5:false!", False),
    ("null", None, b"0:~", None),
    ("list-empty", [], b"0:]", []),
    ("dict-empty", {}, b"0:}", {}),
    ("list-mixed", [1, b"a", None], b"11:1:1#1:a,0:~]", [1, b"a", None]),
    ("tuple", (1, 2), b"8:1:1#1:2#]", [1, 2]),
    ("dict", {"a": b"b"}, b"8:1:a,1:b,}", {"a": b"b"}),
    ("dict-bytes-key", {b"k": 1}, b"8:1:k,1:1#}", {"k": 1}),
    ("dict-utf8-key", {"\u00e9": True}, b"12:2:\xc3\xa9,4:true!}", {"\u00e9": True}),
    (
        "nested",
        {"k": [{"x": []}], "n": None},
        b"25:1:k,10:7:1:x,0:]}]1:n,0:~}",
        {"k": [{"x": []}], "n": None},
    ),
    ("deep-lists", [[[[]]]], b"9:6:3:0:]]]]", [[[[]]]]),
    (
        "headers-like",
        {"METHOD": "GET", "x-a": ["1", "2"]},
        b"32:6:METHOD,3:GET,3:x-a,8:1:1,1:2,]}",
        {"METHOD": b"GET", "x-a": [b"1", b"2"]},
    ),
]
CASE_IDS = [c[0] for c in CASES]

# Accepted on input but not what dumps writes: (id, wire, value)
DECODE_ONLY = [
    ("float-no-fraction", b"1:5^", 5.0),
    ("float-trailing-dot", b"2:1.^", 1.0),
    ("float-capital-e", b"5:2E-02^", 0.02),
    ("int-minus-zero", b"2:-0#", 0),
    ("int-leading-zero-payload", b"3:007#", 7),
]

# (id, wire, True if it is only the start of a valid value)
INVALID = [
    ("nothing", b"", True),
    ("digits-only", b"5", True),
    ("no-payload", b"5:", True),
    ("short-payload", b"5:hel", True),
    ("no-tag", b"5:hello", True),
    ("container-cut", b"8:1:a,1:b", True),
    ("letter-length", b"x:", False),
    ("empty-length", b":,", False),
    ("negative-length", b"-1:a,", False),
    ("plus-length", b"+1:a,", False),
    ("space-length", b" 1:a,", False),
    ("length-space", b"1 :a,", False),
    ("leading-zero", b"01:a,", False),
    ("leading-zero-incomplete", b"00", False),
    ("underscore-length", b"1_0:0123456789,", False),
    ("non-ascii-digit", "\u0661:a,".encode(), False),
    ("unknown-tag", b"1:a?", False),
    ("tag-off-by-one", b"1:ab,", False),
    ("int-empty", b"0:#", False),
    ("int-letters", b"2:1a#", False),
    ("int-plus", b"3:+12#", False),
    ("int-space", b"3: 12#", False),
    ("int-underscore", b"3:1_2#", False),
    ("int-too-many-digits", b"5000:" + b"9" * 5000 + b"#", False),
    ("float-empty", b"0:^", False),
    ("float-bare-e", b"2:1e^", False),
    ("float-word", b"3:abc^", False),
    ("float-underscore", b"4:1_.0^", False),
    ("float-capital-nan", b"3:NaN^", False),
    ("float-space", b"4: 1.5^", False),
    ("bool-capital", b"4:True!", False),
    ("bool-digit", b"1:1!", False),
    ("bool-empty", b"0:!", False),
    ("null-payload", b"1:x~", False),
    ("dict-odd", b"4:1:a,}", False),
    ("dict-int-key", b"8:1:1#1:a,}", False),
    ("dict-list-key", b"7:0:]1:a,}", False),
    ("dict-non-utf8-key", b"8:1:\xff,1:a,}", False),
    ("dict-repeated-key", b"16:1:a,1:b,1:a,1:c,}", False),
    ("inner-overrun", b"3:5:a}", False),
    ("inner-header-cut", b"2:12]", False),
    ("inner-garbage", b"3:abc]", False),
    ("inner-bad-tag", b"4:1:a.]", False),
    ("inner-short-by-one", b"3:1:a]", False),
]


def test_table_ids_unique() -> None:
    ids = CASE_IDS + [c[0] for c in DECODE_ONLY] + [c[0] for c in INVALID]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("value", "wire"), [(c[1], c[2]) for c in CASES], ids=CASE_IDS)
def test_dumps(value: object, wire: bytes) -> None:
    assert t.dumps(value) == wire


@pytest.mark.parametrize(("wire", "value"), [(c[2], c[3]) for c in CASES], ids=CASE_IDS)
def test_loads(wire: bytes, value: object) -> None:
    assert same(t.loads(wire), value)
    assert same(t.loads(bytearray(wire)), value)
    assert same(t.loads(memoryview(wire)), value)


@pytest.mark.parametrize(("wire", "value"), [(c[2], c[3]) for c in CASES], ids=CASE_IDS)
def test_pop_with_trailing_data(wire: bytes, value: object) -> None:
    for tail in (b"", b"x", b"1:a,", b"5", b"\xff" * 3):
        got, rest = t.pop(wire + tail)
        assert same(got, value)
        assert rest == tail
    # trailing data is an error for loads, and not an "ask for more" one
    with pytest.raises(t.TNetstringError) as info:
        t.loads(wire + b"0:~")
    assert not isinstance(info.value, t.Incomplete)


@pytest.mark.parametrize(("wire", "value"), [(c[2], c[3]) for c in CASES], ids=CASE_IDS)
def test_pop_byte_at_a_time(wire: bytes, value: object) -> None:
    """Every proper prefix asks for more; the whole value comes out only at its last byte."""
    for end in range(len(wire)):
        with pytest.raises(t.Incomplete):
            t.pop(wire[:end])
        with pytest.raises(t.Incomplete):
            t.loads(wire[:end])
    got, rest = t.pop(wire)
    assert same(got, value) and rest == b""


@pytest.mark.parametrize(("wire", "value"), [(c[1], c[2]) for c in DECODE_ONLY])
def test_decode_only(wire: bytes, value: object) -> None:
    assert same(t.loads(wire), value)


def test_stream_of_every_case_fed_a_byte_at_a_time() -> None:
    """A reader that appends a byte and pops while it can gets every value in order."""
    stream = b"".join(c[2] for c in CASES)
    buffer = b""
    values: list[object] = []
    for i in range(len(stream)):
        buffer += stream[i : i + 1]
        while True:
            try:
                value, buffer = t.pop(buffer)
            except t.Incomplete:
                break
            values.append(value)
    assert buffer == b""
    assert len(values) == len(CASES)
    assert all(same(v, c[3]) for v, c in zip(values, CASES, strict=True))


@pytest.mark.parametrize(
    ("wire", "incomplete"), [(c[1], c[2]) for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid(wire: bytes, incomplete: bool) -> None:
    for decode in (t.loads, t.pop):
        with pytest.raises(t.TNetstringError) as info:
            decode(wire)
        assert isinstance(info.value, RemoteProtocolError)
        assert isinstance(info.value, t.Incomplete) is incomplete
        assert str(info.value)


def test_invalid_fails_however_it_continues() -> None:
    """A wire rejected as broken (not incomplete) stays rejected whatever follows it."""
    for _, wire, incomplete in INVALID:
        if incomplete:
            continue
        for tail in (b",", b"0:~", b"}" * 3, b"x" * 50):
            try:
                value, rest = t.pop(wire + tail)
            except t.TNetstringError:
                continue
            # only possible if the broken part was after the value's end: not in this table
            pytest.fail(f"{wire!r}+{tail!r} gave {value!r}, rest {rest!r}")


# --------------------------------------------------------------------------- dumps errors


@pytest.mark.parametrize("value", [object(), {1: b"a"}, {(1,): b"a"}, {1.5}, [b"ok", object()], 1j])
def test_dumps_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        t.dumps(value)


def test_dumps_subclasses_and_buffers() -> None:
    class MyStr(str):
        pass

    class MyInt(int):
        pass

    class MyDict(dict):  # type: ignore[type-arg]
        pass

    assert t.dumps(MyStr("ab")) == b"2:ab,"
    assert t.dumps(MyInt(3)) == b"1:3#"
    assert t.dumps(MyDict(a=None)) == b"7:1:a,0:~}"
    assert t.dumps(bytearray(b"xy")) == b"2:xy,"
    assert t.dumps(memoryview(b"xyz")) == b"3:xyz,"
    assert t.dumps({MyStr("k"): 1}) == b"8:1:k,1:1#}"


def test_dumps_depth_and_cycles() -> None:
    deep: list[object] = []
    for _ in range(t.MAX_DEPTH - 1):
        deep = [deep]
    assert same(t.loads(t.dumps(deep)), deep)  # MAX_DEPTH containers: fine both ways
    with pytest.raises(ValueError, match="deeper"):
        t.dumps([deep])
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(ValueError):
        t.dumps(cycle)
    assert t.dumps([[[]]], max_depth=3) == b"6:3:0:]]]"
    with pytest.raises(ValueError):
        t.dumps([[[]]], max_depth=2)


# --------------------------------------------------------------------------- bounds


def test_huge_declared_length_fails_fast_without_allocating() -> None:
    tracemalloc.start()
    try:
        for wire in (
            b"1000000000000:",
            b"1000000000000:abc,",
            b"1000000000000",
            b"999999999999999999999",
        ):
            with pytest.raises(t.TNetstringError) as info:
                t.pop(wire)
            assert not isinstance(info.value, t.Incomplete)
            assert "bound" in str(info.value)
        # a caller that allows it gets "ask for more", still without a buffer of that size
        with pytest.raises(t.Incomplete):
            t.pop(b"1000000000000:abc", max_length=10**13)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_max_length_exact() -> None:
    assert t.loads(b"4:abcd,", max_length=4) == b"abcd"
    assert t.loads(b"8:1:a,1:b,]", max_length=8) == [b"a", b"b"]
    for wire, bound in ((b"5:abcde,", 4), (b"9:1:a,2:bc,]", 8)):
        with pytest.raises(t.TNetstringError, match="bound"):
            t.loads(wire, max_length=bound)
        assert t.loads(wire, max_length=bound + 1)
    # with fewer digits than the bound's, a short length is fine: max_length=100, "99:"
    assert t.pop(b"2:ab," + b"x" * 200, max_length=100) == (b"ab", b"x" * 200)


def nested(depth: int, open_: bytes = b"]") -> bytes:
    wire = b"0:" + open_
    for _ in range(depth - 1):
        if open_ == b"]":
            wire = b"%d:%s]" % (len(wire), wire)
        else:
            payload = b"1:k," + wire
            wire = b"%d:%s}" % (len(payload), payload)
    return wire


@pytest.mark.parametrize("tag", [b"]", b"}"])
def test_max_depth(tag: bytes) -> None:
    ok = nested(t.MAX_DEPTH, tag)
    value = t.loads(ok)
    depth = 0
    while isinstance(value, (list, dict)):
        depth += 1
        value = (value[0] if value else None) if isinstance(value, list) else value.get("k")
    assert depth == t.MAX_DEPTH
    with pytest.raises(t.TNetstringError, match="deeper"):
        t.loads(nested(t.MAX_DEPTH + 1, tag))
    assert t.loads(b"0:]", max_depth=1) == []
    with pytest.raises(t.TNetstringError, match="deeper"):
        t.loads(b"0:]", max_depth=0)
    assert t.loads(b"1:a,", max_depth=0) == b"a"


def test_deep_nesting_never_recurses() -> None:
    """Far past Python's recursion limit, allowed or not: a value or a TNetstringError."""
    depth = 5000
    wire = nested(depth)
    with pytest.raises(t.TNetstringError, match="deeper"):
        t.loads(wire)
    value = t.loads(wire, max_depth=depth)
    count = 0
    while value != []:
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
        count += 1
    assert count == depth - 1
    # and a deep but broken one: the error, not a RecursionError
    with pytest.raises(t.TNetstringError):
        t.loads(wire[:-1] + b"}", max_depth=depth)
    with pytest.raises(t.Incomplete):
        t.loads(wire[:-1], max_depth=depth)


# --------------------------------------------------------------------------- properties

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.binary(max_size=40),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=8), inner, max_size=5),
    ),
    max_leaves=30,
)


def normalized(value: object) -> object:
    """What loads gives back for what dumps was given: text as UTF-8 bytes."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    return value


@settings(max_examples=400, deadline=None)
@given(values, st.binary(max_size=10))
def test_roundtrip(value: object, tail: bytes) -> None:
    wire = t.dumps(value)
    assert same(t.loads(wire), normalized(value))
    got, rest = t.pop(wire + tail)
    assert same(got, normalized(value)) and rest == tail
    assert t.dumps(t.loads(wire)) == wire  # decoded values re-encode to the same bytes


@settings(max_examples=100, deadline=None)
@given(values)
def test_roundtrip_prefixes_ask_for_more(value: object) -> None:
    wire = t.dumps(value)
    for end in range(len(wire)):
        with pytest.raises(t.Incomplete):
            t.pop(wire[:end])


def check_value(value: object) -> None:
    """A decoded value is made only of the decoder's types."""
    if isinstance(value, list):
        for item in value:
            check_value(item)
    elif isinstance(value, dict):
        assert all(type(k) is str for k in value)
        for item in value.values():
            check_value(item)
    else:
        assert value is None or type(value) in (bytes, int, float, bool)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=60))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    """A value or a TNetstringError, nothing else; and a value re-encodes and decodes again."""
    try:
        value, rest = t.pop(data, max_depth=4)
    except t.TNetstringError:
        return
    check_value(value)
    assert data.endswith(rest)
    assert same(t.loads(t.dumps(value)), value)


wire_cases = st.sampled_from([c[2] for c in CASES] + [c[1] for c in INVALID])


@settings(max_examples=1500, deadline=None)
@given(wire_cases, st.integers(0, 200), st.binary(min_size=1, max_size=4), st.booleans())
def test_fuzz_mutated_wires(wire: bytes, where: int, junk: bytes, insert: bool) -> None:
    """Valid and invalid wires with bytes overwritten or inserted anywhere."""
    pos = where % (len(wire) + 1)
    data = wire[:pos] + junk + wire[pos + (0 if insert else len(junk)) :]
    try:
        value = t.loads(data, max_length=1000)
    except t.TNetstringError:
        return
    check_value(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"0:]", b"0:}", b"1:a,", b"2:", b"]", b"}", b"5:"]), max_size=40))
def test_fuzz_bracket_soup(parts: list[bytes]) -> None:
    """Container-heavy input (where an iterative parser's bookkeeping can go wrong)."""
    data = b"".join(parts)
    for max_depth in (0, 3, 100):
        try:
            value, _ = t.pop(data, max_depth=max_depth)
        except t.TNetstringError:
            continue
        check_value(value)


def test_parse_at_offsets() -> None:
    data = b"ab 1:x,2:yz,"
    assert t.parse_at(data, 3) == (b"x", 7)
    assert t.parse_at(data, 7) == (b"yz", 12)
    with pytest.raises(t.Incomplete):
        t.parse_at(data, 12)
    with pytest.raises(t.TNetstringError):
        t.parse_at(data, 0)
    with pytest.raises(t.TNetstringError, match="bound"):
        t.parse_at(b"xx5:hello,", 2, max_length=4)
    for pos in (-1, 13):
        with pytest.raises(ValueError):
            t.parse_at(data, pos)
