"""The home profile as a user starts it: `llorch up`, `llorch generate`, `llorch models list`."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from launch.gateway import find_gateway
from launch.harness import LLORCH
from tests.e2e.helpers import start_llorch


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    frontier.append(kid)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    env = {
        **os.environ,
        "LLORCH_DATA_DIR": str(tmp_path / "data"),
        "LLORCH_LISTEN": "127.0.0.1:0",
        "LLORCH_GATEWAY_LISTEN": "127.0.0.1:0",
    }
    proc = subprocess.Popen(
        [*LLORCH, "up", "--log-format", "text"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the one ready line (the process exits if it fails)
    assert line.startswith("llorch ready: orchestrator 127.0.0.1:"), line
    address = line.split()[3]
    try:
        yield proc, address, tmp_path / "data"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run(
    *args: str, data_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = env or {**os.environ, "LLORCH_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [*LLORCH, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_up_generate_models_and_clean_ctrl_c(
    home: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, address, data_dir = home
    generated = _run(
        "generate",
        "--orchestrator",
        address,
        "--model",
        "tiny-llama",
        "--max-tokens",
        "16",
        "--seed",
        "3",
        "Hello",
        data_dir=data_dir,
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()
    assert "16 tokens" in generated.stderr

    listed = _run("models", "list", data_dir=data_dir)
    assert listed.returncode == 0, listed.stderr
    assert "tiny-llama" in listed.stdout
    assert "active" in listed.stdout

    unknown = _run("generate", "--orchestrator", address, "--model", "nope", "x", data_dir=data_dir)
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr

    workers = _children(proc.pid)
    assert workers, "the pool manager should have started a worker process"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)


def test_up_runs_four_tasks_at_once_on_its_pool_and_top_shows_them(
    home: tuple[subprocess.Popen[str], str, Path],
) -> None:
    # The home profile's CPU pool has 4 slots: six long generations at once fill all four (the
    # other two wait in the queue), as `llorch pools list` and `llorch top` show.
    _, address, data_dir = home
    env = {**os.environ, "LLORCH_DATA_DIR": str(data_dir), "LLORCH_ORCHESTRATOR": address}
    listed = _run("pools", "list", data_dir=data_dir, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "0/4" in listed.stdout.splitlines()[1], listed.stdout
    generate = [*LLORCH, "generate", "--model", "tiny-llama", "--ignore-eos"]
    clients = [
        subprocess.Popen(
            [*generate, "--max-tokens", "1900", "Once upon a time"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(6)
    ]
    try:
        seen = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(c.poll() is not None for c in clients):
            top = _run("top", "--once", data_dir=data_dir, env=env)
            assert top.returncode == 0, top.stderr
            pool = next(line for line in top.stdout.splitlines() if "local/cpu-0" in line)
            if pool.split()[3] == "4/4" and "queued 2" in top.stdout.splitlines()[0]:
                seen = top.stdout
                break
        assert seen, "top never showed four tasks running on local/cpu-0 and two queued"
        for client in clients:
            _, err = client.communicate(timeout=60)
            assert client.returncode == 0 and "[1900 tokens" in err, err
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()


@pytest.mark.skipif(find_gateway() is None, reason="llorch-gateway is not built (`make gateway`)")
def test_up_serves_rest_and_its_edge_dies_with_it(
    home: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, _, data_dir = home
    url = json.loads((data_dir / "run" / "endpoints.json").read_text())["gateway"]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    sampling = {"max_tokens": 4, "ignore_eos": True}  # the tiny model may end early otherwise
    body = {"model_id": "tiny-llama", "prompt": "Hello", "sampling": sampling}
    conn.request("POST", "/v1/generate", body=json.dumps(body))
    response = conn.getresponse()
    lines = [json.loads(line) for line in response.read().splitlines()]
    assert response.status == 200, lines
    assert lines[-1]["result"]["event"]["finished"]["tokens_out"] == 4
    conn.request("GET", "/v1/models")  # the catalog's routes too, in the home profile
    models = json.loads(conn.getresponse().read())
    assert [m["model_id"] for m in models["models"]] == ["tiny-llama"]
    conn.close()
    edges = [pid for pid in _children(proc.pid) if "llorch-gateway" in _cmdline(pid)]
    assert len(edges) == 1
    proc.kill()  # no chance to stop its children: the edge notices its stdin close
    proc.wait()
    deadline = time.monotonic() + 5
    while _alive(edges[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(edges[0])


@pytest.mark.skipif(find_gateway() is None, reason="llorch-gateway is not built (`make gateway`)")
def test_up_serves_the_openai_api_to_the_openai_package(
    home: tuple[subprocess.Popen[str], str, Path],
) -> None:
    import openai
    from pydantic import BaseModel

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]
        score: int

    _, _, data_dir = home
    url = json.loads((data_dir / "run" / "endpoints.json").read_text())["gateway"]
    # The home profile takes no API keys (loopback only); the SDK insists on sending one.
    with openai.OpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["tiny-llama"]
        stream = client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "Tell me about the river."}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-1].usage is not None
        parsed = client.chat.completions.parse(
            model="tiny-llama",
            messages=[{"role": "user", "content": "Is the river quiet?"}],
            response_format=Verdict,
            max_tokens=200,
        )
        verdict = parsed.choices[0].message.parsed
        assert isinstance(verdict, Verdict)
        print(f"\nstreamed: {text!r}\nparsed: {verdict!r}")  # shown with pytest -s


def test_models_add_registers_a_gguf_file(
    home: tuple[subprocess.Popen[str], str, Path], tiny_model: Path
) -> None:
    _, _, data_dir = home
    added = _run("models", "add", "my-model", str(tiny_model), data_dir=data_dir)
    assert added.returncode == 0, added.stderr
    listed = _run("models", "list", "--json", data_dir=data_dir)
    assert '"my-model"' in listed.stdout
    bad = _run("models", "add", "bad-model", "/etc/hostname", data_dir=data_dir)
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr


@pytest.mark.skipif(find_gateway() is None, reason="llorch-gateway is not built (`make gateway`)")
def test_up_serves_grpc_when_the_rest_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "up.log"
        proc, address = start_llorch(
            ["up"],
            {
                "LLORCH_DATA_DIR": str(tmp_path / "data"),
                "LLORCH_LISTEN": "127.0.0.1:0",
                "LLORCH_GATEWAY_LISTEN": f"127.0.0.1:{port}",
            },
            log=log,
        )
        try:
            assert address.startswith("127.0.0.1:")
            endpoints = json.loads((tmp_path / "data" / "run" / "endpoints.json").read_text())
            assert "gateway" not in endpoints
            assert "no REST edge" in log.read_text() and "address already in use" in log.read_text()
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("stop", ["ctrl-c to the group", "sigterm to up"])
def test_ctrl_c_or_sigterm_stops_up_without_errors(tmp_path: Path, stop: str) -> None:
    """A terminal's Ctrl-C signals every process of the group, workers and spares too; a
    service manager's SIGTERM only `llorch up`. Either stop must read as a normal one: no
    traceback, no ERROR, status 0."""
    env = {
        **os.environ,
        "LLORCH_DATA_DIR": str(tmp_path / "data"),
        "LLORCH_LISTEN": "127.0.0.1:0",
        "LLORCH_GATEWAY_LISTEN": "127.0.0.1:0",
    }
    log = tmp_path / "up.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [*LLORCH, "up"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("llorch ready"), log.read_text()[-2000:]
            address = line.split()[3]
            ran = _run(
                "generate",
                "--orchestrator",
                address,
                "--model",
                "tiny-llama",
                "hi",
                data_dir=tmp_path / "data",
            )
            assert ran.returncode == 0, ran.stderr
            deadline = time.monotonic() + 20
            while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)  # the worker and its spare
            if stop == "ctrl-c to the group":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert '"level": "ERROR"' not in text, text[-3000:]
