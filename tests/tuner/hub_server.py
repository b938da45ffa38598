"""A loopback fake of the model-hub HTTP API, just enough for `create_repo` + `upload_folder` (LFS, no Xet).

The real `huggingface_hub` client talks to it over real HTTP on 127.0.0.1. It records every request (method,
path, headers, body) and every committed file (path -> bytes), and can be told to fail: answer 503 a few
times, refuse a namespace with 403, or reject tokens with 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 64 * 1024 * 1024
MAX_CHUNKS = 100_000


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class HubState:
    """What the fake hub knows and what it was asked; tests read and tweak it."""

    base_url: str = ""
    tokens: set[str] | None = None  # None: any bearer token is accepted
    forbidden_namespaces: set[str] = field(default_factory=set)  # repos here exist but belong to someone else
    fail_503: dict[str, int] = field(default_factory=dict)  # path substring -> how many 503 answers remain
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo id -> create payload
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> path -> content
    commits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, repo_id: str) -> dict[str, bytes]:
        return dict(self.files.get(repo_id, {}))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the test output quiet
        return

    # --- plumbing -------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            for _ in range(MAX_CHUNKS):
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > MAX_BODY:
                    break
            raise ValueError("chunked body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message}, {"X-Error-Message": message})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # --- routing --------------------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        state = self.server.state
        body = self._body()
        path = self.path.split("?", 1)[0]
        with state.lock:
            state.requests.append(Request(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            for needle, left in state.fail_503.items():
                if left > 0 and needle in path:
                    state.fail_503[needle] = left - 1
                    return self._error(503, "Service temporarily unavailable")
        if path.startswith("/__lfs/"):
            return self._lfs_put(path.removeprefix("/__lfs/"), body)
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token is None or (state.tokens is not None and token not in state.tokens):
            return self._error(401, "Invalid credentials in Authorization header")
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(200, {"warnings": [], "errors": []})
        parts = path.strip("/").split("/")
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(path.strip("/").removesuffix(".git/info/lfs/objects/batch"), json.loads(body))
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id = f"{parts[2]}/{parts[3]}"
            if method == "GET":
                return self._repo_info(repo_id)
            if parts[2] in state.forbidden_namespaces:
                return self._error(403, f"You don't have the rights to write to {repo_id}")
            if method == "POST" and len(parts) >= 6 and parts[4] == "preupload":
                return self._preupload(json.loads(body))
            if method == "POST" and len(parts) >= 6 and parts[4] == "commit":
                return self._commit(repo_id, body)
        return self._error(404, f"not found: {method} {path}")

    # --- endpoints ------------------------------------------------------------------------------------
    def _create(self, payload: dict[str, Any]) -> None:
        state = self.server.state
        namespace = payload.get("organization") or "user"
        repo_id = f"{namespace}/{payload['name']}"
        if namespace in state.forbidden_namespaces:
            return self._error(403, f"You don't have the rights to create a model under the namespace {namespace}")
        with state.lock:
            if repo_id in state.repos:
                return self._error(409, "You already created this model repo")
            state.repos[repo_id] = payload
        self._send(200, {"url": f"{state.base_url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _repo_info(self, repo_id: str) -> None:
        state = self.server.state
        if repo_id not in state.repos and repo_id.split("/")[0] not in state.forbidden_namespaces:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        self._send(200, {"id": repo_id, "sha": "0" * 40, "private": False, "siblings": []})

    def _preupload(self, payload: dict[str, Any]) -> None:
        files = []
        for entry in payload["files"]:
            lfs = entry["path"].endswith((".safetensors", ".png")) or entry["size"] > 10 * 1024 * 1024
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._send(200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        base = self.server.state.base_url
        objects = [
            {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{base}/__lfs/{o['oid']}"}}}
            for o in payload["objects"]
        ]
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        with self.server.state.lock:
            self.server.state.lfs[oid] = body
        self._send(200)

    def _commit(self, repo_id: str, body: bytes) -> None:
        state = self.server.state
        if repo_id not in state.repos:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        staged: dict[str, bytes] = {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in state.lfs:
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                staged[value["path"]] = state.lfs[value["oid"]]
        with state.lock:
            state.files.setdefault(repo_id, {}).update(staged)
            state.commits += 1
            sha = hashlib.sha1(str(state.commits).encode()).hexdigest()
        self._send(200, {"commitUrl": f"{state.base_url}/{repo_id}/commit/{sha}", "commitOid": sha})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class FakeHub:
    """Context manager: a fake hub on 127.0.0.1 in a background thread, stopped on exit."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self.state = HubState(base_url=f"http://127.0.0.1:{self._server.server_address[1]}")
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def url(self) -> str:
        return self.state.base_url

    def __enter__(self) -> FakeHub:
        self._thread.daemon = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
