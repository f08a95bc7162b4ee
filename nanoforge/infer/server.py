"""`nanoforge serve`: the web UI at `/` and an OpenAI-compatible API (FastAPI + uvicorn).

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events), GET /v1/models,
GET /health, POST /tokenize, POST /detokenize, GET /tokenizers. Every error is OpenAI-shaped
(`{"error": {"message", "type", "param", "code"}}`): 400 bad input, 401 key, 404 model, 413 body too
large, 429 queue full, 503 model loading. Replies carry llama.cpp-style `timings`.

    app = create_app(ModelPool(discover([])), api_key=None)
    with run_in_thread(app) as url:           # a real server on 127.0.0.1:<free port>
        openai.OpenAI(base_url=url + "/v1", api_key="-").models.list()
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from nanoforge import home as home_mod
from nanoforge.errors import UserError
from nanoforge.infer import protocol as P
from nanoforge.infer.models import ModelLoading, ModelPool, UnknownModel
from nanoforge.infer.scheduler import QueueFull

UI_DIR = Path(__file__).parent / "ui"


@dataclass
class ServeLimits:
    """What one request may ask for; beyond these the server answers 400 (413 for the body)."""
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_chars: int = 200_000
    max_tokens: int = 4096
    load_wait: float = 60.0  # seconds a request waits for its model to load before a 503


def _sampling_params(**kw: Any) -> Any:
    from nanoforge.infer.engine import SamplingParams

    return SamplingParams(**kw)


def _render(tok: Any, conv: list[dict[str, Any]]) -> list[int]:
    try:
        return tok.render_for_completion(conv)
    except UserError as e:
        raise P.APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None


class _Run:
    """The tickets of one HTTP request (n choices, or several prompts) and their events, in the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tickets: list[Any] = []
        self.texts: list[P.PartText] = []

    def on_event(self, index: int):  # noqa: ANN201
        def put(kind: str, ticket: Any, payload: Any) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, ticket, payload))
        return put

    def cancel(self) -> None:
        for t in self.tickets:
            t.cancel()


