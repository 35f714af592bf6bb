"""The OpenAI-compatible surface of the REST edge (gateway/edge/openai.go, base URL /openai/v1),
called by the real `openai` package, as client developers do by changing ``base_url``: in front
of the cloud-profile mesh with TLS and API keys (tests/e2e/secure_mesh.py).

Skips, as tests/e2e/test_gateway.py does, when the gateway is not built.
"""
# The gateway's module fixtures are imported from test_gateway.py and then named as test
# parameters, which pyflakes reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from tests.e2e.helpers import doc_recipes, run_recipes
from tests.e2e.secure_mesh import SecureMesh
from tests.e2e.test_gateway import (  # noqa: F401  (module fixtures, taken by name)
    GATEWAY,
    REPO,
    Gateway,
    _auth,
    client_key,
    gateway,
    secure,
)

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(GATEWAY is None, reason="llorch-gateway is not built (`make gateway`)"),
]

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Is the river quiet?"},
]


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    score: int


def client(gateway: Gateway, key: str, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{gateway.host}:{gateway.port}/openai/v1",
        api_key=key,
        max_retries=0,
        timeout=60,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def oai(gateway: Gateway, client_key: str) -> Iterator[openai.OpenAI]:
    with client(gateway, client_key) as c:
        yield c


async def test_models_list_and_retrieve_parse(oai: openai.OpenAI) -> None:
    listed = await asyncio.to_thread(oai.models.list)
    ids = [m.id for m in listed.data]
    assert "tiny-llama" in ids
    model = await asyncio.to_thread(oai.models.retrieve, "tiny-llama")
    assert model.id == "tiny-llama" and model.object == "model" and model.created > 0
    with pytest.raises(openai.NotFoundError):
        await asyncio.to_thread(oai.models.retrieve, "no-such-model")


async def test_chat_completion_with_usage(oai: openai.OpenAI) -> None:
    answer = await asyncio.to_thread(
        oai.chat.completions.create,
        model="tiny-llama",
        messages=CHAT,  # type: ignore[arg-type]
        max_completion_tokens=12,
        temperature=0,
        seed=-1,  # OpenAI's seeds are signed; the edge takes them mod 2**32
    )
    assert answer.object == "chat.completion"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    details = answer.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None


async def test_a_repeated_conversation_reports_its_cached_prompt_tokens(oai: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You know the river and the mountain well. " * 12},
        {"role": "user", "content": "Is the river quiet?"},
    ]
    usages = []
    for _ in range(2):
        answer = await asyncio.to_thread(
            oai.chat.completions.create,
            model="tiny-llama",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4,
            temperature=0,
        )
        assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
        usages.append(answer.usage)
    first = usages[0].prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    cached = usages[1].prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    # At first at most the template's opening is shared with earlier chats; the second time all
    # but the last prompt token, whose logits the answer needs.
    assert first is not None and first < usages[0].prompt_tokens // 4
    assert cached == usages[1].prompt_tokens - 1


async def test_chat_stream_sends_role_then_content_then_finish_then_usage(
    oai: openai.OpenAI,
) -> None:
    def run() -> list[openai.types.chat.ChatCompletionChunk]:
        stream = oai.chat.completions.create(
            model="tiny-llama",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        return list(stream)

    chunks = await asyncio.to_thread(run)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens > 0 and usage.usage.prompt_tokens > 0
    assert len({c.id for c in chunks}) == 1


async def test_completions_stream_and_not(oai: openai.OpenAI) -> None:
    whole = await asyncio.to_thread(
        oai.completions.create, model="tiny-llama", prompt="Once upon a time", max_tokens=8, seed=3
    )
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens <= 8

    def streamed() -> str:
        stream = oai.completions.create(
            model="tiny-llama", prompt="Once upon a time", max_tokens=8, seed=3, stream=True
        )
        return "".join(c.choices[0].text for c in stream if c.choices)

    # The same seed gives the same text, streamed or not.
    assert await asyncio.to_thread(streamed) == whole.choices[0].text


async def test_parse_with_a_pydantic_model_gives_an_instance(oai: openai.OpenAI) -> None:
    for seed in range(3):
        parsed = await asyncio.to_thread(
            oai.chat.completions.parse,
            model="tiny-llama",
            messages=CHAT,  # type: ignore[arg-type]
            response_format=Verdict,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        verdict = parsed.choices[0].message.parsed
        assert isinstance(verdict, Verdict)


async def test_bad_requests_name_the_field(oai: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "<|im_start|>"}]}, "messages[0].content"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ]
    for change, param in cases:
        body: dict[str, object] = {"model": "tiny-llama", "messages": CHAT, **change}
        with pytest.raises(openai.BadRequestError) as raised:
            await asyncio.to_thread(oai.chat.completions.create, **body)  # type: ignore[arg-type]
        assert raised.value.status_code == 400
        error = raised.value.body
        assert isinstance(error, dict) and error.get("param") == param, (change, error)


