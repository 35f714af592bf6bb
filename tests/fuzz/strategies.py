"""Hypothesis strategies built from protobuf descriptors, and the RPCs of the generated package.

Nothing here knows a llorch message: a request is drawn field by field from its ``Descriptor``
(scalars at their extremes, NaN and infinities, huge and odd unicode strings, unknown enum values,
long repeated fields, nested messages to a depth, oneofs, maps, and so the well-known types
such as ``google.protobuf.Struct`` or ``Duration`` too), and the RPCs come from the service
descriptors of every ``*_pb2`` module under ``llorch``, so an RPC added to a proto is fuzzed
without a line here.
"""

from __future__ import annotations

import enum
import functools
import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import llorch
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from hypothesis import strategies as st

Text = TypeVar("Text", str, bytes)
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
}

HUGE_CHARS = 64 * 1024 + 2
"""Longest generated string: past the 64 KiB limits the services put on prompts and texts."""
LONG_REPEATED = 2000
"""Longest generated repeated field (its elements are few distinct values, cycled)."""
MAX_DEPTH = 4
"""Nested messages below this depth are left empty (google.protobuf.Value nests forever)."""

# Code points that trip up text handling: NUL and controls, BOM, a right-to-left override,
# noncharacters, a combining mark alone, astral planes (emoji, the last code point), and the
# punctuation of templates, JSON, paths and format strings.
ODD_CHARS = (
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "\x85",
    "\u2028",
    "\ufeff",
    "\u202e",
    "\ufffe",
    "\uffff",
    "\u0301",
    "\U0001f999",
    "\U0010ffff",
    "\n",
    "\r",
    "\t",
    " ",
    "\\",
    '"',
    "'",
    "/",
    ".",
    "%",
    "{",
    "}",
    "[",
    "]",
    "<",
    ">",
    "|",
    ":",
    "A",
    "z",
    "0",
)

# Values a random string rarely is but a handler looks for: names, paths, URLs, hashes, chat
# template and grammar text, JSON schemas (recursive, deep, invalid), boundaries of the limits.
WORDS = (
    "",
    " ",
    "a",
    "-",
    ".",
    "..",
    "../etc/passwd",
    "/",
    "/tmp/fuzz.gguf",
    "/dev/null",
    "file:///dev/null",
    "hf:org/model",
    "hf:org/model/file.gguf",
    "cpu",
    "cuda",
    "0" * 64,
    "f" * 64,
    "a" * 128,
    "a" * 129,
    "localhost:1",
    "127.0.0.1:0",
    "[::1]:65535",
    "host:65536",
    "<|im_start|>",
    "</s>",
    "<s>",
    "{{ messages }}",
    "{% for m in messages %}{{ m.content }}{% endfor %}",
    "{{ raise_exception('x') }}",
    'root ::= "a"',
    "root ::= (",
    "root ::= root",
    "{}",
    "[]",
    "null",
    '{"type": "object"}',
    '{"type": "string", "pattern": "(a|b)*c"}',
    '{"type": "string", "pattern": "("}',
    '{"$ref": "#"}',
    '{"type": "array", "items": {"$ref": "#"}}',
    '{"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}',
    '{"type": "integer", "minimum": 1e400}',
    '{"enum": []}',
    '{"anyOf": []}',
    "[" * 5000,
    '{"a":' * 2000,
    "x" * 65536,
    "x" * 65537,
    "\U0001f999" * 16385,
)


@dataclass(frozen=True)
class Vocabulary:
    """Strings the fuzzed servers know (their ids, addresses), by the name of the fields they
    go in: a request needs its ids right to get past the lookups to the code behind them."""

    by_field: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def of(cls, values: Mapping[str, Sequence[str]]) -> Vocabulary:
        """From field name → values."""
        return cls(tuple((name, tuple(v)) for name, v in sorted(values.items())))

    def all(self) -> tuple[str, ...]:
        """Every value, for any string field."""
        return tuple(dict.fromkeys(v for _, values in self.by_field for v in values))

    def for_field(self, name: str) -> tuple[str, ...]:
        """The values of fields called ``name`` (none when no field is called so)."""
        for field_name, values in self.by_field:
            if field_name == name:
                return values
        return ()


_SHORT_WORDS = tuple(w for w in WORDS if len(w) <= 256)


