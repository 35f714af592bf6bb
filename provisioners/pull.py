"""The model provisioner's fetch: a model file from a ref into this node's model store.

Refs: ``file:/abs/path``, ``https://…`` (``http://`` for a local mirror), and
``hf:ORG/REPO[@REVISION]/PATH`` for a file of a Hugging Face Hub repository, fetched by the
``huggingface_hub`` library into its own cache (so ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME``,
``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply) and copied from there; the hub's sha256 of the file is
the expected one when none is given. A pull writes to a
temporary file beside its destination, hashing as it goes; an HTTP transfer that breaks or stalls
is resumed from where it stopped (``Range``) with backoff, up to ``retries`` times. The file is
then checked: the sha256 (when one was given) and the GGUF header (a file llama.cpp cannot read is
refused); it is fsynced and renamed into place, and only then does the caller register it. A
pull that fails leaves no file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mesh.errors import InvalidArgumentError
from mesh.ids import NAME_PATTERN, is_valid_name
from provisioners.gguf_facts import GgufFacts, NotAGgufError, read_gguf_facts, sha256_file

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None) as a pull proceeds."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RETRIABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
_HF_REF_RE = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w.-]+))?/(?P<path>[^\s@]+)"
)


@dataclass(frozen=True)
class Ref:
    """Where a model file comes from."""

    scheme: str
    """``file``, ``https``, ``http`` or ``hf``."""
    location: str
    """The absolute path, the URL, or (hf) the path of the file in its repository."""
    repo_id: str = ""
    """hf: ``org/repo``."""
    revision: str = ""
    """hf: a branch, tag or commit; empty for the repository's default branch."""

    @property
    def filename(self) -> str:
        """The last component of the path or URL."""
        return self.location.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]

    def __str__(self) -> str:
        if self.scheme == "hf":
            at = f"@{self.revision}" if self.revision else ""
            return f"hf:{self.repo_id}{at}/{self.location}"
        return f"file:{self.location}" if self.scheme == "file" else self.location


def parse_ref(ref: str) -> Ref:
    """Parses a model ref.

    Raises:
        InvalidArgumentError: an unknown scheme or a malformed ref (field ``ref``).
    """
    if ref.startswith("file:"):
        path = ref.removeprefix("file:")
        if path.startswith("//"):
            path = path.removeprefix("//")
        if not path.startswith("/"):
            raise InvalidArgumentError("ref", "a file: ref needs an absolute path, file:/path")
        return Ref("file", path)
    for scheme in ("https", "http"):
        if ref.startswith(f"{scheme}://"):
            if not re.fullmatch(rf"{scheme}://[^/\s]+/\S+", ref):
                raise InvalidArgumentError("ref", f"{ref!r} is not a URL of a file")
            return Ref(scheme, ref)
    if ref.startswith("hf:"):
        match = _HF_REF_RE.fullmatch(ref.removeprefix("hf:"))
        if match is None or ".." in match["path"].split("/"):
            raise InvalidArgumentError(
                "ref", f"{ref!r} is not hf:ORG/REPO/PATH or hf:ORG/REPO@REVISION/PATH"
            )
        return Ref("hf", match["path"], repo_id=match["repo"], revision=match["rev"] or "")
    raise InvalidArgumentError("ref", "must start with file:/, https://, http:// or hf:")


def model_name_for(ref: Ref) -> str:
    """A catalog id made from the ref's file name: ``Llama-3-8B.Q4_K_M.gguf`` →
    ``llama-3-8b.q4_k_m``."""
    stem = ref.filename.removesuffix(".gguf").lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._")[:128]
    if not is_valid_name(name) or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidArgumentError("name", f"cannot make a model id of {ref.filename!r}; pass one")
    return name


