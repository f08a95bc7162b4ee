"""Concurrent streaming clients for an OpenAI-compatible server (ours or any other): each client sends one
`/v1/chat/completions` (or `/v1/completions`) request with `stream: true` and records time to first token,
the text and the token count. Used by the load test and bench/serve.py; stdlib only, so it measures the
server and not a client library.

    report = run_load("http://127.0.0.1:8000", [body] * 16, concurrency=16)
    report["ttft_p50_s"], report["tokens_per_s"]
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from typing import Any


def stream_once(base_url: str, body: dict[str, Any], *, path: str = "/v1/chat/completions",
                api_key: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """One streamed request: {"text", "chunks", "ids" (chunk ids seen), "ttft_s", "total_s",
    "completion_tokens" (from the usage chunk, else the number of content chunks), "finish_reason",
    "status", "error"}."""
    u = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    out: dict[str, Any] = {"text": "", "chunks": 0, "ids": set(), "ttft_s": None, "total_s": None,
                           "completion_tokens": None, "finish_reason": None, "status": None, "error": None}
    t0 = time.perf_counter()
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True,
                                                    "stream_options": {"include_usage": True}}), headers=headers)
        resp = conn.getresponse()
        out["status"] = resp.status
        if resp.status != 200:
            out["error"] = resp.read().decode(errors="replace")[:500]
            return out
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                out["error"] = obj["error"]
                break
            if obj.get("id"):
                out["ids"].add(obj["id"])
            if obj.get("usage"):
                out["completion_tokens"] = obj["usage"].get("completion_tokens")
            for ch in obj.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content") or ch.get("text") or ""
                if piece:
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.perf_counter() - t0
                    out["text"] += piece
                    out["chunks"] += 1
                if ch.get("finish_reason"):
                    out["finish_reason"] = ch["finish_reason"]
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        out["total_s"] = time.perf_counter() - t0
        conn.close()
    if out["completion_tokens"] is None:
        out["completion_tokens"] = out["chunks"]
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_load(base_url: str, bodies: list[dict[str, Any]], *, concurrency: int, path: str = "/v1/chat/completions",
             api_key: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """Send every body, `concurrency` at a time (each worker thread takes the next body when done).
    Returns the per-request results in body order and the aggregates: wall_s, ttft_p50_s, ttft_p99_s,
    tokens (sum of completion tokens), tokens_per_s (tokens / wall_s), errors."""
    results: list[dict[str, Any] | None] = [None] * len(bodies)
    lock = threading.Lock()
    todo = iter(range(len(bodies)))

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            results[i] = stream_once(base_url, bodies[i], path=path, api_key=api_key, timeout=timeout)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(bodies)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    ttfts = [r["ttft_s"] for r in done if r["ttft_s"] is not None]
    tokens = sum(r["completion_tokens"] or 0 for r in done if not r["error"])
    return {"results": results, "wall_s": wall, "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p99_s": percentile(ttfts, 0.99), "tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
            "errors": [r["error"] for r in done if r["error"]]}