def names(vocabulary: Sequence[str], huge: bool = True) -> st.SearchStrategy[str]:
    """The strings a field gets: short unicode of any plane, odd characters, ``WORDS`` and
    ``vocabulary`` (ids the fuzzed servers know, so requests get past lookups), and with
    ``huge`` text of up to ``HUGE_CHARS``."""
    known = st.sampled_from(tuple(vocabulary) + (WORDS if huge else _SHORT_WORDS))
    short = [
        known,
        known,
        # Any code point a UTF-8 string can hold (surrogates cannot be sent).
        st.text(st.characters(codec="utf-8"), max_size=40),
        st.text(st.sampled_from(ODD_CHARS), max_size=40),
        # A known value with odd text around it: near misses of valid ids.
        st.tuples(st.text(st.sampled_from(ODD_CHARS), max_size=2), known).map("".join),
        st.tuples(known, st.text(st.sampled_from(ODD_CHARS), max_size=2)).map("".join),
    ]
    if not huge:
        return st.one_of(short)
    return st.one_of(*short, _huge(st.text(st.characters(codec="utf-8"), min_size=1, max_size=4)))


def _huge(piece: st.SearchStrategy[Text]) -> st.SearchStrategy[Text]:
    """A short drawn piece (text or bytes) repeated to 1 KiB .. ``HUGE_CHARS`` long (drawing
    each character would overrun hypothesis's buffer and take seconds)."""
    return st.tuples(piece, st.integers(1024, HUGE_CHARS)).map(
        lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]]
    )


def _edges(low: int, high: int) -> list[int]:
    """The extremes of a range, the values next to them, 0 and ±1, and the limits of the
    narrower integer types that fall inside it."""
    values = {low, low + 1, high - 1, high, -1, 0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1}
    return sorted(v for v in values if low <= v <= high)


def _bounded_integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers of one protobuf type: its extremes, anything between, and small values (a
    limit or an index is usually small), all within the type's range."""
    return st.one_of(
        st.sampled_from(_edges(low, high)),
        st.integers(low, high),
        st.integers(max(low, -300), min(high, 70_000)),
    )


FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 3.4028234663852886e38, float("nan"))
DOUBLE_EDGES = (0.0, -0.0, 1.0, -1.0, 1e-308, 5e-324, 1.7976931348623157e308, float("nan"))


class Mode(enum.Enum):
    """How wild the values of a message are."""

    WILD = "wild"
    """Anything the type holds: extremes, NaN, huge and odd strings, long lists."""
    SMALL = "small"
    """As WILD, but strings and bytes of up to 256 and lists of up to 4: the elements of a long
    list (else one message could be gigabytes)."""
    PLAUSIBLE = "plausible"
    """What a client would send: strings from the vocabulary, small numbers, known enum values.
    These get past validation to the code behind it, which the wild ones rarely reach."""


PLAUSIBLE_WORDS = (
    "Hello",
    "a",
    '{"type": "object"}',
    'root ::= "a"',
    "/tmp/fuzz.gguf",
    "hf:org/model",
    "cpu",
    "0" * 64,
)


def scalar(
    field: FieldDescriptor, vocabulary: Vocabulary, mode: Mode = Mode.WILD
) -> st.SearchStrategy[object]:
    """Values of one non-message field."""
    kind = field.type
    if mode is Mode.PLAUSIBLE:
        return _plausible(field, vocabulary)
    huge = mode is Mode.WILD
    if kind in _INT_RANGES:
        return _bounded_integers(*_INT_RANGES[kind])
    if kind == FieldDescriptor.TYPE_FLOAT:
        edges = (*FLOAT_EDGES, float("inf"), float("-inf"))
        return st.one_of(st.sampled_from(edges), st.floats(width=32), st.floats(-10, 10, width=32))
    if kind == FieldDescriptor.TYPE_DOUBLE:
        edges = (*DOUBLE_EDGES, float("inf"), float("-inf"))
        return st.one_of(st.sampled_from(edges), st.floats(), st.floats(-1e6, 1e6))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return names(vocabulary.all(), huge)
    if kind == FieldDescriptor.TYPE_BYTES:
        if not huge:
            return st.binary(max_size=64)
        return st.one_of(st.binary(max_size=64), _huge(st.binary(min_size=1, max_size=4)))
    if kind == FieldDescriptor.TYPE_ENUM:
        known = st.sampled_from([v.number for v in field.enum_type.values])
        if field.enum_type.is_closed:
            return known  # proto2 enums refuse unknown numbers at assignment
        return st.one_of(known, known, _bounded_integers(*INT32))
    raise AssertionError(f"{field.full_name}: no strategy for field type {kind}")


