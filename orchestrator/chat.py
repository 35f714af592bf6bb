"""Chat messages rendered with the model's own template (``tokenizer.chat_template``, which the
catalog read from the GGUF), once per task, at admission.

The Jinja2 environment is the one HF transformers and llama-cpp-python render chat templates in,
so a model's template renders here as it does there: ``ImmutableSandboxedEnvironment`` (a template
from a downloaded file cannot reach Python), trim_blocks, lstrip_blocks, loopcontrols,
``{% generation %}`` tags passed through, ``tojson`` without ASCII escaping, and the globals
``raise_exception`` and ``strftime_now``; the variables are ``messages``, ``bos_token``,
``eos_token`` and ``add_generation_prompt`` (always true: the model answers next).

The worker tokenizes the rendered text with special-token text read as the tokens (the template
writes them, ``<|im_start|>`` and the like) and adds no BOS of its own. That would also turn
such text inside a message into real control tokens, letting a client close its turn and open a
system one, which llama-server and transformers allow. Content holding a control token's text is
refused instead, naming the message (docs/decisions.md, "Chat templates").
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mesh.errors import FailedPreconditionError, InvalidArgumentError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, validated."""

    role: str
    """One of ``ROLES``."""
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """What rendering needs from the catalog's record of a model."""

    model_id: str
    template: str
    bos_token: str = ""
    eos_token: str = ""
    control_tokens: tuple[str, ...] = ()


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` (transformers' assistant-mask tag) renders its
    body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateRaised(Exception):
    """The template called ``raise_exception`` (its own check of the messages)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


MAX_RENDERED_ITEMS = 1_000_000
"""Largest string or list a template's ``*`` may make, and the largest exponent of its ``**``
(the sandbox bounds ``range`` but not these; ``'a' * 10**10`` would take the process's
memory)."""


class _TemplateSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with ``*`` and ``**`` bounded."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise _TemplateRaised(f"exponent {right} is too large")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * count > MAX_RENDERED_ITEMS:
                        raise _TemplateRaised("a repetition would be too large")
        return super().call_binop(context, operator, left, right)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = _TemplateSandbox(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def _compiled(template: str) -> jinja2.Template:
    return _environment().from_string(template)


@functools.lru_cache(maxsize=64)
def _control_pattern(control_tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    texts = sorted({t for t in control_tokens if t}, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in texts)) if texts else None


def render(chat: ChatTemplate, messages: Sequence[ChatMessage], field: str = "messages") -> str:
    """The prompt text of a conversation, ending where the assistant's answer begins.

    Raises:
        FailedPreconditionError: the model has no chat template (CHAT_TEMPLATE_MISSING).
        InvalidArgumentError: naming ``field``: a message holds a control token's text, or the
            template refused the conversation or failed on it.
    """
    if not chat.template:
        raise FailedPreconditionError(
            f"model {chat.model_id} has no chat template (tokenizer.chat_template); send a "
            "prompt instead of messages",
            reason="CHAT_TEMPLATE_MISSING",
        )
    pattern = _control_pattern(chat.control_tokens)
    if pattern is not None:
        for i, message in enumerate(messages):
            found = pattern.search(message.content)
            if found is not None:
                raise InvalidArgumentError(
                    f"{field}[{i}].content",
                    f"holds {found.group(0)!r}, the text of one of model {chat.model_id}'s "
                    "control tokens, which message content may not contain",
                )
    try:
        template = _compiled(chat.template)
        return template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            bos_token=chat.bos_token,
            eos_token=chat.eos_token,
            add_generation_prompt=True,
        )
    except _TemplateRaised as exc:
        raise InvalidArgumentError(
            field, f"refused by model {chat.model_id}'s chat template: {exc}"
        ) from None
    except jinja2.TemplateError as exc:  # includes SecurityError from the sandbox
        raise InvalidArgumentError(
            field, f"model {chat.model_id}'s chat template failed on them: {exc}"
        ) from None
    except Exception as exc:  # a model's template is code from its file
        # RecursionError, ZeroDivisionError, OverflowError, MemoryError…: whatever a template
        # does, it is this request's bad luck with this model, never the orchestrator's.
        raise InvalidArgumentError(
            field, f"model {chat.model_id}'s chat template failed on them: {exc!r}"
        ) from None
