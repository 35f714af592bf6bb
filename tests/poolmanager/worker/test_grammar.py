"""Structured output in the batching engine: a response format compiled by the orchestrator
(orchestrator.structured) is enforced by each sequence's own sampler chain, beside sequences
without one in the same batch, on the real tiny model in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from llorch.orchestrator.v1 import orchestrator_pb2

from orchestrator.structured import grammar_of
from poolmanager.worker.engine import EngineMisuse, GrammarError, LlamaEngine
from poolmanager.worker.protocol import Done, Execute, Failed, LoadSpec
from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.poolmanager.worker.test_batching import Runner

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 12},
        "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "when": {"type": "string", "format": "date"},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "number"}]},
    },
    "required": ["ok", "color", "name", "n", "tags", "when"],
    "additionalProperties": False,
}


def grammar(schema: dict[str, object] | None) -> str:
    if schema is None:
        fmt = orchestrator_pb2.ResponseFormat(json_object=orchestrator_pb2.JsonObjectFormat())
    else:
        fmt = orchestrator_pb2.ResponseFormat(
            json_schema=orchestrator_pb2.JsonSchemaFormat(schema=json.dumps(schema))
        )
    return grammar_of(fmt, "response_format")


@pytest.fixture(scope="module", params=[0, 7], ids=["weights-seed-0", "weights-seed-7"])
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaEngine]:
    spec = TinyModelSpec(seed=request.param)
    path = write_tiny_model(tmp_path_factory.mktemp("grammar") / "tiny.gguf", spec)
    eng = LlamaEngine(LoadSpec(model=str(path), n_ctx=1024, slots=8, n_threads=1))
    yield eng
    eng.close()


def test_every_constrained_completion_parses_and_matches_its_schema_beside_free_ones(
    engine: LlamaEngine,
) -> None:
    schema_grammar = grammar(SCHEMA)
    cmds = []
    for seed in range(24):
        constrained = seed % 3 != 2  # two of three constrained, the rest free text
        cmds.append(
            Execute(
                id=f"s{seed}",
                prompt="Answer in JSON: the river and the mountain",
                max_tokens=400,
                temperature=0.0 if seed == 0 else 1.2,
                top_p=0.95,
                top_k=40,
                seed=seed,
                grammar=schema_grammar if constrained else "",
            )
        )
    runner = Runner(engine)
    runner.submit(*cmds)
    streams = runner.run()
    constrained_done = 0
    for c in cmds:
        stream = streams[c.id]
        assert isinstance(stream.end, Done), (c.id, stream.end)
        if c.grammar:
            # The grammar ends the text: the only token it allows when complete is EOS.
            assert stream.end.reason == "stop", (c.id, stream.text)
            jsonschema.validate(json.loads(stream.text), SCHEMA)
            constrained_done += 1
        else:
            with pytest.raises(ValueError):  # free text from random weights is not JSON
                json.loads(stream.text)
    assert constrained_done == 16


def test_json_object_mode_gives_objects(tmp_path: Path) -> None:
    # A generic object's strings have no length limit, and random weights may never close
    # one: those runs end at max_tokens as text that begins an object. Those that end, end as
    # an object (the weights of seed 7 close one within the limit for most seeds).
    path = write_tiny_model(tmp_path / "tiny.gguf", TinyModelSpec(seed=7))
    engine = LlamaEngine(LoadSpec(model=str(path), n_ctx=1024, slots=8, n_threads=1))
    try:
        runner = Runner(engine)
        json_object = grammar(None)
        runner.submit(
            *(
                Execute(
                    id=f"o{seed}",
                    prompt="JSON please",
                    max_tokens=300,
                    temperature=1.0,
                    top_k=40,
                    top_p=0.95,
                    seed=seed,
                    grammar=json_object,
                )
                for seed in range(8)
            )
        )
        streams = runner.run()
    finally:
        engine.close()
    closed = 0
    for stream in streams.values():
        assert isinstance(stream.end, Done)
        if stream.end.reason == "stop":
            assert isinstance(json.loads(stream.text), dict)
            closed += 1
        else:
            assert stream.end.reason == "length" and stream.text.startswith("{")
    assert closed >= 3


def test_a_grammar_llama_cpp_cannot_parse_refuses_that_execution_only(engine: LlamaEngine) -> None:
    runner = Runner(engine)
    runner.submit(
        Execute(id="bad", prompt="x", max_tokens=4, grammar="root ::= ( unclosed"),
        Execute(id="fine", prompt="x", max_tokens=4),
    )
    streams = runner.run()
    bad = streams["bad"].end
    assert isinstance(bad, Failed) and bad.code == "INVALID_ARGUMENT" and bad.field == "grammar"
    assert isinstance(streams["fine"].end, Done)


def test_the_engine_refuses_a_grammar_with_ignore_eos(engine: LlamaEngine) -> None:
    with pytest.raises(EngineMisuse):
        engine.sampler(
            temperature=0, top_k=0, top_p=1, seed=0, ignore_eos=True, grammar=grammar(SCHEMA)
        )
    with pytest.raises(GrammarError):
        engine.sampler(temperature=0, top_k=0, top_p=1, seed=0, ignore_eos=False, grammar="x")


@pytest.mark.parametrize(
    ("dead_end", "after"),
    [
        # No token's text can hold NUL (llama.cpp matches grammars against C strings).
        ('root ::= "\\x00"', 0),
        ('root ::= "river" "\\x00"', 5),  # "river" without its space: five letter tokens
    ],
)
def test_a_grammar_that_allows_no_token_ends_that_execution_only(
    engine: LlamaEngine, dead_end: str, after: int
) -> None:
    """llama.cpp aborts the process when a grammar rejects every token; the engine sees it
    first, and only the execution with that grammar ends."""
    runner = Runner(engine)
    runner.submit(
        Execute(id="dead", prompt="x", max_tokens=8, temperature=1.0, seed=3, grammar=dead_end),
        Execute(id="greedy-dead", prompt="x", max_tokens=8, grammar=dead_end),
        Execute(id="free", prompt="x", max_tokens=6, temperature=1.0, seed=3),
        Execute(id="json", prompt="x", max_tokens=400, grammar=grammar(SCHEMA)),
    )
    streams = runner.run()
    for name in ("dead", "greedy-dead"):
        end = streams[name].end
        assert isinstance(end, Failed), (name, end)
        assert (end.code, end.field, end.reason) == (
            "INVALID_ARGUMENT",
            "response_format",
            "GRAMMAR_DEAD_END",
        )
        assert f"after {after} tokens" in end.message
    assert isinstance(streams["free"].end, Done)
    json_end = streams["json"].end
    assert isinstance(json_end, Done) and json_end.reason == "stop"
    jsonschema.validate(json.loads(streams["json"].text), SCHEMA)
