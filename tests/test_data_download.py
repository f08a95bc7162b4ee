"""`nanoforge data download` through huggingface_hub against a loopback HTTP server (HF_ENDPOINT)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data_helpers import documents

from nanoforge.data.download import parse_shards
from nanoforge.errors import UserError

REPO = "someone/tiny-corpus"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _parquet_bytes(texts: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


class Hub(http.server.ThreadingHTTPServer):
    """Serves files under /datasets/<repo>/resolve/<rev>/<name> like the Hub: HEAD/GET, ETag, X-Repo-Commit,
    Content-Length, Range. `drop_once[name] = n` closes the connection after n body bytes, once."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.drop_once: dict[str, int] = {}
        self.fail_once: set[str] = set()  # answer 500 to the first GET
        self.gets: list[tuple[str, str | None]] = []


class Handler(http.server.BaseHTTPRequestHandler):
    server: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _file(self) -> tuple[str, bytes] | None:
        m = re.fullmatch(rf"/datasets/{REPO}/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        if not m or m.group(2) not in self.server.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return m.group(2), self.server.files[m.group(2)]

    def _headers(self, data: bytes, status: int = 200, extra: dict[str, str] | None = None,
                 length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        if found := self._file():
            self._headers(found[1])

    def do_GET(self) -> None:  # noqa: N802
        found = self._file()
        if not found:
            return
        name, data = found
        rng = self.headers.get("Range")
        self.server.gets.append((name, rng))
        if name in self.server.fail_once:
            self.server.fail_once.discard(name)
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        body = data[start:]
        if rng:
            self._headers(data, 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}, len(body))
        else:
            self._headers(data)
        if name in self.server.drop_once:
            n = self.server.drop_once.pop(name)
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def hub() -> Iterator[Hub]:
    server = Hub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _download(hub: Hub, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(out.parent / "hf_home"), "HF_TOKEN": "",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    # small read chunks, so a transfer dropped halfway has whole chunks on disk to resume from
    code = ("import sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 4096; "
            "from nanoforge.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "data", "download", REPO, "--out", str(out),
                           "--retries", "3", *args], capture_output=True, text=True, env=env, timeout=120)


def test_downloads_resumes_after_a_dropped_connection_and_skips_finished_shards(hub: Hub, tmp_path: Path) -> None:
    files = {f"shard_{i:05d}.parquet": _parquet_bytes(documents(300, seed=i)) for i in range(3)}
    hub.files.update(files)
    hub.drop_once["shard_00001.parquet"] = len(files["shard_00001.parquet"]) // 2
    out = tmp_path / "corpus"
    r = _download(hub, out, "--shards", "0-2", "--workers", "2")
    assert r.returncode == 0, r.stderr
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    # the dropped transfer continued with a Range request instead of starting over
    resumed = [rng for n, rng in hub.gets if n == "shard_00001.parquet"]
    assert len(resumed) == 2 and resumed[0] is None and resumed[1].startswith("bytes=")
    assert not (out / ".download").exists()
    hub.gets.clear()
    r = _download(hub, out, "--shards", "0-2")
    assert r.returncode == 0 and hub.gets == []  # nothing fetched again


def test_a_server_error_is_retried(hub: Hub, tmp_path: Path) -> None:
    hub.files["shard_00003.parquet"] = data = _parquet_bytes(["hello", "world"])
    hub.fail_once.add("shard_00003.parquet")
    r = _download(hub, tmp_path / "c", "--shards", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "shard_00003.parquet").read_bytes() == data
    assert len(hub.gets) == 2


def test_a_file_that_is_not_parquet_is_refused_and_not_kept(hub: Hub, tmp_path: Path) -> None:
    hub.files["shard_00000.parquet"] = b"<html>rate limited</html>" * 10
    out = tmp_path / "corpus"
    r = _download(hub, out, "--shards", "0")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "not a usable shard" in r.stderr and r.stderr.count("\n") == 1
    assert not list(out.rglob("*.parquet"))


def test_a_missing_shard_is_a_clear_error(hub: Hub, tmp_path: Path) -> None:
    hub.files["shard_00000.parquet"] = _parquet_bytes(["a"])
    r = _download(hub, tmp_path / "c", "--shards", "0-1")
    assert r.returncode == 2 and "has no file 'shard_00001.parquet'" in r.stderr


def test_parse_shards() -> None:
    assert parse_shards("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_shards("5") == [5]
    with pytest.raises(UserError):
        parse_shards("3-1")