def _plausible(field: FieldDescriptor, vocabulary: Vocabulary) -> st.SearchStrategy[object]:
    kind = field.type
    if kind in _INT_RANGES:
        return st.integers(1, 16)
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.sampled_from((0.5, 1.0, 0.1))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        known = vocabulary.for_field(field.name)
        if known:
            # Only these: hypothesis prefers values it has not tried, so a mix would rarely
            # pick the one valid id (wild requests try the near misses).
            return st.sampled_from(known)
        # Free text (prompts, schemas, grammars, templates): sensible words, or the hard ones
        # of WORDS in an otherwise valid request, where they reach the code that parses them.
        return st.one_of(
            st.sampled_from((*PLAUSIBLE_WORDS, *vocabulary.all())), st.sampled_from(WORDS)
        )
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=8)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise AssertionError(f"{field.full_name}: no strategy for field type {kind}")


def _long(small: st.SearchStrategy[object]) -> st.SearchStrategy[list[object]]:
    """A long list cycling through a few ``small`` elements (hypothesis's buffer holds only so
    many draws)."""
    return st.tuples(st.lists(small, min_size=1, max_size=3), st.integers(64, LONG_REPEATED)).map(
        lambda t: [t[0][i % len(t[0])] for i in range(t[1])]
    )


@functools.cache
def _field(
    field: FieldDescriptor, vocabulary: Vocabulary, depth: int, mode: Mode
) -> st.SearchStrategy[object]:
    """Values of one field: a value, a list or a map of them."""
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key_mode = Mode.PLAUSIBLE if mode is Mode.PLAUSIBLE else Mode.SMALL
        key = scalar(field.message_type.fields_by_name["key"], vocabulary, key_mode)
        value_field = field.message_type.fields_by_name["value"]
        return st.dictionaries(key, _single(value_field, vocabulary, depth, mode), max_size=4)
    single = _single(field, vocabulary, depth, mode)
    if not field.is_repeated:
        return single
    if mode is Mode.PLAUSIBLE:
        return st.lists(single, max_size=3)
    if mode is Mode.SMALL:
        return st.lists(single, max_size=4)
    return st.one_of(
        st.lists(single, max_size=4), _long(_single(field, vocabulary, depth, Mode.SMALL))
    )


def _single(
    field: FieldDescriptor, vocabulary: Vocabulary, depth: int, mode: Mode
) -> st.SearchStrategy[object]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _messages(field.message_type, vocabulary, depth + 1, mode)
    return scalar(field, vocabulary, mode)