def create_app(pool: ModelPool, *, api_key: str | None = None, limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI app serving `pool`'s models; `api_key` (if set) is required as a Bearer token on every
    API route (the page itself is public: it asks for the key)."""
    limits = limits or ServeLimits()
    app = FastAPI(title="nanoforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, e: P.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(P.error_body(str(e.detail), status=e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}", status=500), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not given:
            raise P.APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise P.APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def body_of(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_body_bytes:
            raise P.APIError(413, f"request body of {size} bytes is over the limit of {limits.max_body_bytes}",
                             code="request_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise P.APIError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                                 code="request_too_large")
        return body

    def served(model_id: str) -> Any:
        try:
            return pool.get(model_id)
        except UnknownModel:
            raise P.APIError(404, f"the model {model_id!r} does not exist (GET /v1/models lists them)",
                             param="model", code="model_not_found") from None

    async def acquire(model_id: str) -> Any:
        from starlette.concurrency import run_in_threadpool

        served(model_id)
        try:
            return await run_in_threadpool(pool.acquire, model_id, limits.load_wait)
        except ModelLoading as e:
            raise P.APIError(503, str(e), code="model_loading", headers={"Retry-After": "2"}) from None
        except UserError as e:
            raise P.APIError(500, str(e), code="model_load_failed") from None

    def budget(req: Any, prompt_len: int, context: int, param: str) -> int:
        if prompt_len >= context:
            raise P.APIError(400, f"the prompt is {prompt_len} tokens, the model's context is {context}",
                             param="messages" if param == "max_tokens" else "prompt",
                             code="context_length_exceeded")
        want = req.token_limit()
        if want is None:
            return min(limits.max_tokens, context - prompt_len)
        if want > limits.max_tokens:
            raise P.APIError(400, f"{param}={want} is over this server's limit of {limits.max_tokens}",
                             param=param, code="invalid_value")
        if prompt_len + want > context:
            raise P.APIError(400, f"the prompt ({prompt_len} tokens) plus {param}={want} exceeds the model's "
                             f"context of {context} tokens", param=param, code="context_length_exceeded")
        return want

    def submit(lm: Any, run: _Run, prompts: list[list[int]], req: Any, max_tokens: int, chat: bool) -> None:
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        temperature = 1.0 if req.temperature is None else req.temperature
        # A chat reply ends at <|assistant_end|> (the engine's default); a base model's text at BOS/EOS only.
        tok = lm.tokenizer
        stop_ids = None if chat else tuple({i for i in (tok.bos_id, tok.eos_id) if i is not None})
        index = 0
        try:
            for ids in prompts:
                for j in range(req.n):
                    params = _sampling_params(temperature=temperature, top_k=req.top_k or None,
                                              top_p=1.0 if req.top_p is None else req.top_p, seed=seed + j,
                                              max_tokens=max_tokens, stop=tuple(req.stop_list()),
                                              stop_token_ids=stop_ids)
                    run.tickets.append(lm.worker.submit(ids, params, run.on_event(index)))
                    run.texts.append(P.PartText())
                    index += 1
        except QueueFull as e:
            run.cancel()
            raise P.APIError(429, f"the server is busy ({e}); try again shortly", code="queue_full",
                             headers={"Retry-After": "1"}) from None
        except RuntimeError:  # unloaded between acquire and submit to make room for another model
            run.cancel()
            raise P.APIError(503, f"model {lm.served.id} was just unloaded; try again", code="model_loading",
                             headers={"Retry-After": "1"}) from None

    def timing_of(tickets: list[Any]) -> dict[str, Any]:
        q, pm, gm = (max(t.timing()[k] for t in tickets) for k in range(3))
        return P.timings(sum(len(t.prompt_ids) for t in tickets), pm,
                         sum(t.completion_tokens for t in tickets), gm, q)

    def finish(reason: str) -> str:
        return reason if reason in ("stop", "length") else "stop"

    async def collect(request: Request, run: _Run) -> list[dict[str, Any]]:
        texts = [""] * len(run.tickets)
        reasons: list[str | None] = [None] * len(run.tickets)
        left = len(run.tickets)
        try:
            while left:
                try:
                    index, kind, ticket, payload = await asyncio.wait_for(run.queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        run.cancel()
                        return []
                    continue
                if kind == "delta":
                    texts[index] += run.texts[index].feed(payload.part, payload.text)
                elif kind == "done":
                    texts[index] += run.texts[index].close()
                    reasons[index] = finish(payload)
                    left -= 1
                elif kind == "error":
                    raise P.APIError(500, payload, code="generation_failed")
        finally:
            run.cancel()
        return [{"text": t, "finish_reason": r} for t, r in zip(texts, reasons)]

    async def stream(run: _Run, rid: str, model_id: str, created: int, chat: bool, include_usage: bool
                     ) -> AsyncIterator[bytes]:
        left = len(run.tickets)
        obj = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                for i in range(len(run.tickets)):
                    yield P.sse(P.chat_chunk(rid, model_id, created, i, {"role": "assistant", "content": ""}))
            while left:
                index, kind, ticket, payload = await run.queue.get()
                if kind == "queued":  # an SSE comment: clients ignore it, our UI shows the position
                    yield f": queue position {payload}\n\n".encode()
                elif kind in ("delta", "done"):
                    text = run.texts[index].feed(payload.part, payload.text) if kind == "delta" \
                        else run.texts[index].close()
                    if text:
                        yield P.sse(P.chat_chunk(rid, model_id, created, index, {"content": text}) if chat
                                    else P.completion_chunk(rid, model_id, created, index, text))
                if kind == "done":
                    left -= 1
                    t = timing_of([ticket])
                    yield P.sse(P.chat_chunk(rid, model_id, created, index, {}, finish(payload), t) if chat
                                else P.completion_chunk(rid, model_id, created, index, "", finish(payload), t))
                elif kind == "error":
                    yield P.sse(P.error_body(payload, status=500, code="generation_failed"))
                    return
            if include_usage:
                use = P.usage(sum(len(t.prompt_ids) for t in run.tickets),
                              sum(t.completion_tokens for t in run.tickets))
                yield P.sse(P.usage_chunk(rid, model_id, created, obj, use, timing_of(run.tickets)))
            yield P.sse("[DONE]")
        finally:
            run.cancel()  # the client went away (or we are done): free the slots

    async def respond(request: Request, run: _Run, req: Any, model_id: str, chat: bool) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(run, rid, model_id, created, chat, include),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await collect(request, run)
        use = P.usage(sum(len(t.prompt_ids) for t in run.tickets), sum(t.completion_tokens for t in run.tickets))
        build = P.chat_completion if chat else P.completion
        return build(rid, model_id, choices, use, timing_of(run.tickets), created)

    # ---- routes ---------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> Any:
        return FileResponse(UI_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": pool.status()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        data = [P.model_card(m.id, m.created, {**m.info, "loaded": pool.is_loaded(m.id)})
                for m in pool.models.values()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        req = P.parse(P.ChatCompletionRequest, await body_of(request))
        if len(req.messages) > limits.max_messages:
            raise P.APIError(400, f"{len(req.messages)} messages is over the limit of {limits.max_messages}",
                             param="messages", code="invalid_value")
        chars = P.message_chars(req.messages)
        if chars > limits.max_chars:
            raise P.APIError(400, f"the messages hold {chars} characters, over the limit of {limits.max_chars}",
                             param="messages", code="invalid_value")
        conv = P.conversation(req.messages)
        lm = await acquire(req.model)
        ids = _render(lm.tokenizer, conv)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = budget(req, len(ids), lm.context, param)
        run = _Run(asyncio.get_running_loop())
        submit(lm, run, [ids], req, max_tokens, chat=True)
        return await respond(request, run, req, req.model, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        req = P.parse(P.CompletionRequest, await body_of(request))
        prompts_raw = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(
            req.prompt[0], int) else [req.prompt]
        if not prompts_raw or any(len(p) == 0 for p in prompts_raw):
            raise P.APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if sum(len(p) for p in prompts_raw if isinstance(p, str)) > limits.max_chars:
            raise P.APIError(400, f"the prompt is over the limit of {limits.max_chars} characters",
                             param="prompt", code="invalid_value")
        lm = await acquire(req.model)
        tok = lm.tokenizer
        prompts = []
        for p in prompts_raw:
            if isinstance(p, str):
                prompts.append(tok.encode(p, bos=tok.bos_id is not None))
            else:
                if min(p) < 0 or max(p) >= lm.model.config.vocab_size:
                    raise P.APIError(400, f"prompt token ids must lie in [0, {lm.model.config.vocab_size})",
                                     param="prompt", code="invalid_value")
                prompts.append(list(p))
        max_tokens = min(budget(req, len(p), lm.context, "max_tokens") for p in prompts)
        run = _Run(asyncio.get_running_loop())
        submit(lm, run, prompts, req, max_tokens, chat=False)
        return await respond(request, run, req, req.model, chat=False)

    def tokenizer_for(model_id: str | None, name: str | None) -> tuple[str, Any]:
        from nanoforge.tokenizer import Tokenizer

        if name:
            try:
                home_mod.check_name(name, "tokenizer")
            except UserError as e:
                raise P.APIError(400, str(e), param="tokenizer", code="invalid_value") from None
            for mid in pool.models:
                if pool.models[mid].info.get("tokenizer") == name:
                    return name, pool.tokenizer(mid)
            try:
                return name, Tokenizer.load(name)
            except UserError as e:
                raise P.APIError(404, str(e), param="tokenizer", code="tokenizer_not_found") from None
        model_id = model_id or next(iter(pool.models), None)
        if model_id is None:
            raise P.APIError(404, "no models are served", param="model", code="model_not_found")
        served(model_id)
        try:
            tok = pool.tokenizer(model_id)
        except UserError as e:
            raise P.APIError(500, str(e), code="tokenizer_unavailable") from None
        return tok.name, tok

    @app.get("/tokenizers")
    async def tokenizers(request: Request) -> dict[str, Any]:
        check_key(request)
        names = {m.info.get("tokenizer"): m.id for m in pool.models.values() if m.info.get("tokenizer")}
        root = home_mod.home() / "tokenizers"
        for p in sorted(root.glob("*/nanoforge.json")) if root.is_dir() else []:
            if not p.parent.name.startswith("."):  # not a tokenizer being written
                names.setdefault(p.parent.name, None)
        return {"data": [{"name": n, "model": m} for n, m in names.items()]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        check_key(request)
        req = P.parse(P.TokenizeRequest, await body_of(request))
        name, tok = tokenizer_for(req.model, req.tokenizer)
        ids = tok.encode(req.content, bos=req.add_special and tok.bos_id is not None)
        special = {v: k for k, v in tok.special_tokens.items()}
        pieces = []
        for i in ids:
            raw = tok.id_bytes(i)
            pieces.append({"id": i, "piece": special.get(i) or raw.decode("utf-8", errors="replace"),
                           "bytes": len(raw), "hex": raw.hex()})
        return {"tokenizer": name, "tokens": ids, "pieces": pieces, "count": len(ids),
                "bytes": len(req.content.encode("utf-8"))}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        check_key(request)
        req = P.parse(P.DetokenizeRequest, await body_of(request))
        name, tok = tokenizer_for(req.model, req.tokenizer)
        if req.tokens and (min(req.tokens) < 0 or max(req.tokens) >= tok.vocab_size):
            raise P.APIError(400, f"token ids must lie in [0, {tok.vocab_size})", param="tokens",
                             code="invalid_value")
        return {"tokenizer": name, "content": tok.decode(req.tokens)}

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    return app


@contextlib.contextmanager
def run_in_thread(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread on a socket bound to `host`, port 0 (no race for a
    free port); yields the base URL and stops the server on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(paths: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          insecure: bool = False, max_loaded: int = 2, device: str = "auto", max_batch: int = 8,
          max_queue: int = 64, limits: ServeLimits | None = None, on_ready: Any = None) -> None:
    """Serve `paths` (or every checkpoint and export under $NANOFORGE_HOME) until interrupted. Refuses to
    bind a non-loopback address without an API key unless `insecure`."""
    import uvicorn

    from nanoforge.infer.models import discover

    if host not in LOOPBACK and not api_key and not insecure:
        raise UserError(f"binding {host} would expose the models to the network without a key: pass "
                        f"--api-key KEY (or --insecure to do it anyway)")
    models = discover(paths)
    if not models:
        raise UserError("no models to serve: no checkpoints or exports under $NANOFORGE_HOME (train one with "
                        "`nanoforge train base`, or give a checkpoint folder)")
    pool = ModelPool(models, max_loaded=max_loaded, device=device, max_batch=max_batch, max_queue=max_queue)
    app = create_app(pool, api_key=api_key, limits=limits)
    if on_ready is not None:
        on_ready(models)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        pool.close()
