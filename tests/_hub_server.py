"""A loopback Hugging Face Hub: the parts of the protocol huggingface_hub's create_repo, create_commit
(regular, base64 uploads), repo_info, list_repo_tree and hf_hub_download / snapshot_download use, for model
and dataset repositories. Bound to 127.0.0.1 port 0; files live in memory.

    hub = HubServer(); hub.start(); env = hub.env(home)   # HF_ENDPOINT etc. for a subprocess
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubServer(http.server.ThreadingHTTPServer):
    def __init__(self, token: str = "hf_loopback_token") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.repos: dict[tuple[str, str], dict] = {}  # (type, id) -> {"files": {path: bytes}, "private", "sha"}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.drop_once: dict[str, int] = {}  # file name -> close the connection after n body bytes, once
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def env(self, hf_home: Path, token: str | None = None) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HOME": str(hf_home), "HF_TOKEN": self.token if token is None else token,
                "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
                "HF_HUB_ENABLE_HF_TRANSFER": "0"}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    # ---- helpers -----------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server.token}"

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, kind: str, repo: str) -> dict | None:
        found = self.server.repos.get((kind, repo))
        if found is None or (found["private"] and not self._authorized()):
            self._error(404, "RepoNotFound", f"Repository {repo} not found")
            return None
        return found

    # ---- routes ------------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        path = unquote(urlparse(self.path).path)
        self.server.requests.append(("POST", path, None))
        body = self._body()
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if not self._authorized():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            kind = req.get("type") or "model"
            if (kind, repo) in self.server.repos:
                return self._error(409, "RepoExists", "You already created this repo")
            self.server.repos[(kind, repo)] = {"files": {}, "private": bool(req.get("private")) or req.get("visibility") == "private",
                                                  "sha": "0" * 40}
            return self._json({"url": f"{self.server.url}/{repo}", "name": repo})
        m = re.fullmatch(r"/api/(models|datasets)/(.+?)/(preupload|commit)/([^/]+)", path)
        if not m:
            return self._error(404, "EntryNotFound", f"no route {path}")
        kind, repo, action = m.group(1)[:-1], m.group(2), m.group(3)
        found = self._repo(kind, repo)
        if found is None:
            return None
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                          "oid": None} for f in files]})
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                v = item["value"]
                found["files"][v["path"]] = base64.b64decode(v["content"])
            elif item["key"] != "header":
                return self._error(400, "BadRequest", f"unsupported commit entry {item['key']}")
        found["sha"] = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest())
                                                      for k, v in found["files"].items())).encode()).hexdigest()
        prefix = "" if kind == "model" else "/datasets"
        return self._json({"commitUrl": f"{self.server.url}{prefix}/{repo}/commit/{found['sha']}",
                           "commitOid": found["sha"], "pullRequestUrl": None})

    def do_HEAD(self) -> None:  # noqa: N802
        self._get()

    def do_GET(self) -> None:  # noqa: N802
        self._get()

    def _get(self) -> None:
        path = unquote(urlparse(self.path).path)
        rng = self.headers.get("Range")
        self.server.requests.append((self.command, path, rng))
        m = re.fullmatch(r"/api/(models|datasets)/(.+?)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            found = self._repo(m.group(1)[:-1], m.group(2))
            if found is None:
                return None
            if m.group(3) == "revision":
                return self._json({"id": m.group(2), "sha": found["sha"], "private": found["private"],
                                   "siblings": [{"rfilename": f} for f in sorted(found["files"])]})
            return self._json([{"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": f}
                               for f, data in sorted(found["files"].items())])
        m = re.fullmatch(r"(/datasets)?/(.+?)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._error(404, "EntryNotFound", f"no route {path}")
        found = self._repo("dataset" if m.group(1) else "model", m.group(2))
        if found is None:
            return None
        name = m.group(4)
        if name not in found["files"]:
            return self._error(404, "EntryNotFound", f"{name} does not exist")
        data = found["files"][name]
        headers = {"ETag": '"' + hashlib.sha1(data).hexdigest() + '"', "X-Repo-Commit": found["sha"],
                   "Accept-Ranges": "bytes"}
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        body = data[start:]
        if rng:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if self.command == "GET" and name in self.server.drop_once:
            n = self.server.drop_once.pop(name)
            self.send_response(206 if rng else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        return self._send(206 if rng else 200, body, headers, length=len(body))