def messages(
    descriptor: Descriptor, vocabulary: Vocabulary | None = None, mode: Mode = Mode.WILD
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``: each field set or not (at most one of each oneof, proto3
    ``optional`` included), with values from :func:`scalar` in ``mode``; nested messages the
    same way down to ``MAX_DEPTH``."""
    return _messages(descriptor, vocabulary or Vocabulary(), 0, mode)


@functools.cache
def _messages(
    descriptor: Descriptor, vocabulary: Vocabulary, depth: int, mode: Mode
) -> st.SearchStrategy[Message]:
    # Built once per message type, depth and mode: hypothesis validates a strategy when first
    # drawn, and building them afresh for every draw costs more than the draw.
    cls = message_factory.GetMessageClass(descriptor)
    if depth >= MAX_DEPTH or not descriptor.fields:
        return st.just(cls())
    return _compose(cls, descriptor, vocabulary, depth, mode)


_SET_PLAUSIBLE = st.integers(0, 7).map(lambda n: n != 7)


@st.composite
def _compose(
    draw: st.DrawFn,
    cls: type[Message],
    descriptor: Descriptor,
    vocabulary: Vocabulary,
    depth: int,
    mode: Mode,
) -> Message:
    message = cls()
    # Hypothesis draws the first of a choice (False, 0) more often than the others: in a wild
    # message that leaves fields unset, in a plausible one sets them (seven in eight, and a
    # member of each oneof, proto3 ``optional`` included, three times in four).
    plausible = mode is Mode.PLAUSIBLE
    chosen = {
        oneof.full_name: draw(
            st.sampled_from(
                [*(f.name for f in oneof.fields), None]
                if plausible
                else [None, *(f.name for f in oneof.fields)]
            )
        )
        for oneof in descriptor.oneofs
    }
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None:
            if chosen[oneof.full_name] != field.name:
                continue
        elif not draw(_SET_PLAUSIBLE if plausible else st.booleans()):
            continue
        _assign(message, field, draw(_field(field, vocabulary, depth, mode)))
    return message


def _assign(message: Message, field: FieldDescriptor, value: object) -> None:
    target = getattr(message, field.name)
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        assert isinstance(value, dict)
        nested = field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE
        for key, item in value.items():
            if nested:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        assert isinstance(value, list)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.SetInParent()  # present even when empty: an empty oneof member counts
        assert isinstance(value, Message)
        target.MergeFrom(value)
    else:
        setattr(message, field.name, value)


@dataclass(frozen=True)
class Payload:
    """One request as it goes on the wire: a message, bytes after it, or bytes alone."""

    message: Message | None
    tail: bytes = b""

    def encode(self) -> bytes:
        """The bytes sent."""
        head = b"" if self.message is None else self.message.SerializeToString()
        return head + self.tail

    def __repr__(self) -> str:
        shown = "bytes only" if self.message is None else _short(str(self.message))
        return f"Payload({shown!s}, tail={_short(repr(self.tail))})"


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """One field the message does not declare (or declares with another wire type), with any
    wire type, reserved and invalid ones included, and a random body."""
    number = draw(st.one_of(st.integers(1, 20), st.integers(1, 2**29 - 1)))
    wire = draw(st.integers(0, 7))
    body = draw(st.binary(max_size=16))
    if wire == 2:
        body = _varint(len(body)) + body
    return _varint(number << 3 | wire) + body


PAYLOAD_KINDS = ("wild", "wild", "wild", "unknown fields", "bytes", "empty")
"""What a wild request is, drawn first (a ``one_of`` would favour the kinds of the most
distinct values: nearly every request would have bytes after it)."""


def payloads(
    descriptor: Descriptor, vocabulary: Vocabulary | None = None
) -> st.SearchStrategy[Payload]:
    """Wild requests of ``descriptor``: wild messages (most of the time), a wild message followed
    by unknown fields, random bytes alone, and the empty request."""
    return _payloads(descriptor, vocabulary or Vocabulary())


def plausible_payloads(
    descriptor: Descriptor, vocabulary: Vocabulary | None = None
) -> st.SearchStrategy[Payload]:
    """Plausible requests of ``descriptor`` (``Mode.PLAUSIBLE``): they get past validation."""
    return messages(descriptor, vocabulary, Mode.PLAUSIBLE).map(Payload)


@st.composite
def _payloads(draw: st.DrawFn, descriptor: Descriptor, vocabulary: Vocabulary) -> Payload:
    kind = draw(st.sampled_from(PAYLOAD_KINDS))
    if kind == "empty":
        return Payload(message_factory.GetMessageClass(descriptor)())
    if kind == "bytes":
        return Payload(None, draw(st.binary(max_size=512)))
    message = draw(messages(descriptor, vocabulary))
    if kind == "unknown fields":
        return Payload(message, b"".join(draw(st.lists(unknown_fields(), min_size=1, max_size=3))))
    return Payload(message)


@dataclass(frozen=True)
class Rpc:
    """One method of one service of the generated package."""

    service: ServiceDescriptor
    method: MethodDescriptor

    @property
    def path(self) -> str:
        """The method's path on the wire."""
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def name(self) -> str:
        """``Service.Method``, for test ids."""
        return f"{self.service.name}.{self.method.name}"

    @property
    def request(self) -> Descriptor:
        """Descriptor of the request message."""
        return self.method.input_type


def generated_services() -> list[ServiceDescriptor]:
    """Every service of every ``*_pb2`` module of the generated ``llorch`` package, by name."""
    found: dict[str, ServiceDescriptor] = {}
    for module in pkgutil.walk_packages(llorch.__path__, "llorch."):
        if not module.name.endswith("_pb2"):
            continue
        descriptor = importlib.import_module(module.name).DESCRIPTOR
        for service in descriptor.services_by_name.values():
            found[service.full_name] = service
    return [found[name] for name in sorted(found)]


def generated_rpcs() -> list[Rpc]:
    """Every RPC of :func:`generated_services`, in declaration order within each service."""
    return [Rpc(s, m) for s in generated_services() for m in s.methods]
