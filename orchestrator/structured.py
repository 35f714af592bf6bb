"""Structured output: a request's ``response_format`` as the GBNF grammar the worker's sampler
chain enforces, compiled and checked at admission so a schema that cannot be enforced is refused
before anything is queued.

The JSON Schema → GBNF conversion is llama-cpp-python's (``llama_cpp/llama_grammar.py``). That
module is pure Python, but importing it through its package loads the native library (a CUDA
build fails to import on a machine without a driver, and the orchestrator never decodes), so it
is loaded from its file on its own.

The converter enforces only some keywords and ignores the rest, and where one schema carries
keywords of two kinds (say ``pattern`` and ``minLength``) it enforces only one. Accepting such a
schema would answer with JSON that may not match it, so each schema object is checked first:
annotations pass, one kind of constraint is allowed per object, and anything else is refused
with the keyword named.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from types import ModuleType
from typing import Any

import jsonschema
from llorch.orchestrator.v1 import orchestrator_pb2

from mesh.common_types import MAX_GRAMMAR_BYTES
from mesh.errors import InvalidArgumentError

MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPTH = 32
"""Most nested schema objects (deeper ones would recurse in the validator and the converter)."""
MAX_REPEAT = 1000
"""Largest minItems, maxItems, minLength or maxLength: the converter writes a grammar rule per
repetition, so a bound of millions takes seconds and gigabytes to compile."""
MAX_CHOICES = 256
"""Most values of one enum: the grammar checks every candidate token against each branch at
every step, which costs the whole batch (a 6,000-value enum made a step 170x slower)."""

_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "$schema",
        "$id",
        "$comment",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",  # OpenAPI's, beside oneOf (Pydantic's tagged unions)
    }
)
_CONTAINERS = frozenset({"$defs", "definitions"})
# The converter's branches, in the order it tries them: one per schema object.
_KINDS: dict[str, frozenset[str]] = {
    "reference": frozenset({"$ref"}),
    "union": frozenset({"anyOf"}),
    "exclusive union": frozenset({"oneOf"}),
    "constant": frozenset({"const"}),
    "enumeration": frozenset({"enum"}),
    "object": frozenset({"properties", "additionalProperties", "required"}),
    "array": frozenset({"items", "prefixItems", "minItems", "maxItems"}),
    "pattern": frozenset({"pattern"}),
    "format": frozenset({"format"}),
    "string length": frozenset({"minLength", "maxLength"}),
}
_KIND_OF = {keyword: kind for kind, keywords in _KINDS.items() for keyword in keywords}
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", *(f"uuid{v}" for v in range(1, 6))})
_STRING_KINDS = frozenset({"pattern", "format", "string length"})


@functools.cache
def _converter_module() -> ModuleType:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed")
    path = f"{next(iter(spec.submodule_search_locations))}/llama_grammar.py"
    module_spec = importlib.util.spec_from_file_location("_llorch_llama_grammar", path)
    if module_spec is None or module_spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    # Its string character lets control characters through unescaped, which JSON forbids (a
    # model that samples a newline inside a string wrote invalid JSON); llama.cpp's own
    # converter has since excluded them, as here. This copy of the module is ours alone.
    module.PRIMITIVE_RULES["char"] = module.BuiltinRule(
        r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', []
    )
    return module


def grammar_of(response_format: orchestrator_pb2.ResponseFormat, field: str) -> str:
    """The grammar a response format asks for ("" for free text).

    Raises:
        InvalidArgumentError: naming ``field`` (or its ``json_schema.schema``): the schema is
            not JSON, not a valid JSON Schema, uses a keyword that cannot be enforced, or
            compiles to a grammar above the size limit.
    """
    which = response_format.WhichOneof("format")
    if which is None or which == "text":
        return ""
    if which == "json_object":
        return _compile({"type": "object"}, field)
    schema_field = f"{field}.json_schema.schema"
    text = response_format.json_schema.schema
    if not text:
        raise InvalidArgumentError(schema_field, "is required")
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise InvalidArgumentError(schema_field, f"is longer than {MAX_SCHEMA_BYTES} bytes")
    try:
        schema = json.loads(text)
    except RecursionError:
        raise InvalidArgumentError(schema_field, "is nested too deeply") from None
    except ValueError as exc:
        raise InvalidArgumentError(schema_field, f"is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgumentError(schema_field, "must be a JSON object")
    if _depth(schema) > MAX_DEPTH:
        raise InvalidArgumentError(
            schema_field, f"nests more than {MAX_DEPTH} levels of objects and arrays"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidArgumentError(
            schema_field, f"is not a valid JSON Schema: {exc.message}"
        ) from None
    _check_enforceable(schema, schema_field, "")
    return _compile(schema, schema_field)


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, (dict, list)):
                deepest = max(deepest, depth + 1)
                if deepest > MAX_DEPTH:
                    return deepest
                stack.append((child, depth + 1))
    return deepest


def _compile(schema: dict[str, Any], field: str) -> str:
    module = _converter_module()
    converter = module.SchemaConverter(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        resolved = converter.resolve_refs(schema, "request")
        converter.visit(resolved, "")
        grammar = str(converter.format_grammar())
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidArgumentError(field, f"cannot be enforced as a grammar: {exc}") from None
    if len(grammar.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise InvalidArgumentError(
            field,
            f"compiles to a grammar of more than {MAX_GRAMMAR_BYTES} bytes (long repetitions: "
            "large maxItems or maxLength)",
        )
    return grammar


def _check_enforceable(schema: Any, field: str, at: str) -> None:
    """Refuses a schema object whose keywords the converter would not all enforce."""
    where = f"at {at}" if at else "at the root"
    if not isinstance(schema, dict):
        raise InvalidArgumentError(field, f"{where}: a schema must be an object here")
    kinds: set[str] = set()
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS or keyword == "type":
            continue
        if keyword in _CONTAINERS:
            if not isinstance(value, dict):
                raise InvalidArgumentError(field, f"{where}: {keyword} must be an object")
            for name, sub in value.items():
                _check_enforceable(sub, field, f"{at}/{keyword}/{name}")
            continue
        kind = _KIND_OF.get(keyword)
        if kind is None:
            raise InvalidArgumentError(
                field, f"{where}: keyword {keyword!r} cannot be enforced while sampling"
            )
        kinds.add(kind)
        _check_children(keyword, value, field, at)
    types = schema.get("type")
    if isinstance(types, list):
        if kinds:
            raise InvalidArgumentError(
                field, f"{where}: a list of types cannot carry other constraints; use anyOf"
            )
        for t in types:
            _check_type(t, field, where)
    elif types is not None:
        _check_type(types, field, where)
    if len(kinds) > 1:
        raise InvalidArgumentError(
            field,
            f"{where}: {' and '.join(sorted(kinds))} constraints together cannot be enforced; "
            "split them with anyOf or $ref",
        )
    if kinds & _STRING_KINDS and types not in (None, "string"):
        raise InvalidArgumentError(field, f"{where}: {kinds.pop()} needs type string")
    fmt = schema.get("format")
    if fmt is not None and fmt not in _FORMATS:
        raise InvalidArgumentError(
            field, f"{where}: format {fmt!r} cannot be enforced (supported: {sorted(_FORMATS)})"
        )
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        _check_pattern(pattern, field, where)
    for keyword in ("minItems", "maxItems", "minLength", "maxLength"):
        bound = schema.get(keyword)
        if isinstance(bound, int) and bound > MAX_REPEAT:
            raise InvalidArgumentError(field, f"{where}: {keyword} may be at most {MAX_REPEAT}")
    if kinds == {"array"} and "items" not in schema and "prefixItems" not in schema:
        raise InvalidArgumentError(
            field, f"{where}: minItems and maxItems are enforced only with items or prefixItems"
        )
    if "items" in schema and "prefixItems" in schema:
        raise InvalidArgumentError(
            field, f"{where}: items and prefixItems together cannot be enforced; use one"
        )
    if schema.get("items") == {}:
        raise InvalidArgumentError(field, f"{where}: items must say what the items are")
    required = schema.get("required")
    if isinstance(required, list):
        missing = [r for r in required if r not in (schema.get("properties") or {})]
        if missing:
            raise InvalidArgumentError(
                field, f"{where}: required names {missing[0]!r}, which properties lacks"
            )
    values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else []
    if len(values) > MAX_CHOICES:
        raise InvalidArgumentError(field, f"{where}: enum may hold at most {MAX_CHOICES} values")
    if values and types is not None:
        check = jsonschema.validators.validator_for({})({"type": types})
        for value in values:
            if not check.is_valid(value):
                raise InvalidArgumentError(
                    field, f"{where}: value {value!r} is not of type {types!r}"
                )


# What a pattern may hold: the converter turns these into a grammar faithfully, and what they
# match needs no escaping inside a JSON string. Escapes (\d is not translated; \\ and \"
# would be written raw), "." and negated classes (which let quotes, backslashes and control
# characters through) and control characters themselves (NUL matches no token, and a grammar
# that allows no token aborts llama.cpp) are refused.
_PATTERN_REFUSED = re.compile(r'[\\."\x00-\x1f\x7f]|\[\^')


def _check_pattern(pattern: str, field: str, where: str) -> None:
    if not re.fullmatch(r"\^.*\$", pattern, re.DOTALL):
        raise InvalidArgumentError(field, f"{where}: pattern must start with ^ and end with $")
    refused = _PATTERN_REFUSED.search(pattern)
    if refused is not None:
        raise InvalidArgumentError(
            field,
            f"{where}: pattern may not hold {refused.group(0)!r} (escapes, '.', quotes, negated "
            "classes and control characters cannot be enforced inside a JSON string)",
        )


def _check_type(value: Any, field: str, where: str) -> None:
    if value not in _TYPES:
        raise InvalidArgumentError(field, f"{where}: unknown type {value!r}")


def _check_children(keyword: str, value: Any, field: str, at: str) -> None:
    if keyword == "properties" and isinstance(value, dict):
        for name, sub in value.items():
            _check_enforceable(sub, field, f"{at}/properties/{name}")
    elif keyword == "additionalProperties" and isinstance(value, dict):
        _check_enforceable(value, field, f"{at}/additionalProperties")
    elif keyword in ("anyOf", "oneOf", "prefixItems") and isinstance(value, list):
        for i, sub in enumerate(value):
            _check_enforceable(sub, field, f"{at}/{keyword}/{i}")
    elif keyword == "items":
        if isinstance(value, list):
            for i, sub in enumerate(value):
                _check_enforceable(sub, field, f"{at}/items/{i}")
        else:
            _check_enforceable(value, field, f"{at}/items")
