"""A real HTTP server on loopback that serves model files the way the internet can: whole, with
ranges, failing with 500, stalling, or dropping the connection halfway."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ModelServer:
    """Serves ``files`` (name → bytes) under these paths:

    - ``/NAME``: the file, honouring ``Range``;
    - ``/drop/NAME``: the first response announces the whole file but the connection closes
      after half of it; later requests are served normally (a resume finishes it);
    - ``/stall/NAME``: the first response sends half, then nothing for ``stall_s``;
    - ``/flaky/NAME``: 500 for the first two requests, then the file;
    - ``/error/NAME``: always 500;
    - ``/slow/NAME``: the file in 16 KiB pieces, 10 ms apart;
    - ``/norange/NAME``: drops the first transfer like ``/drop`` and then ignores ``Range``
      (the whole file again, status 200), so a resume must start over;
    - ``/ORG/REPO/resolve/REVISION/NAME`` (HEAD and GET): a stand-in for the Hugging Face Hub as
      ``huggingface_hub`` reads it: ``X-Repo-Commit``, the file's sha256 as its ``X-Linked-Etag``
      (or the one in ``hub_sha256``, to serve content that does not match), its size, ranges, and
      404s with the hub's ``X-Error-Code`` for ORG ``missing`` (RepoNotFound), REVISION ``nope``
      (RevisionNotFound) and an unknown NAME (EntryNotFound).
    """

    def __init__(self, files: dict[str, bytes], stall_s: float = 5.0) -> None:
        self.files = files
        self.stall_s = stall_s
        self.requests: Counter[str] = Counter()
        self.ranges: list[str] = []
        self.hub_sha256: dict[str, str] = {}
        self.authorization: list[str] = []  # Authorization headers of hub requests
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._hub(body=False)

            def _hub(self, body: bool) -> None:
                server.requests[f"{self.command} {self.path}"] += 1
                server.authorization.append(self.headers.get("Authorization", ""))
                match = re.fullmatch(
                    r"/(?P<org>[^/]+)/(?P<repo>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<name>.+)",
                    self.path,
                )
                data = server.files.get(match["name"]) if match else None
                error = (
                    "RepoNotFound"
                    if match is None or match["org"] == "missing"
                    else "RevisionNotFound"
                    if match["rev"] == "nope"
                    else "EntryNotFound"
                    if data is None
                    else ""
                )
                if error or data is None or match is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", error)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                sha = server.hub_sha256.get(match["name"]) or hashlib.sha256(data).hexdigest()
                start = 0
                range_match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if range_match and body:
                    start = min(int(range_match[1]), len(data))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    self.wfile.write(data[start:])

            def do_GET(self) -> None:
                if "/resolve/" in self.path:
                    self._hub(body=True)
                    return
                server.requests[self.path] += 1
                seen = server.requests[self.path]
                mode, _, name = self.path.strip("/").rpartition("/")
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                if mode == "error" or (mode == "flaky" and seen <= 2):
                    self.send_error(500)
                    return
                start = 0
                requested = self.headers.get("Range", "")
                if requested:
                    server.ranges.append(requested)
                match = re.fullmatch(r"bytes=(\d+)-", requested)
                if match and mode != "norange":
                    start = int(match[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode in ("drop", "stall", "norange") and seen == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if mode == "stall":
                        time.sleep(server.stall_s)
                    self.close_connection = True
                    return
                if mode == "slow":
                    for at in range(0, len(body), 16 * 1024):
                        self.wfile.write(body[at : at + 16 * 1024])
                        self.wfile.flush()
                        time.sleep(0.01)
                    return
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients that go away (killed pulls) are part of the tests

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ModelServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def file_bytes(path: Path) -> bytes:
    """A file's bytes."""
    return path.read_bytes()
