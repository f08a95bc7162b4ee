"""The OpenAI-compatible wire format, and nothing else: pydantic request models, the response and
stream-chunk shapes the official `openai` client validates, llama.cpp-style `timings`, and errors in
OpenAI's `{"error": {"message", "type", "param", "code"}}` shape. No HTTP and no model code here (as in
vLLM): the server parses with these, the scheduler runs the work, these build the replies.

    req = parse(ChatCompletionRequest, body_bytes)         # raises APIError(400) on bad input
    reply = chat_completion(rid, req.model, choices, usage, timings)
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# ---- errors ---------------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "unavailable_error",
               500: "server_error"}


class APIError(Exception):
    """A request the server refuses or cannot serve; `body()` is what the client gets with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, status=self.status, param=self.param, code=self.code)


def error_body(message: str, *, status: int = 400, param: str | None = None, code: str | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


# ---- requests -------------------------------------------------------------------------------------------

class _Request(BaseModel):
    # Unknown fields are ignored (clients such as Open WebUI send extras); known fields are checked strictly
    # enough that "temperature": "hot" is a 400 naming the field, never a 500.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # an extension (llama.cpp and vLLM accept it too)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for /v1/completions

    def token_limit(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(_Request):
    content: str
    model: str | None = None
    tokenizer: str | None = None
    add_special: bool = False


class DetokenizeRequest(_Request):
    tokens: list[int]
    model: str | None = None
    tokenizer: str | None = None


def parse(kind: type[BaseModel], body: bytes) -> Any:
    """`body` (raw JSON bytes) as a `kind`; malformed JSON or an invalid field is an APIError(400) that
    names the field, as OpenAI does."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "missing":
            message = f"missing required parameter: {param!r}"
        else:
            message = f"invalid value for {param!r}: {err['msg']}"
        raise APIError(400, message, param=param, code="invalid_value") from None


# ---- chat messages <-> conversation ---------------------------------------------------------------------

# How a tool call reads in plain text (what decode gives for the special tokens); the UI folds these into
# collapsible blocks, and an assistant message sent back with them becomes python/python_output parts again.
TOOL_MARKERS = {"python": ("<|python_start|>", "<|python_end|>"),
                "python_output": ("<|output_start|>", "<|output_end|>")}
_TOOL_RE = re.compile(r"<\|python_start\|>(.*?)(?:<\|python_end\|>|$)|<\|output_start\|>(.*?)(?:<\|output_end\|>|$)",
                      re.S)


class PartText:
    """The engine's deltas (text of a part: "text", "python", "python_output") as one plain string with
    the tool-call markers around tool parts: `feed` each delta, `close` at the end."""

    def __init__(self) -> None:
        self.part = "text"

    def feed(self, part: str, text: str) -> str:
        out = ""
        if part != self.part:
            out += self.close()
            if part in TOOL_MARKERS:
                out += TOOL_MARKERS[part][0]
            self.part = part
        return out + text

    def close(self) -> str:
        out = TOOL_MARKERS[self.part][1] if self.part in TOOL_MARKERS else ""
        self.part = "text"
        return out


def text_to_parts(text: str) -> str | list[dict[str, str]]:
    """Assistant text with tool-call markers -> content parts (text / python / python_output); plain text
    stays a string."""
    if "<|python_start|>" not in text and "<|output_start|>" not in text:
        return text
    parts: list[dict[str, str]] = []
    pos = 0
    for m in _TOOL_RE.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        if m.group(1) is not None:
            parts.append({"type": "python", "text": m.group(1)})
        else:
            parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Request messages -> the conversation shape `Tokenizer.render_for_completion` takes. Refuses empty
    or unusable conversations with an APIError(400)."""
    conv: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        content: Any = m.content
        if isinstance(content, list):
            parts = [p for p in content if p.text is not None]
            bad = [p.type for p in content if p.type not in ("text", "python", "python_output")]
            if bad:
                raise APIError(400, f"messages[{i}].content: part type {bad[0]!r} is not supported (text only)",
                               param=f"messages.{i}.content", code="invalid_value")
            content = [{"type": p.type, "text": p.text} for p in parts]
        elif isinstance(content, str) and m.role == "assistant":
            content = text_to_parts(content)
        if content is None and m.role == "assistant" and m.tool_calls:
            content = ""
        if content is None:
            raise APIError(400, f"messages[{i}] ({m.role}) has no content", param=f"messages.{i}.content",
                           code="invalid_value")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        conv.append(msg)
    if not any(m["role"] == "user" for m in conv):
        raise APIError(400, "messages must contain at least one user message", param="messages",
                       code="invalid_value")
    return conv


def message_chars(messages: list[ChatMessage]) -> int:
    total = 0
    for m in messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(p.text or "") for p in m.content)
    return total


# ---- responses ------------------------------------------------------------------------------------------

def timings(prompt_n: int, prompt_ms: float, predicted_n: int, predicted_ms: float,
            queued_ms: float = 0.0) -> dict[str, Any]:
    """llama.cpp's per-response `timings` (prompt = prefill up to the first token, predicted = the rest),
    plus the time spent waiting in the queue."""
    def per_s(n: int, ms: float) -> float | None:
        return round(n / ms * 1000.0, 2) if ms > 0 and n else None

    def per_tok(n: int, ms: float) -> float | None:
        return round(ms / n, 3) if n else None

    return {"prompt_n": prompt_n, "prompt_ms": round(prompt_ms, 3),
            "prompt_per_token_ms": per_tok(prompt_n, prompt_ms), "prompt_per_second": per_s(prompt_n, prompt_ms),
            "predicted_n": predicted_n, "predicted_ms": round(predicted_ms, 3),
            "predicted_per_token_ms": per_tok(predicted_n, predicted_ms),
            "predicted_per_second": per_s(predicted_n, predicted_ms), "queued_ms": round(queued_ms, 3)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int],
                    timing: dict[str, Any] | None, created: int | None = None) -> dict[str, Any]:
    """`choices`: [{"text", "finish_reason"}] in index order."""
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": None, "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)],
            "usage": use, "timings": timing}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, timing: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if timing is not None:
        chunk["timings"] = timing
    return chunk


def completion(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int],
               timing: dict[str, Any] | None, created: int | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": i, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                        for i, c in enumerate(choices)],
            "usage": use, "timings": timing}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None = None, timing: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if timing is not None:
        chunk["timings"] = timing
    return chunk


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict[str, int],
                timing: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
    if timing is not None:
        chunk["timings"] = timing
    return chunk


def model_card(model_id: str, created: int, info: dict[str, Any]) -> dict[str, Any]:
    """One `/v1/models` entry; `info` (phase, step, parameters, val_bpb, tokenizer, context) rides along."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "nanoforge", **info}


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
