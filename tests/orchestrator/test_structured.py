"""Response formats compile to grammars at admission; a schema the grammar could not enforce
is refused with the field and the keyword named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from llorch.orchestrator.v1 import orchestrator_pb2

from mesh.errors import InvalidArgumentError
from orchestrator.structured import grammar_of

FIELD = "response_format.json_schema.schema"


def schema_format(schema: object) -> orchestrator_pb2.ResponseFormat:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return orchestrator_pb2.ResponseFormat(
        json_schema=orchestrator_pb2.JsonSchemaFormat(schema=text, name="answer")
    )


def refusal(schema: object) -> str:
    with pytest.raises(InvalidArgumentError) as caught:
        grammar_of(schema_format(schema), "response_format")
    field, description = caught.value.field_violations[0]
    assert field == FIELD
    return description


def test_text_and_unset_need_no_grammar() -> None:
    assert grammar_of(orchestrator_pb2.ResponseFormat(), "response_format") == ""
    text = orchestrator_pb2.ResponseFormat(text=orchestrator_pb2.TextFormat())
    assert grammar_of(text, "response_format") == ""


def test_json_object_and_a_pydantic_style_schema_compile() -> None:
    json_object = orchestrator_pb2.ResponseFormat(json_object=orchestrator_pb2.JsonObjectFormat())
    assert "root ::=" in grammar_of(json_object, "response_format")
    pydantic_style = {
        "$defs": {
            "City": {
                "properties": {"name": {"title": "Name", "type": "string"}},
                "required": ["name"],
                "title": "City",
                "type": "object",
                "additionalProperties": False,
            }
        },
        "properties": {
            "city": {"$ref": "#/$defs/City"},
            "population": {"title": "Population", "type": "integer"},
            "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        },
        "required": ["city", "population", "nickname"],
        "title": "Answer",
        "type": "object",
        "additionalProperties": False,
    }
    grammar = grammar_of(schema_format(pydantic_style), "response_format")
    assert '"\\"population\\""' in grammar


def test_compiling_does_not_import_the_engine() -> None:
    # A fresh interpreter: this one may have loaded llama_cpp for other tests.
    code = (
        "import sys; from llorch.orchestrator.v1 import orchestrator_pb2 as o; "
        "from orchestrator.structured import grammar_of; "
        "grammar_of(o.ResponseFormat(json_object=o.JsonObjectFormat()), 'f'); "
        "sys.exit(1 if 'llama_cpp' in sys.modules else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_bounded_pattern_compiles() -> None:
    schema = {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]+$"}
    assert "root ::=" in grammar_of(schema_format(schema), "response_format")


def test_json_strings_may_not_hold_raw_control_characters() -> None:
    grammar = grammar_of(schema_format({"type": "string"}), "response_format")
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in grammar


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ("", "is required"),
        ("{not json", "is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"type": "strin"}, "not a valid JSON Schema"),
        ({"type": "integer", "minimum": 0}, "'minimum' cannot be enforced"),
        ({"properties": {"a": {"type": "number", "multipleOf": 2}}}, "/properties/a"),
        ({"type": "string", "pattern": "^a+$", "minLength": 2}, "together cannot be enforced"),
        ({"type": "string", "format": "email"}, "format 'email'"),
        ({"type": "string", "pattern": "a+"}, "must start with ^"),
        ({"allOf": [{"type": "object"}]}, "'allOf' cannot be enforced"),
        ({"type": ["string", "null"], "maxLength": 3}, "use anyOf"),
        ({"type": "integer", "maxLength": 3}, "needs type string"),
        ({"$ref": "https://example.com/s.json"}, "cannot be enforced as a grammar"),
        ({"type": "array", "items": {"type": "integer"}, "maxItems": 30_000_000}, "at most 1000"),
        ({"type": "string", "maxLength": 100_000_000}, "at most 1000"),
        ({"enum": list(range(6000))}, "at most 256 values"),
        ({"type": "string", "pattern": "^\\x00$"}, "may not hold"),  # NUL matches no token
        ({"type": "string", "pattern": "^\\d{3}$"}, "may not hold"),  # escapes: not translated
        ({"type": "string", "pattern": "^a.b$"}, "may not hold '.'"),
        ({"type": "string", "pattern": "^[^a]+$"}, "may not hold '[^'"),
        ({"type": "string", "pattern": '^a"$'}, "may not hold"),
        ({"type": "array", "maxItems": 2}, "only with items or prefixItems"),
        ({"type": "array", "prefixItems": [{"type": "string"}], "items": {}}, "together"),
        ({"type": "array", "items": {}}, "must say what the items are"),
        ({"properties": {"a": {"type": "string"}}, "required": ["b"]}, "'b', which properties"),
        ({"type": "string", "enum": ["a", 1]}, "value 1 is not of type"),
        ('{"anyOf": [' * 40 + "{}" + "]}" * 40, "nests more than 32"),
        ("[" * 30_000 + "]" * 30_000, "nested too deeply"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_naming_the_keyword(
    schema: object, words: str
) -> None:
    assert words in refusal(schema)
