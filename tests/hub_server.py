"""A tiny in-process stand-in for the parts of the Hugging Face Hub HTTP API that `huggingface_hub` uses to create a
repo, commit files and read them back (tests only; no network).

It listens on 127.0.0.1 only, on a free port, serves from a daemon thread, refuses bodies over `max_body` bytes and
stops itself after `lifetime_s` seconds even if a test forgets to. Every file is accepted as a regular (base64)
upload, so no LFS/Xet round trip is needed. Failures are injected per endpoint with `fail={"commit": 500, ...}`;
`token` makes every request without ``Authorization: Bearer <token>`` fail with 401.

    with HubServer() as hub:
        HfApi(endpoint=hub.url).create_repo("me/x")
        hub.files("me/x")  # {path: bytes}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ROUTES = [  # (method, regex, handler name, failure key)
    ("POST", r"/api/repos/create", "_create_repo", "create"),
    ("POST", r"/api/validate-yaml", "_validate_yaml", "validate"),
    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/?]+))?", "_repo_info", "info"),
    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/?]+)(?:/(?P<path>.*))?", "_tree", "info"),
    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/?]+)", "_preupload", "preupload"),
    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/?]+)", "_commit", "commit"),
    ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve", "resolve"),
    ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve", "resolve"),
]


class HubServer:
    """Fake Hub on 127.0.0.1. Use as a context manager; `url` is the endpoint to give `huggingface_hub`."""

    def __init__(self, token: str | None = None, fail: dict[str, int] | None = None, lifetime_s: float = 120.0,
                 max_body: int = 64 << 20) -> None:
        self.token = token
        self.fail = dict(fail or {})
        self.max_body = max_body
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> "HubServer":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of `repo_id` on its main branch after all commits."""
        return dict(self.repos[repo_id]["files"])

    def commits(self, repo_id: str) -> list[dict[str, Any]]:
        return list(self.repos[repo_id]["commits"])


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        # -- plumbing ------------------------------------------------------------------------------------------------
        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            with hub._lock:
                hub.requests.append((method, path))
            length = int(self.headers.get("Content-Length") or 0)
            if length > hub.max_body:
                return self._json(413, {"error": f"body of {length} bytes is over the limit"})
            body = self.rfile.read(length) if length else b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = self._read_chunked()
            for verb, pattern, handler, key in _ROUTES:
                m = re.fullmatch(pattern, path)
                if verb == method and m:
                    if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
                        return self._json(401, {"error": "Invalid credentials in Authorization header"})
                    if key in hub.fail:
                        return self._json(hub.fail[key], {"error": f"injected failure of {key}"})
                    return getattr(self, handler)(m.groupdict(), body, method)
            self._json(404, {"error": f"no route for {method} {path}"})

        def _read_chunked(self) -> bytes:
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > hub.max_body:
                    raise ValueError("chunked body over the limit")

        def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(raw)

        def _repo(self, repo_id: str) -> dict[str, Any] | None:
            return hub.repos.get(repo_id)

        def _not_found(self) -> None:
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        # -- endpoints -----------------------------------------------------------------------------------------------
        def _create_repo(self, _: dict, body: bytes, __: str) -> None:
            payload = json.loads(body or b"{}")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else \
                f"user/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            with hub._lock:
                if repo_id in hub.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = {"files": {}, "commits": [], "sha": "0" * 40,
                                      "private": payload.get("visibility") == "private" or payload.get("private")}
            self._json(200, {"url": url, "name": repo_id})

        def _validate_yaml(self, _: dict, body: bytes, __: str) -> None:
            self._json(200, {"errors": [], "warnings": []})

        def _repo_info(self, g: dict, _: bytes, __: str) -> None:
            repo = self._repo(g["repo"])
            if repo is None:
                return self._not_found()
            self._json(200, {"id": g["repo"], "modelId": g["repo"], "sha": repo["sha"], "private": repo["private"],
                             "siblings": [{"rfilename": p} for p in sorted(repo["files"])]})

        def _tree(self, g: dict, _: bytes, __: str) -> None:
            repo = self._repo(g["repo"])
            if repo is None:
                return self._not_found()
            self._json(200, [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                             for p, d in sorted(repo["files"].items())])

        def _preupload(self, g: dict, body: bytes, _: str) -> None:
            if self._repo(g["repo"]) is None:
                return self._not_found()
            files = json.loads(body)["files"]
            self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]})

        def _commit(self, g: dict, body: bytes, _: str) -> None:
            repo = self._repo(g["repo"])
            if repo is None:
                return self._not_found()
            header, added, deleted = {}, {}, []
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append(item["value"]["path"])
                else:
                    return self._json(400, {"error": f"unsupported commit operation {item['key']!r}"})
            with hub._lock:
                for path in deleted:
                    repo["files"].pop(path, None)
                repo["files"].update(added)
                sha = hashlib.sha1(repr(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in
                                              repo["files"].items())).encode()).hexdigest()
                repo["sha"] = sha
                repo["commits"].append({"summary": header.get("summary"), "files": sorted(added),
                                        "deleted": deleted})
            self._json(200, {"commitUrl": f"{hub.url}/{g['repo']}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None})

        def _resolve(self, g: dict, _: bytes, method: str) -> None:
            repo = self._repo(g["repo"])
            if repo is None:
                return self._not_found()
            data = repo["files"].get(g["path"])
            if data is None:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            etag = hashlib.sha1(data).hexdigest()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", repo["sha"])
            self.end_headers()
            if method == "GET":
                self.wfile.write(data)

    return Handler
