"""The REST edge (gateway/, grpc-gateway in Go), built and started as a real process in front of
a mesh with TLS and API keys: NDJSON streaming as tokens come, disconnect cancels, HTTP statuses
with google.rpc details, headers passed both ways, /openapi.json and /healthz, HTTPS serving,
and the start-up refusals.

`make test` builds the gateway into .venv/bin (`make gateway`); without it (pytest run alone on
a machine without Go) this module skips and says so.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh import tracing
from tests.e2e.helpers import doc_recipes, run_recipes
from tests.e2e.secure_mesh import SecureMesh, start_secure_mesh

REPO = Path(__file__).resolve().parents[2]
GATEWAY = shutil.which("llorch-gateway", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
LONG = 30_000  # tokens: seconds of decoding on the 32k tiny model
PROMPT = "a prompt that must never reach a log line"

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(GATEWAY is None, reason="llorch-gateway is not built (`make gateway`)"),
]


@dataclass
class Gateway:
    """A running llorch-gateway process."""

    process: subprocess.Popen[str]
    host: str
    port: int
    log: Path
    tls: ssl.SSLContext | None = None

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self.tls
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[http.client.HTTPResponse, Any]:
        """One call; the response (read) and its body parsed as JSON."""
        conn = self.connection()
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers=headers or {})
            response = conn.getresponse()
            raw = response.read()
            return response, json.loads(raw) if raw else None
        finally:
            conn.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_gateway(log: Path, *args: str, tls: ssl.SSLContext | None = None) -> Gateway:
    """Starts the gateway on a free loopback port; returns once it says where it listens."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            [str(GATEWAY), "-listen", "127.0.0.1:0", *args],
            stdout=sink,
            stderr=sink,
            text=True,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("msg") == "listening":
                address = record["url"].split("://", 1)[1]
                host, port = address.rsplit(":", 1)
                return Gateway(process, host, int(port), log, tls)
        if process.poll() is not None:
            raise AssertionError(f"gateway exited {process.returncode}: {log.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"gateway did not start: {log.read_text()}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(
    tmp_path_factory: pytest.TempPathFactory, long_model: Path
) -> AsyncIterator[SecureMesh]:
    mesh = await start_secure_mesh(tmp_path_factory.mktemp("gateway-mesh"), long_model)
    try:
        yield mesh
    finally:
        await mesh.stop()


@pytest.fixture(scope="module")
def gateway(secure: SecureMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    running = start_gateway(
        log, "-orchestrator", secure.orchestrator_address, "-ca", str(secure.pki.ca)
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client_key(secure: SecureMesh) -> str:
    key, _ = secure.keys.create("team-a", "client")
    return key


def _auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **extra}


def _generate_body(max_tokens: int, **sampling: object) -> dict[str, object]:
    return {
        "model_id": "tiny-llama",
        "prompt": PROMPT,
        "sampling": {"max_tokens": max_tokens, "seed": 7, **sampling},
    }


def _lines(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The NDJSON lines of a streaming response, each as it arrives."""
    while line := response.readline():
        yield json.loads(line)


def _violated_fields(status: dict[str, Any]) -> list[str]:
    """The fields a google.rpc.Status's BadRequest detail names."""
    return [
        violation["field"]
        for detail in status["details"]
        if detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        for violation in detail["field_violations"]
    ]


def _task_state(gateway: Gateway, key: str, task_id: str) -> str:
    response, body = gateway.request("GET", f"/v1/tasks/{task_id}", headers=_auth(key))
    assert response.status == 200, body
    return str(body["task"]["state"])


async def test_generate_streams_ndjson_one_event_per_line(
    gateway: Gateway, client_key: str
) -> None:
    def call() -> tuple[http.client.HTTPResponse, list[dict[str, Any]]]:
        conn = gateway.connection()
        try:
            conn.request(
                "POST",
                "/v1/generate",
                body=json.dumps(_generate_body(12)),
                headers=_auth(client_key, **{"X-Correlation-Id": "rest-demo-1"}),
            )
            response = conn.getresponse()
            return response, list(_lines(response))
        finally:
            conn.close()

    response, lines = await asyncio.to_thread(call)
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/x-ndjson"
    assert response.getheader("X-Correlation-Id") == "rest-demo-1"
    for header, _ in response.getheaders():  # gRPC's own headers are not the client's
        assert not header.lower().startswith(("grpcgateway-", "grpc-metadata-grpc-")), header
    events = [line["result"]["event"] for line in lines]
    kinds = [next(k for k in event if k != "task_id") for event in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "finished", kinds
    assert set(kinds[2:-1]) <= {"token", "metrics"} and "token" in kinds
    assert len({event["task_id"] for event in events}) == 1
    tokens = [event["token"] for event in events if "token" in event]
    # A line holds the tokens made since the previous one; index is its first token's place.
    starts = [0]
    for token in tokens[:-1]:
        starts.append(starts[-1] + len(token["token_ids"]))
    assert [t["index"] for t in tokens] == starts
    finished = events[-1]["finished"]
    assert finished["finish_reason"] in {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP"}
    assert sum(len(t["token_ids"]) for t in tokens) == finished["tokens_out"]
    assert events[1]["started"]["model_id"] == "tiny-llama"


async def test_chat_messages_and_a_json_schema_over_rest(gateway: Gateway, client_key: str) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    body = {
        "model_id": "tiny-llama",
        "messages": [{"role": "ROLE_USER", "content": "Answer in JSON"}],
        "response_format": {"json_schema": {"schema": json.dumps(schema)}},
        "sampling": {"max_tokens": 100, "temperature": 0},
    }

    def call() -> list[dict[str, Any]]:
        conn = gateway.connection()
        try:
            conn.request("POST", "/v1/generate", body=json.dumps(body), headers=_auth(client_key))
            response = conn.getresponse()
            assert response.status == 200
            return list(_lines(response))
        finally:
            conn.close()

    events = [line["result"]["event"] for line in await asyncio.to_thread(call)]
    text = "".join(e["token"]["text"] for e in events if "token" in e)
    assert json.loads(text).keys() == {"ok", "n"}
    body["messages"] = [{"role": "ROLE_USER", "content": "<|im_start|>"}]
    response, error = await asyncio.to_thread(
        gateway.request, "POST", "/v1/generate", body, _auth(client_key)
    )
    assert response.status == 400
    assert "messages[0].content" in json.dumps(error)


async def test_tokens_arrive_while_decoding_and_hanging_up_cancels_the_task(
    gateway: Gateway, client_key: str
) -> None:
    def first_token_then_hang_up() -> tuple[str, str]:
        conn = gateway.connection()
        conn.request(
            "POST",
            "/v1/generate",
            body=json.dumps(_generate_body(LONG, ignore_eos=True)),
            headers=_auth(client_key),
        )
        response = conn.getresponse()
        for line in _lines(response):
            event = line["result"]["event"]
            if "token" in event:
                # A token line came while the task still decodes: the edge does not buffer.
                state = _task_state(gateway, client_key, event["task_id"])
                conn.close()
                return event["task_id"], state
        raise AssertionError("the stream ended before its first token")

    task_id, state_at_first_token = await asyncio.to_thread(first_token_then_hang_up)
    assert state_at_first_token == "TASK_STATE_RUNNING"
    deadline = time.monotonic() + 10
    while (
        state := await asyncio.to_thread(_task_state, gateway, client_key, task_id)
    ) != "TASK_STATE_CANCELLED":
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.05)


async def test_submit_then_stream_events_and_cancel_over_rest(
    gateway: Gateway, client_key: str
) -> None:
    def run() -> None:
        response, submitted = gateway.request(
            "POST", "/v1/tasks", _generate_body(LONG, ignore_eos=True), _auth(client_key)
        )
        assert response.status == 200, submitted
        task_id = submitted["task_id"]
        assert submitted["queue_position"] == 0  # defaults are shown, not left out
        conn = gateway.connection()
        try:
            conn.request("GET", f"/v1/tasks/{task_id}/events", headers=_auth(client_key))
            events = conn.getresponse()
            assert events.getheader("Content-Type") == "application/x-ndjson"
            for line in _lines(events):
                if "token" in line["result"]["event"]:
                    break
            response, _ = gateway.request(
                "POST", f"/v1/tasks/{task_id}:cancel", {}, _auth(client_key)
            )
            assert response.status == 200
            # The stream ends with the call's status as its last line.
            last = list(_lines(events))[-1]
            assert last["error"]["code"] == 1, last  # CANCELLED
            assert last["error"]["details"][0]["reason"] == "TASK_CANCELLED"
        finally:
            conn.close()
        assert _task_state(gateway, client_key, task_id) == "TASK_STATE_CANCELLED"

    await asyncio.to_thread(run)


async def test_errors_carry_http_status_and_google_rpc_details(
    gateway: Gateway, secure: SecureMesh, client_key: str
) -> None:
    limited, _ = secure.keys.create("team-b", "client", rate_per_s=0.25)

    def run() -> None:
        response, body = gateway.request("POST", "/v1/tasks", _generate_body(4))
        assert response.status == 401 and body["code"] == 16, body  # no key
        assert response.getheader("WWW-Authenticate")

        missing = {"model_id": "tiny-llama", "prompt": ""}
        response, body = gateway.request("POST", "/v1/tasks", missing, _auth(client_key))
        assert response.status == 400 and body["code"] == 3, body
        assert _violated_fields(body) == ["prompt"]

        unknown = {**_generate_body(4), "model_id": "no-such-model"}
        response, body = gateway.request("POST", "/v1/tasks", unknown, _auth(client_key))
        assert response.status == 404, body
        reasons = [d["reason"] for d in body["details"] if "reason" in d]
        assert reasons == ["MODEL_NOT_FOUND"]

        response, body = gateway.request(
            "POST", "/v1/tasks", {**_generate_body(4), "max_tokenz": 3}, _auth(client_key)
        )
        assert response.status == 400 and "max_tokenz" in body["message"], body

        # A stream refused before its first event: the same status, the error as its one line.
        response, body = gateway.request("POST", "/v1/generate", unknown, _auth(client_key))
        assert response.status == 404 and body["error"]["code"] == 5, body

        # RetryInfo becomes Retry-After, on a unary call and on a stream refused at its start.
        statuses = []
        for _ in range(3):
            response, body = gateway.request("POST", "/v1/tasks", _generate_body(2), _auth(limited))
            statuses.append(response.status)
        assert statuses[0] == 200 and statuses[-1] == 429, (statuses, body)
        assert 1 <= int(response.getheader("Retry-After") or "0") <= 4
        assert [d["reason"] for d in body["details"] if "reason" in d] == ["RATE_LIMITED"]
        response, body = gateway.request("POST", "/v1/generate", _generate_body(2), _auth(limited))
        assert response.status == 429 and body["error"]["code"] == 8, body
        assert 1 <= int(response.getheader("Retry-After") or "0") <= 4

        response, body = gateway.request("GET", "/v1/no-such-route")
        assert response.status == 404

    await asyncio.to_thread(run)


async def test_openapi_document_and_health_are_served(gateway: Gateway) -> None:
    def run() -> None:
        conn = gateway.connection()
        try:
            conn.request("GET", "/openapi.json")
            response = conn.getresponse()
            served = response.read()
        finally:
            conn.close()
        assert response.status == 200
        assert served == (REPO / "gateway" / "openapi" / "llorch.swagger.json").read_bytes()
        document = json.loads(served)
        assert document["info"]["title"] == "llama-orch REST API"
        assert {"/v1/generate", "/v1/tasks/{task_id}:cancel", "/v1/pools"} <= set(document["paths"])
        # Proto field names, as the gateway speaks them.
        request = document["definitions"]["v1SubmitTaskRequest"]["properties"]
        assert "model_id" in request and "modelId" not in request
        response, body = gateway.request("GET", "/healthz")
        assert response.status == 200 and body == {"status": "SERVING"}

    await asyncio.to_thread(run)


async def test_w3c_trace_context_passes_through_the_edge(gateway: Gateway, client_key: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = tracing.use_provider(provider)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        response, _ = await asyncio.to_thread(
            gateway.request,
            "POST",
            "/v1/tasks",
            _generate_body(2),
            _auth(client_key, traceparent=f"00-{trace_id}-{parent_id}-01"),
        )
    finally:
        tracing.use_provider(previous)
    assert response.status == 200
    server = [
        s
        for s in exporter.get_finished_spans()
        if s.name == "llorch.orchestrator.v1.OrchestratorService/SubmitTask"
    ]
    assert len(server) == 1 and server[0].parent is not None
    assert f"{server[0].context.trace_id:032x}" == trace_id
    assert f"{server[0].parent.span_id:016x}" == parent_id


async def test_operator_routes_need_an_operator_key(
    gateway: Gateway, secure: SecureMesh, client_key: str
) -> None:
    operator, _ = secure.keys.create("ops", "operator")

    def run() -> None:
        response, body = gateway.request("GET", "/v1/pools", headers=_auth(client_key))
        assert response.status == 403, body
        response, body = gateway.request("GET", "/v1/pools", headers=_auth(operator))
        assert response.status == 200, body
        assert [p["pool_id"] for p in body["pools"]] == ["cpu-0"]

    await asyncio.to_thread(run)


async def test_log_lines_are_json_without_keys_or_prompts(
    gateway: Gateway, client_key: str
) -> None:
    await asyncio.to_thread(
        gateway.request,
        "POST",
        "/v1/tasks",
        _generate_body(2),
        _auth(client_key, **{"X-Correlation-Id": "log-check-1"}),
    )
    await asyncio.sleep(0.2)
    text = gateway.log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    requests = [r for r in records if r["msg"] == "request"]
    assert any(
        r["correlation_id"] == "log-check-1" and r["status"] == 200 and r["path"] == "/v1/tasks"
        for r in requests
    )
    assert client_key not in text and client_key[len("llk_") + 13 :] not in text
    assert PROMPT not in text


async def test_serves_https_with_a_certificate(secure: SecureMesh, tmp_path: Path) -> None:
    served = secure.pki.files("orch")  # any certificate naming localhost
    context = ssl.create_default_context(cafile=str(secure.pki.ca))
    running = start_gateway(
        tmp_path / "gateway.log",
        "-orchestrator", secure.orchestrator_address, "-ca", str(secure.pki.ca),
        "-serve-cert", str(served.cert), "-serve-key", str(served.key),
        tls=context,
    )  # fmt: skip
    try:
        running.host = "localhost"
        response, body = await asyncio.to_thread(running.request, "GET", "/healthz")
        assert response.status == 200 and body == {"status": "SERVING"}
    finally:
        running.stop()


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (`make test` does)")
async def test_every_curl_recipe_runs(
    gateway: Gateway, secure: SecureMesh, client_key: str
) -> None:
    recipes = doc_recipes(REPO / "docs" / "operators.md", "### curl recipes")
    assert len(recipes) == 6
    operator, _ = secure.keys.create("ops-curl", "operator")
    env = {
        **os.environ,
        "REST": f"http://{gateway.host}:{gateway.port}",
        "KEY": client_key,
        "OPS_KEY": operator,
    }
    outputs = await run_recipes(recipes, env)
    streamed, text, followed, refusal, pools, paths = outputs
    # The tiny model may sample its end of sequence early: at most the 8 tokens asked for.
    assert (
        1 <= json.loads(streamed.splitlines()[-1])["result"]["event"]["finished"]["tokens_out"] <= 8
    )
    assert text and "{" not in text
    got, *events, cancelled = followed.splitlines()
    task_id = json.loads(got)["task"]["task_id"]
    assert [json.loads(e)["result"]["event"]["task_id"] for e in events] == [task_id] * len(events)
    assert "finished" in json.loads(events[-1])["result"]["event"]
    # Cancelling a finished task changes nothing and says how it ended.
    assert json.loads(cancelled) == {"state": "TASK_STATE_SUCCEEDED"}
    head, body = re.split(r"\r?\n\r?\n", refusal, maxsplit=1)
    assert head.startswith("HTTP/1.1 400") and "X-Correlation-Id" in head, refusal
    assert _violated_fields(json.loads(body)) == ["prompt"]
    assert json.loads(pools.splitlines()[0])["pools"][0]["pool_id"] == "cpu-0"
    assert "/v1/generate" in paths.split()


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["-listen", "0.0.0.0:0"], "-serve-cert"),
        (["-orchestrator", "10.1.2.3:50051"], "-ca"),
        (["-catalog", "127.0.0.1:1", "-ca", "/dev/null"], "-catalog"),
        (["-catalog", "10.1.2.3:7001"], "-catalog"),
        (["-serve-cert", "x.pem"], "-serve-key"),
        (["-orchestrator", "no-port"], "-orchestrator"),
        (["stray"], "unexpected arguments"),
    ],
)
async def test_refuses_unsafe_or_broken_settings(args: list[str], names: str) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [str(GATEWAY), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert names in done.stderr