class PullError(Exception):
    """A pull failed; nothing was left behind."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PullOptions:
    """How hard a pull tries."""

    read_timeout_s: float = 30.0
    """A transfer that sends nothing for this long has stalled (and is resumed)."""
    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    chunk_bytes: int = 1 << 20


class _StoreWriteError(Exception):
    """Writing the temporary file failed (told apart from network errors, which are retried)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Sink:
    """The temporary file, the running hash and the byte count of one pull."""

    def __init__(
        self, out: BinaryIO, progress: Progress | None, cancel: threading.Event | None
    ) -> None:
        self._out = out
        self._progress = progress
        self._cancel = cancel
        self.digest = hashlib.sha256()
        self.done = 0
        self.total: int | None = None

    def write(self, chunk: bytes) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise PullError("the pull was cancelled", "CANCELLED")
        try:
            self._out.write(chunk)
        except OSError as exc:  # the store's disk, not the network: never retried
            raise _StoreWriteError(exc) from exc
        self.digest.update(chunk)
        self.done += len(chunk)
        if self._progress is not None:
            self._progress(self.done, self.total)

    def quiet(self) -> None:
        """Stops reporting progress."""
        self._progress = None

    def restart(self) -> None:
        """Drops what was written (a server that ignored the range sends everything again)."""
        self._out.seek(0)
        self._out.truncate()
        self.digest = hashlib.sha256()
        self.done = 0


@dataclass(frozen=True)
class Pulled:
    """A verified file in the store."""

    path: Path
    sha256: str
    size_bytes: int
    facts: GgufFacts


