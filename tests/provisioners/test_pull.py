"""Pulling model files from file: and http(s) refs against a real local HTTP server: verified,
resumed after a dropped or stalled transfer, retried after 500s, refused when the hash or the
format is wrong — and never leaving a file behind when it fails."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.errors import InvalidArgumentError
from provisioners.pull import (
    PullError,
    PullOptions,
    model_name_for,
    parse_ref,
    pull,
    remove_stale_partials,
)
from tests.provisioners.model_server import ModelServer

FAST = PullOptions(read_timeout_s=1.0, retries=3, backoff_s=0.01, chunk_bytes=64 * 1024)


@pytest.fixture(scope="module")
def gguf(tiny_model: Path) -> bytes:
    return tiny_model.read_bytes()


@pytest.fixture
def server(gguf: bytes) -> Iterator[ModelServer]:
    running = ModelServer(
        {"tiny.gguf": gguf, "noise.gguf": os.urandom(50_000)}, stall_s=3.0
    ).start()
    yield running
    running.stop()


def _left(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def test_refs_parse_and_name_models() -> None:
    assert parse_ref("file:/srv/m.gguf").location == "/srv/m.gguf"
    assert parse_ref("file:///srv/m.gguf").location == "/srv/m.gguf"
    web = parse_ref("https://example.org/org/Llama-3-8B.Q4_K_M.gguf?download=1")
    assert web.scheme == "https" and web.filename == "Llama-3-8B.Q4_K_M.gguf"
    assert model_name_for(web) == "llama-3-8b.q4_k_m"
    hub = parse_ref("hf:TheOrg/Some-Repo@v1.0/quant/Model.Q4_K_M.gguf")
    assert (hub.scheme, hub.repo_id, hub.revision, hub.location) == (
        "hf",
        "TheOrg/Some-Repo",
        "v1.0",
        "quant/Model.Q4_K_M.gguf",
    )
    assert str(hub) == "hf:TheOrg/Some-Repo@v1.0/quant/Model.Q4_K_M.gguf"
    assert model_name_for(hub) == "model.q4_k_m"
    assert parse_ref("hf:org/repo/f.gguf").revision == ""
    for bad in [
        "m.gguf",
        "file:relative.gguf",
        "ftp://x/y.gguf",
        "https://",
        "hf:repo-only.gguf",
        "hf:org/repo/../escape.gguf",
        "hf:org/repo@/f.gguf",
    ]:
        with pytest.raises(InvalidArgumentError) as err:
            parse_ref(bad)
        assert err.value.field_violations[0][0] == "ref"


def test_a_file_ref_is_copied_verified_and_renamed_into_place(
    tmp_path: Path, tiny_model: Path, gguf: bytes
) -> None:
    seen: list[tuple[int, int | None]] = []
    dest = tmp_path / "store" / "tiny.gguf"
    expected = hashlib.sha256(gguf).hexdigest()
    pulled = pull(
        parse_ref(f"file:{tiny_model}"),
        dest,
        expected,
        FAST,
        lambda done, total: seen.append((done, total)),
    )
    assert pulled.path == dest and dest.read_bytes() == gguf
    assert (pulled.sha256, pulled.size_bytes) == (expected, len(gguf))
    assert pulled.facts.architecture == "llama"
    assert seen[-1] == (len(gguf), len(gguf))
    assert _left(dest.parent) == ["tiny.gguf"]


def test_an_http_pull_resumes_after_a_dropped_connection(
    tmp_path: Path, server: ModelServer, gguf: bytes
) -> None:
    dest = tmp_path / "store" / "tiny.gguf"
    pulled = pull(parse_ref(f"{server.url}/drop/tiny.gguf"), dest, "", FAST)
    assert dest.read_bytes() == gguf and pulled.sha256 == hashlib.sha256(gguf).hexdigest()
    assert server.requests["/drop/tiny.gguf"] == 2
    assert server.ranges == [f"bytes={len(gguf) // 2}-"]  # resumed, not started over


def test_an_http_pull_resumes_after_a_stall(
    tmp_path: Path, server: ModelServer, gguf: bytes
) -> None:
    dest = tmp_path / "store" / "tiny.gguf"
    pull(parse_ref(f"{server.url}/stall/tiny.gguf"), dest, "", FAST)
    assert dest.read_bytes() == gguf
    # Resumed from what had arrived in whole chunks before the stall (half was sent).
    (resumed,) = server.ranges
    offset = int(resumed.removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= len(gguf) // 2


def test_a_server_that_ignores_the_range_is_read_again_from_the_start(
    tmp_path: Path, server: ModelServer, gguf: bytes
) -> None:
    dest = tmp_path / "store" / "tiny.gguf"
    pulled = pull(parse_ref(f"{server.url}/norange/tiny.gguf"), dest, "", FAST)
    assert dest.read_bytes() == gguf and pulled.sha256 == hashlib.sha256(gguf).hexdigest()
    assert server.requests["/norange/tiny.gguf"] == 2 and len(server.ranges) == 1


def test_500s_are_retried_with_backoff_then_given_up(
    tmp_path: Path, server: ModelServer, gguf: bytes
) -> None:
    store = tmp_path / "store"
    pull(parse_ref(f"{server.url}/flaky/tiny.gguf"), store / "a.gguf", "", FAST)
    assert (store / "a.gguf").read_bytes() == gguf and server.requests["/flaky/tiny.gguf"] == 3
    with pytest.raises(PullError) as failed:
        pull(parse_ref(f"{server.url}/error/tiny.gguf"), store / "b.gguf", "", FAST)
    assert failed.value.reason == "DOWNLOAD_FAILED" and "failed 4 times" in str(failed.value)
    assert server.requests["/error/tiny.gguf"] == 4  # the first try and three retries
    assert _left(store) == ["a.gguf"]


@pytest.mark.parametrize(
    ("path", "sha256", "reason"),
    [
        ("/tiny.gguf", "0" * 64, "SHA256_MISMATCH"),
        ("/noise.gguf", "", "NOT_GGUF"),
        ("/missing.gguf", "", "SOURCE_NOT_FOUND"),
    ],
)
def test_a_wrong_file_is_refused_and_nothing_is_left(
    tmp_path: Path, server: ModelServer, path: str, sha256: str, reason: str
) -> None:
    store = tmp_path / "store"
    with pytest.raises(PullError) as refused:
        pull(parse_ref(f"{server.url}{path}"), store / "m.gguf", sha256, FAST)
    assert refused.value.reason == reason
    assert _left(store) == []


def test_a_missing_local_file_and_an_existing_destination(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(PullError) as missing:
        pull(parse_ref(f"file:{tmp_path}/nope.gguf"), tmp_path / "s" / "m.gguf", "", FAST)
    assert missing.value.reason == "SOURCE_NOT_FOUND"
    dest = tmp_path / "s" / "m.gguf"
    dest.parent.mkdir(exist_ok=True)
    dest.write_bytes(b"someone else's")
    with pytest.raises(PullError) as exists:
        pull(parse_ref(f"file:{tiny_model}"), dest, "", FAST)
    assert exists.value.reason == "DESTINATION_EXISTS" and dest.read_bytes() == b"someone else's"
    # The same content under the name (a pull killed before it registered) is adopted.
    same = tmp_path / "s" / "same.gguf"
    same.write_bytes(tiny_model.read_bytes())
    adopted = pull(parse_ref(f"file:{tiny_model}"), same, "", FAST)
    assert adopted.path == same and not list(same.parent.glob(".*.partial"))
    with pytest.raises(InvalidArgumentError):
        pull(parse_ref(f"file:{tiny_model}"), tmp_path / "s" / "x.gguf", "xyz", FAST)


def test_partials_of_dead_pulls_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".m.gguf.999999999.partial"  # no such pid
    live = tmp_path / f".m.gguf.{os.getpid()}.partial"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    assert remove_stale_partials(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a disk that fills up (needs root and mount; skipped where refused)."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tiny_disk: Path, tiny_model: Path) -> None:
    with pytest.raises(PullError) as full:
        pull(parse_ref(f"file:{tiny_model}"), tiny_disk / "tiny.gguf", "", FAST)
    assert full.value.reason == "DISK_FULL"
    assert "no space left" in str(full.value)
    assert _left(tiny_disk) == []