async def test_unknown_fields_are_ignored(oai: openai.OpenAI) -> None:
    answer = await asyncio.to_thread(
        oai.chat.completions.create,
        model="tiny-llama",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=2,
        user="someone",
        extra_body={"a_field_no_one_knows": {"x": 1}, "top_k": 5, "priority": "batch"},
    )
    assert answer.choices[0].message.content is not None


async def test_a_wrong_key_is_an_authentication_error(gateway: Gateway) -> None:
    with client(gateway, "llk_not-a-key") as wrong:
        with pytest.raises(openai.AuthenticationError):
            await asyncio.to_thread(
                wrong.chat.completions.create,
                model="tiny-llama",
                messages=CHAT,  # type: ignore[arg-type]
                max_tokens=2,
            )


async def test_a_rate_limited_key_gets_429_with_retry_after(
    gateway: Gateway, secure: SecureMesh
) -> None:
    key, _ = secure.keys.create("tenant-openai-slow", "client", rate_per_s=1.0)
    with client(gateway, key) as slow:
        ask = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 1}
        await asyncio.to_thread(slow.chat.completions.create, **ask)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as limited:
            await asyncio.to_thread(slow.chat.completions.create, **ask)  # type: ignore[arg-type]
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.code == "rate_limited"


async def test_a_client_that_disconnects_cancels_its_task(
    gateway: Gateway, client_key: str, oai: openai.OpenAI
) -> None:
    def first_chunk_then_hang_up() -> str:
        stream = oai.chat.completions.create(
            model="tiny-llama",  # with a 32k context here: seconds of decoding
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=30_000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunk = next(iter(stream))
        stream.close()
        return chunk.id

    chunk_id = await asyncio.to_thread(first_chunk_then_hang_up)
    task_id = chunk_id.removeprefix("chatcmpl-")
    deadline = time.monotonic() + 20
    state = ""
    while time.monotonic() < deadline:
        response, body = await asyncio.to_thread(
            gateway.request, "GET", f"/v1/tasks/{task_id}", None, _auth(client_key)
        )
        assert response.status == 200, body
        state = body["task"]["state"]
        if state == "TASK_STATE_CANCELLED":
            break
        await asyncio.sleep(0.1)
    assert state == "TASK_STATE_CANCELLED"


async def test_every_openai_recipe_runs(gateway: Gateway, client_key: str) -> None:
    recipes = doc_recipes(REPO / "docs" / "operators.md", "## OpenAI-compatible API")
    assert len(recipes) == 3
    env = {
        **os.environ,
        "REST": f"http://{gateway.host}:{gateway.port}",
        "KEY": client_key,
        "PYTHON": sys.executable,
    }
    whole, streamed, sdk = await run_recipes(recipes, env)
    assert whole.strip().splitlines()[-1].isdigit()  # the usage's total
    assert streamed.rstrip().endswith("data: [DONE]") and '"usage":{' in streamed
    listed, _, verdict = sdk.strip().splitlines()
    assert "tiny-llama" in listed and verdict.startswith("answer=")


async def test_langchain_chat_openai_streams_and_gives_structured_output(
    gateway: Gateway, client_key: str
) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"http://{gateway.host}:{gateway.port}/openai/v1",
        api_key=client_key,  # type: ignore[arg-type]
        model="tiny-llama",
        max_tokens=200,  # type: ignore[call-arg]
        max_retries=0,
        temperature=0.7,
    )
    pieces = await asyncio.to_thread(lambda: [c.content for c in llm.stream("Hello")])
    assert "".join(str(p) for p in pieces)
    verdict = await asyncio.to_thread(
        llm.with_structured_output(Verdict).invoke, "Is the river quiet?"
    )
    assert isinstance(verdict, Verdict)