def pull(
    ref: Ref,
    dest: Path,
    expected_sha256: str = "",
    options: PullOptions | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Pulled:
    """Fetches ``ref`` to ``dest`` (see the module docstring). Blocking; run it in a thread.

    Raises:
        PullError: with a reason: SOURCE_NOT_FOUND, DOWNLOAD_FAILED, SHA256_MISMATCH, NOT_GGUF,
            DISK_FULL, DESTINATION_EXISTS.
    """
    options = options or PullOptions()
    expected = expected_sha256.lower()
    if expected and not _SHA256_RE.fullmatch(expected):
        raise InvalidArgumentError("sha256", "must be 64 hex digits")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            sink = _Sink(out, progress, cancel)
            if ref.scheme == "file":
                _copy_file(Path(ref.location), sink, options)
            elif ref.scheme == "hf":
                cached, hub_sha256 = _from_hub(ref, progress, cancel)
                expected = expected or hub_sha256
                sink.quiet()  # the bar was the download's; the copy is local
                _copy_file(cached, sink, options)
            else:
                _download(ref.location, sink, options)
            out.flush()
            os.fsync(out.fileno())
        size = partial.stat().st_size
        actual = sink.digest.hexdigest()
        if expected and actual != expected:
            raise PullError(
                f"{ref} has sha256 {actual}, not the expected {expected}", "SHA256_MISMATCH"
            )
        try:
            facts = read_gguf_facts(partial)
        except NotAGgufError as exc:
            raise PullError(
                f"{ref} is not a GGUF model llama.cpp can load: {exc}", "NOT_GGUF"
            ) from None
        if dest.exists():
            # Left by a pull of the same file that was killed before it registered: adopt it.
            # Anything else under that name is not ours to replace.
            if sha256_file(dest) != actual:
                raise PullError(
                    f"{dest} exists already with other content; remove it or pull under "
                    "another --name",
                    "DESTINATION_EXISTS",
                )
            return Pulled(dest, actual, size, facts)
        os.replace(partial, dest)
        _fsync_dir(dest.parent)
        return Pulled(dest, actual, size, facts)
    except (OSError, _StoreWriteError) as failure:
        error = failure.error if isinstance(failure, _StoreWriteError) else failure
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PullError(f"no space left in {dest.parent} for {ref}", "DISK_FULL") from None
        raise PullError(f"cannot write {dest}: {error}", "DOWNLOAD_FAILED") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def remove_stale_partials(store: Path) -> list[Path]:
    """Deletes temporary files that pulls of dead processes left in ``store``."""
    removed = []
    for path in store.glob(".*.partial"):
        match = re.fullmatch(r"\..+\.(\d+)\.partial", path.name)
        if match and not _pid_alive(int(match[1])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _copy_file(source: Path, sink: _Sink, options: PullOptions) -> None:
    try:
        handle = open(source, "rb")
    except FileNotFoundError:
        raise PullError(f"file:{source} does not exist", "SOURCE_NOT_FOUND") from None
    except OSError as exc:
        raise PullError(f"cannot read file:{source}: {exc}", "SOURCE_NOT_FOUND") from None
    with handle:
        sink.total = os.fstat(handle.fileno()).st_size
        while chunk := handle.read(options.chunk_bytes):
            sink.write(chunk)


def _from_hub(
    ref: Ref, progress: Progress | None, cancel: threading.Event | None
) -> tuple[Path, str]:
    """Fetches an hf: ref into the huggingface_hub cache; returns the cached file and the hub's
    sha256 of it ("" when the hub gives none: a file not stored with LFS, or offline)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import errors as hub_errors
    from tqdm.auto import tqdm

    revision = ref.revision or None

    class _Bar(tqdm):
        """The library's progress bar, turned into our progress calls and cancel checks."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if cancel is not None and cancel.is_set():
                raise PullError("the pull was cancelled", "CANCELLED")
            self.n += n or 0
            if progress is not None:
                progress(int(self.n), int(self.total) if self.total else None)
            return None

    try:
        hub_sha256 = ""
        if not hub_constants.is_offline_mode():
            url = huggingface_hub.hf_hub_url(ref.repo_id, ref.location, revision=revision)
            meta = huggingface_hub.get_hf_file_metadata(url, retry_on_errors=True)
            etag = (meta.etag or "").lower()
            hub_sha256 = etag if _SHA256_RE.fullmatch(etag) else ""
        path = huggingface_hub.hf_hub_download(
            ref.repo_id, ref.location, revision=revision, tqdm_class=_Bar
        )
    except (
        hub_errors.RepositoryNotFoundError,
        hub_errors.RevisionNotFoundError,
        hub_errors.EntryNotFoundError,
    ) as exc:
        raise PullError(f"{ref}: {_first_line(exc)}", "SOURCE_NOT_FOUND") from None
    except hub_errors.HfHubHTTPError as exc:
        raise PullError(f"{ref}: {_first_line(exc)}", "DOWNLOAD_FAILED") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PullError(
                f"no space left in the huggingface_hub cache for {ref}", "DISK_FULL"
            ) from None
        raise PullError(f"{ref}: {_first_line(exc)}", "DOWNLOAD_FAILED") from None
    except httpx2.HTTPError as exc:  # the hub unreachable, a transfer broken past its retries
        raise PullError(
            f"{ref}: {type(exc).__name__}: {_first_line(exc)}", "DOWNLOAD_FAILED"
        ) from None
    return Path(path), hub_sha256


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _download(url: str, sink: _Sink, options: PullOptions) -> None:
    failures = 0
    done_at_last_failure = 0
    backoff = options.backoff_s
    while True:
        request = urllib.request.Request(url, headers={"User-Agent": "llorch-provisioner"})
        if sink.done:
            request.add_header("Range", f"bytes={sink.done}-")
        try:
            with urllib.request.urlopen(request, timeout=options.read_timeout_s) as response:
                if sink.done and (response.status != 206 or _range_start(response) != sink.done):
                    sink.restart()  # the server ignored the range, or answered another one
                sink.total = _total_size(response, sink.done) or sink.total
                while chunk := response.read(options.chunk_bytes):
                    sink.write(chunk)
            if sink.total is not None and sink.done < sink.total:
                raise http.client.IncompleteRead(b"", sink.total - sink.done)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise PullError(f"{url} answered 404 Not Found", "SOURCE_NOT_FOUND") from None
            if exc.code == 416 and sink.total is not None and sink.done >= sink.total:
                return  # everything had arrived
            if exc.code not in _RETRIABLE_HTTP:
                raise PullError(
                    f"{url} answered {exc.code} {exc.reason}", "DOWNLOAD_FAILED"
                ) from None
            why = f"HTTP {exc.code}"
        except (http.client.HTTPException, OSError) as exc:  # URLError, TLS, timeouts too
            why = str(getattr(exc, "reason", exc)) or type(exc).__name__
        if sink.done > done_at_last_failure:
            failures = 0  # it made progress: a long transfer on a flaky link keeps going
        done_at_last_failure = sink.done
        failures += 1
        if failures > options.retries:
            raise PullError(
                f"{url} failed {failures} times (last: {why}); {sink.done} bytes had arrived",
                "DOWNLOAD_FAILED",
            )
        time.sleep(backoff)
        backoff = min(backoff * 2, options.backoff_max_s)


def _range_start(response: http.client.HTTPResponse) -> int:
    match = re.fullmatch(r"bytes (\d+)-\d+/\d+", response.headers.get("Content-Range", "").strip())
    return int(match[1]) if match else -1


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", content_range.strip())
    if match:
        return int(match[1])
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
