"""The descriptor-built strategies reach every kind of field and value the fuzz promises, and
the RPC list is the generated package's."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TypeVar

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, struct_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import HypothesisWarning
from hypothesis.strategies import SearchStrategy
from llorch.orchestrator.v1 import orchestrator_pb2

from tests.fuzz.strategies import (
    HUGE_CHARS,
    INT32,
    INT64,
    LONG_REPEATED,
    MAX_DEPTH,
    UINT64,
    Mode,
    Vocabulary,
    generated_rpcs,
    generated_services,
    messages,
    payloads,
    plausible_payloads,
    scalar,
)

T = TypeVar("T")
F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    "f_int32": F.TYPE_INT32,
    "f_int64": F.TYPE_INT64,
    "f_uint32": F.TYPE_UINT32,
    "f_uint64": F.TYPE_UINT64,
    "f_sint32": F.TYPE_SINT32,
    "f_sint64": F.TYPE_SINT64,
    "f_fixed32": F.TYPE_FIXED32,
    "f_fixed64": F.TYPE_FIXED64,
    "f_sfixed32": F.TYPE_SFIXED32,
    "f_sfixed64": F.TYPE_SFIXED64,
    "f_float": F.TYPE_FLOAT,
    "f_double": F.TYPE_DOUBLE,
    "f_bool": F.TYPE_BOOL,
    "f_string": F.TYPE_STRING,
    "f_bytes": F.TYPE_BYTES,
}


def _everything() -> Descriptor:
    """A proto3 message with a field of every kind: each scalar type, an enum, repeated
    fields, a map, a oneof, an optional, itself (recursion) and two well-known types."""
    pool = descriptor_pool.DescriptorPool()
    for wkt in (struct_pb2, duration_pb2):
        pool.AddSerializedFile(wkt.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="fuzz/everything.proto",
        package="fuzz.test",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto", "google/protobuf/duration.proto"],
    )
    file.enum_type.add(name="Colour").value.extend(
        [
            descriptor_pb2.EnumValueDescriptorProto(name="COLOUR_UNSPECIFIED", number=0),
            descriptor_pb2.EnumValueDescriptorProto(name="COLOUR_RED", number=1),
        ]
    )
    message = file.message_type.add(name="Everything")
    number = 0

    def add(name: str, kind: int, **more: object) -> None:
        nonlocal number
        number += 1
        message.field.add(name=name, number=number, type=kind, **more)

    for name, kind in SCALARS.items():
        add(name, kind, label=F.LABEL_OPTIONAL)
    add("colour", F.TYPE_ENUM, label=F.LABEL_OPTIONAL, type_name=".fuzz.test.Colour")
    add("r_string", F.TYPE_STRING, label=F.LABEL_REPEATED)
    add("r_int64", F.TYPE_INT64, label=F.LABEL_REPEATED)
    add("child", F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".fuzz.test.Everything")
    add("children", F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".fuzz.test.Everything")
    add("struct", F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".google.protobuf.Struct")
    add("wait", F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".google.protobuf.Duration")
    entry = message.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    add(
        "labels",
        F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".fuzz.test.Everything.LabelsEntry",
    )
    message.oneof_decl.add(name="choice")
    add("pick_text", F.TYPE_STRING, label=F.LABEL_OPTIONAL, oneof_index=0)
    add(
        "pick_child",
        F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        oneof_index=0,
        type_name=".fuzz.test.Everything",
    )
    message.oneof_decl.add(name="_maybe")
    add("maybe", F.TYPE_INT32, label=F.LABEL_OPTIONAL, oneof_index=1, proto3_optional=True)
    pool.Add(file)
    return pool.FindMessageTypeByName("fuzz.test.Everything")


EVERYTHING = _everything()


class _Found(Exception):
    pass


def _finds(strategy: SearchStrategy[T], condition: Callable[[T], bool]) -> bool:
    """Whether ``strategy`` draws a value that meets ``condition`` within 200 examples (not
    ``hypothesis.find``: shrinking what it found would cost more than finding it)."""

    @settings(
        max_examples=200,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def search(value: T) -> None:
        if condition(value):
            raise _Found

    try:
        with warnings.catch_warnings():
            # Hypothesis shows the value that raised _Found: a huge one warns it is huge.
            warnings.simplefilter("ignore", HypothesisWarning)
            search()
    except _Found:
        return True
    return False


def _depth(message: Message) -> int:
    nested = list(message.children)
    if message.HasField("child"):
        nested.append(message.child)
    return 1 + max(_depth(m) for m in nested) if nested else 0


WILD = messages(EVERYTHING)


def _values(name: str) -> SearchStrategy[object]:
    return scalar(EVERYTHING.fields_by_name[name], Vocabulary())


@pytest.mark.parametrize("name", sorted(SCALARS))
def test_every_scalar_type_gets_values(name: str) -> None:
    assert _finds(WILD, lambda m: bool(getattr(m, name)))  # a non-default value


@pytest.mark.parametrize(
    ("name", "condition"),
    [
        ("f_int32", lambda v: v == INT32[0]),
        ("f_sint64", lambda v: v == INT64[1]),
        ("f_fixed64", lambda v: v == UINT64[1]),
        ("f_sfixed64", lambda v: v < 0),
        ("f_float", math.isnan),
        ("f_double", math.isinf),
        ("f_string", lambda v: "\x00" in v),
        ("f_string", lambda v: any(ord(c) > 0xFFFF for c in v)),
        ("f_string", lambda v: len(v) > 60_000),
        ("f_bytes", lambda v: len(v) > 60_000),
        ("colour", lambda v: v not in (0, 1)),  # an unknown enum value
    ],
)
def test_values_reach(name: str, condition: Callable[[object], bool]) -> None:
    assert _finds(_values(name), condition)


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("long repeated field", lambda m: len(m.r_int64) >= 64),
        ("nested message", lambda m: m.child.HasField("child")),
        ("map entry", lambda m: len(m.labels) > 0),
        ("oneof message member", lambda m: m.WhichOneof("choice") == "pick_child"),
        ("oneof string member", lambda m: m.WhichOneof("choice") == "pick_text"),
        ("proto3 optional present", lambda m: m.HasField("maybe")),
        ("Struct with a value", lambda m: len(m.struct.fields) > 0),
        ("Duration with a value", lambda m: m.wait.seconds != 0),
    ],
)
def test_wild_messages_reach(what: str, condition: Callable[[Message], bool]) -> None:
    assert _finds(WILD, condition), what


@settings(max_examples=30, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(WILD)
def test_wild_messages_stay_bounded(message: Message) -> None:
    assert _depth(message) <= MAX_DEPTH
    assert len(message.r_string) <= LONG_REPEATED
    assert len(message.f_string) <= HUGE_CHARS
    # A long list holds small elements only, so no message reaches gigabytes.
    assert message.ByteSize() < 8 * 1024 * 1024


def test_plausible_messages_use_the_vocabulary() -> None:
    vocabulary = Vocabulary.of({"model_id": ["tiny-llama"]})
    plausible = messages(orchestrator_pb2.GenerateRequest.DESCRIPTOR, vocabulary, Mode.PLAUSIBLE)
    assert _finds(plausible, lambda m: m.model_id == "tiny-llama")
    assert not _finds(plausible, lambda m: m.model_id not in ("", "tiny-llama"))
    assert not _finds(plausible, lambda m: m.sampling.max_tokens < 0)


def test_payloads_include_the_empty_request_bytes_and_unknown_fields() -> None:
    wild = payloads(orchestrator_pb2.GetTaskRequest.DESCRIPTOR)
    assert _finds(wild, lambda p: p.encode() == b"")
    assert _finds(wild, lambda p: p.message is None and len(p.tail) > 0)
    assert _finds(wild, lambda p: p.message is not None and len(p.tail) > 0)
    plausible = plausible_payloads(orchestrator_pb2.GetTaskRequest.DESCRIPTOR)
    assert not _finds(plausible, lambda p: p.message is None or len(p.tail) > 0)


def test_every_method_of_every_generated_service_is_listed() -> None:
    services = generated_services()
    names = {s.full_name for s in services}
    assert "llorch.orchestrator.v1.NodeService" in names
    assert "llorch.poolmanager.v1.PoolManagerService" in names
    paths = [rpc.path for rpc in generated_rpcs()]
    assert len(paths) == len(set(paths)) == sum(len(s.methods) for s in services)
    assert "/llorch.orchestrator.v1.ControlService/DeleteModel" in paths
    assert "/llorch.catalog.v1.CatalogService/DeleteModel" in paths
