"""`nanoforge serve`'s API, checked with the official `openai` client (strict response validation, no
retries) on loopback, against tiny random-weight models; greedy output is compared with transformers."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from _serve_helpers import GatedEngine, http, make_models

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("serve_models"))


@pytest.fixture(scope="module")
def server(models: dict[str, Path]):
    from nanoforge.infer.models import ModelPool, discover
    from nanoforge.infer.server import ServeLimits, create_app, run_in_thread

    pool = ModelPool(discover([str(models["sft/chat"]), str(models["base/tiny"])]), device="cpu", max_batch=4)
    app = create_app(pool, limits=ServeLimits(max_body_bytes=200_000, max_tokens=200, max_messages=50))
    with run_in_thread(app) as url:
        yield url, pool
    pool.close()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60,
                         _strict_response_validation=True)


CONV = [{"role": "system", "content": "Du bist kurz."}, {"role": "user", "content": "Wie groß ist der Baum?"}]


def test_models_list_describes_every_model(server):
    url, _ = server
    models = {m.id: m for m in client(url).models.list()}
    assert set(models) == {"sft/chat", "base/tiny"}
    chat = models["sft/chat"]
    assert chat.object == "model" and chat.owned_by == "nanoforge"
    extra = chat.model_extra
    assert extra["phase"] == "sft" and extra["step"] == 10 and extra["val_bpb"] == 2.345
    assert extra["parameters"] > 10_000 and extra["context"] == 256 and extra["tokenizer"] == "tok"


def test_chat_completion_matches_the_rendered_prompt_and_streams_the_same_text(server, models):
    from nanoforge.tokenizer import Tokenizer

    url, pool = server
    c = client(url)
    r = c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == "sft/chat" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    tok = Tokenizer.load(models["tokenizer"])
    assert r.usage.prompt_tokens == len(tok.render_for_completion(CONV))
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.model_extra["timings"]
    assert t["prompt_n"] == r.usage.prompt_tokens and t["predicted_n"] == r.usage.completion_tokens
    assert t["prompt_ms"] > 0 and t["predicted_per_second"] is None or t["predicted_per_second"] > 0

    chunks = list(c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 1, "the reply must stream in pieces"
    assert "".join(pieces) == r.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == r.usage.completion_tokens
    assert last.usage.prompt_tokens == r.usage.prompt_tokens


def test_completion_is_transformers_greedy_output(server, models, tmp_path):
    """The base-model route against an independent implementation: the HF export under transformers."""
    from transformers import LlamaForCausalLM

    from nanoforge.export.hf import export_hf
    from nanoforge.tokenizer import Tokenizer

    url, _ = server
    prompt = "der Hund läuft"
    r = client(url).completions.create(model="base/tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    tok = Tokenizer.load(models["tokenizer"])
    hf = LlamaForCausalLM.from_pretrained(export_hf(models["base/tiny"], tmp_path / "hf"), dtype=torch.float32)
    ids = tok.encode(prompt, bos=True)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    stops = {tok.bos_id, tok.eos_id}  # a base model's text ends at BOS/EOS
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    assert r.choices[0].text == tok.decode(out[:cut])
    assert r.usage.completion_tokens == (cut if cut < len(out) else 20)
    assert r.usage.prompt_tokens == len(ids)


def test_seed_n_and_stop(server):
    url, _ = server
    c = client(url)
    a = c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=12, temperature=1.0, seed=7, n=2)
    b = c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=12, temperature=1.0, seed=7, n=2)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    greedy = c.completions.create(model="base/tiny", prompt="die Katze", max_tokens=20, temperature=0).choices[0]
    stop = next(w for w in greedy.text.split(" ")[1:] if len(w) > 1)[:2]
    cut = c.completions.create(model="base/tiny", prompt="die Katze", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == greedy.text[:greedy.text.index(stop)]


def test_greedy_output_does_not_depend_on_the_batch(server):
    """Alone, then decoded together with three other requests: the same greedy text."""
    url, _ = server
    c = client(url)
    alone = c.completions.create(model="base/tiny", prompt="blau und rot", max_tokens=30, temperature=0)
    prompts = ["blau und rot", "Sonne", "der Mond ist groß und", "Wasser Feuer Erde Himmel zwei drei"]
    results: dict[int, str] = {}

    def go(i: int) -> None:
        results[i] = c.completions.create(model="base/tiny", prompt=prompts[i], max_tokens=30,
                                          temperature=0).choices[0].text

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == alone.choices[0].text
    singles = [c.completions.create(model="base/tiny", prompt=p, max_tokens=30, temperature=0).choices[0].text
               for p in prompts[1:]]
    assert [results[i] for i in (1, 2, 3)] == singles


def test_tokenize_and_detokenize_agree_with_the_tokenizer(server, models):
    from nanoforge.tokenizer import Tokenizer

    url, _ = server
    tok = Tokenizer.load(models["tokenizer"])
    text = "Die Katze läuft schnell über grüne Häuser 🌳"
    status, body = http("POST", url + "/tokenize", {"content": text, "model": "sft/chat"})
    assert status == 200 and body["tokens"] == tok.encode(text)
    assert sum(p["bytes"] for p in body["pieces"]) == len(text.encode())
    status, back = http("POST", url + "/detokenize", {"tokens": body["tokens"], "tokenizer": "tok"})
    assert status == 200 and back["content"] == text
    status, err = http("POST", url + "/tokenize", {"content": "x", "tokenizer": "../../etc"})
    assert status == 400 and err["error"]["param"] == "tokenizer"
    status, names = http("GET", url + "/tokenizers")
    assert {"name": "tok", "model": "base/tiny"} in names["data"] or names["data"][0]["name"] == "tok"


def test_bad_input_gets_openai_shaped_errors_and_the_server_keeps_serving(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=CONV)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="sft/chat", messages=[])
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="sft/chat", messages=CONV, temperature="hot")
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="sft/chat", messages=[{"role": "user", "content": ""}] * 51)
    assert "limit" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=201)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the 256-token context
        c.chat.completions.create(model="sft/chat", messages=[{"role": "user", "content": "Baum " * 120}],
                                  max_completion_tokens=200)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="sft/chat", messages=[{"role": "user", "content": "x" * 300_000}])
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    for body in (b"{not json", b"[1, 2]", b'{"model": "sft/chat"}'):
        status, err = http("POST", url + "/v1/chat/completions", body)
        assert status == 400 and set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["type"] == "invalid_request_error"
    status, err = http("GET", url + "/v1/nothing")
    assert status == 404 and "error" in err
    r = c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens > 0
    assert http("GET", url + "/health")[1]["status"] == "ok"


def test_api_key_is_required_when_set(models):
    from nanoforge.infer.models import ModelPool, discover
    from nanoforge.infer.server import create_app, run_in_thread

    pool = ModelPool(discover([str(models["base/tiny"])]), device="cpu")
    with run_in_thread(create_app(pool, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, "wrong").models.list()
        assert e.value.code == "invalid_api_key"
        assert http("GET", url + "/v1/models")[0] == 401
        assert [m.id for m in client(url, "s3cret").models.list()] == ["base/tiny"]
        with urllib.request.urlopen(url + "/") as page:  # the page itself is public: it asks for the key
            assert page.status == 200 and b"<html" in page.read().lower()
    pool.close()


def test_queue_full_loading_and_cancellation(models):
    """429 when the queue is full (with the waiting position streamed as an SSE comment), 503 while a
    model loads, and a client that disconnects frees its slot."""
    from nanoforge.infer.models import ModelPool, default_engine, discover
    from nanoforge.infer.server import ServeLimits, create_app, run_in_thread

    gates: dict[str, GatedEngine] = {}
    loading = threading.local()  # a model's loader and then its engine factory run in one thread

    def factory(model, tok, max_batch):
        gates[loading.id] = GatedEngine(default_engine(model, tok, max_batch))
        return gates[loading.id]

    release = threading.Event()
    served = discover([str(models["base/tiny"]), str(models["sft/chat"])])

    def loader(s):
        loading.id = s.id
        if s.id == "sft/chat":
            release.wait(30)
        return pool._load(s)

    pool = ModelPool(served, device="cpu", max_batch=1, max_queue=1, engine_factory=factory, loader=loader)
    with run_in_thread(create_app(pool, limits=ServeLimits(load_wait=0.3))) as url:
        c = client(url)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "model_loading"
        release.set()
        c.models.list()
        c.completions.create(model="base/tiny", prompt="Haus", max_tokens=1)  # loads it
        gate = gates["base/tiny"]  # (sft/chat may finish loading before or after it)
        gate.gate.clear()
        # (a chat stream: strict validation rejects legacy completion chunks' finish_reason null, which
        # OpenAI itself sends)
        first = c.chat.completions.create(model="base/tiny", messages=CONV, max_tokens=50, stream=True)
        def wait_for(key: str, value: int) -> None:
            deadline = time.monotonic() + 20
            while http("GET", url + "/health")[1]["models"]["base/tiny"].get(key) != value:
                assert time.monotonic() < deadline, f"{key} never became {value}"
                time.sleep(0.05)

        wait_for("active", 1)
        req = urllib.request.Request(url + "/v1/completions", method="POST",
                                     data=b'{"model": "base/tiny", "prompt": "Baum", "max_tokens": 3, "stream": true}',
                                     headers={"Content-Type": "application/json"})
        waiting = urllib.request.urlopen(req, timeout=30)
        wait_for("waiting", 1)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="base/tiny", prompt="Stern", max_tokens=3)
        assert e.value.code == "queue_full"
        gate.gate.set()
        it = iter(first)
        next(it)
        first.close()  # the client goes away mid-stream
        raw = waiting.read().decode()
        assert raw.startswith(": queue position 1") and raw.rstrip().endswith("data: [DONE]")
        wait_for("active", 0)  # the cancelled stream gave its slot back
        assert not gate.engine.has_work()
    pool.close()


def test_serve_refuses_an_open_address_without_a_key_and_an_empty_home(capsys):
    from nanoforge.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "no models to serve" in capsys.readouterr().err


@pytest.mark.slow
def test_sixteen_concurrent_streams_complete_unmixed_while_health_answers(models, capsys):
    """The loopback load test: 16 streaming clients at once, each with its own prompt, greedy. Every stream
    completes with exactly the text that prompt gets alone; /health keeps answering during the load."""
    from nanoforge.infer.loadgen import run_load
    from nanoforge.infer.models import ModelPool, discover
    from nanoforge.infer.server import create_app, run_in_thread

    pool = ModelPool(discover([str(models["sft/chat"])]), device="cpu", max_batch=16)
    words = "Haus Baum Katze Hund Sonne Mond Stern Wasser Feuer Erde Himmel rot blau grün groß klein".split()
    bodies = [{"model": "sft/chat", "temperature": 0, "max_tokens": 32,
               "messages": [{"role": "user", "content": f"Erzähl von {w} Nummer {i}"}]} for i, w in enumerate(words)]
    with run_in_thread(create_app(pool)) as url:
        c = client(url)
        alone = [c.chat.completions.create(**b).choices[0].message.content for b in bodies]
        health: list[int] = []
        report: dict = {}
        runner = threading.Thread(target=lambda: report.update(run_load(url, bodies, concurrency=16)))
        runner.start()
        while runner.is_alive():
            health.append(http("GET", url + "/health")[0])
            time.sleep(0.02)
        runner.join()
    pool.close()
    assert report["errors"] == []
    results = report["results"]
    assert all(r["finish_reason"] in ("stop", "length") and len(r["ids"]) == 1 for r in results)
    assert len({next(iter(r["ids"])) for r in results}) == 16  # one id per stream, none shared
    assert [r["text"] for r in results] == alone  # nothing dropped, nothing mixed between clients
    assert health and all(s == 200 for s in health)
    with capsys.disabled():
        print(f"\n16 concurrent streams: TTFT p50 {report['ttft_p50_s'] * 1e3:.0f} ms, p99 "
              f"{report['ttft_p99_s'] * 1e3:.0f} ms, {report['tokens_per_s']:.0f} tokens/s aggregate "
              f"({report['tokens']} tokens in {report['wall_s']:.2f} s), /health answered {len(health)} times")


def test_tool_calls_read_as_marked_text_and_come_back_as_parts(models):
    """A reply's tool parts reach a plain client as marked text; sent back as history they render to the
    same ids as the conversation with python/python_output parts."""
    from nanoforge.infer import protocol as P
    from nanoforge.tokenizer import Tokenizer

    pt = P.PartText()
    pieces = [("text", "Ich rechne: "), ("python", "2+3"), ("python_output", ""), ("python_output", "5"),
              ("text", " also 5.")]
    text = "".join(pt.feed(part, t) for part, t in pieces) + pt.close()
    assert text == "Ich rechne: <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> also 5."
    parts = [{"type": "text", "text": "Ich rechne: "}, {"type": "python", "text": "2+3"},
             {"type": "python_output", "text": "5"}, {"type": "text", "text": " also 5."}]
    msgs = [P.ChatMessage(role="user", content="Was ist 2+3?"), P.ChatMessage(role="assistant", content=text),
            P.ChatMessage(role="user", content="Danke")]
    conv = P.conversation(msgs)
    assert conv[1]["content"] == parts
    tok = Tokenizer.load(models["tokenizer"])
    want = tok.render_for_completion([{"role": "user", "content": "Was ist 2+3?"},
                                      {"role": "assistant", "content": parts}, {"role": "user", "content": "Danke"}])
    assert tok.render_for_completion(conv) == want


def test_default_discovery_exports_and_a_bounded_number_of_loaded_models(models, nanoforge_home, tmp_path):
    """With no paths the server offers every checkpoint and export under $NANOFORGE_HOME; an export
    serves the same greedy text as its checkpoint; with max_loaded=1 the idle model is unloaded."""
    import shutil

    from nanoforge.export.hf import export_hf
    from nanoforge.infer.models import ModelPool, discover
    from nanoforge.infer.server import create_app, run_in_thread

    shutil.copytree(models["base/tiny"], nanoforge_home / "checkpoints" / "base" / "tiny")
    export_hf(models["base/tiny"], nanoforge_home / "exports" / "tiny")
    (nanoforge_home / "exports" / "broken").mkdir()
    (nanoforge_home / "exports" / "broken" / "config.json").write_text("{}")  # skipped, not fatal
    found = discover()
    assert [m.id for m in found] == ["base/tiny", "export/tiny"]
    assert found[1].info["parameters"] == found[0].info["parameters"] and found[1].info["context"] == 256
    pool = ModelPool(found, device="cpu", max_loaded=1)
    with run_in_thread(create_app(pool)) as url:
        c = client(url)
        texts = [c.completions.create(model=m, prompt="rot und blau", max_tokens=16, temperature=0).choices[0].text
                 for m in ("base/tiny", "export/tiny")]
        assert texts[0] == texts[1]
        state = http("GET", url + "/health")[1]["models"]
        assert state["export/tiny"]["loaded"] and not state["base/tiny"]["loaded"]
    pool.close()


def test_an_engine_failure_mid_stream_is_an_error_event_and_the_next_request_is_served(models):
    from nanoforge.infer.models import ModelPool, default_engine, discover
    from nanoforge.infer.server import create_app, run_in_thread

    class Flaky(GatedEngine):
        fail = True

        def step(self):
            out = self.engine.step()
            if Flaky.fail and self.engine.has_work():
                Flaky.fail = False
                raise RuntimeError("out of memory")
            return out

    pool = ModelPool(discover([str(models["sft/chat"])]), device="cpu",
                     engine_factory=lambda m, t, b: Flaky(default_engine(m, t, b)))
    with run_in_thread(create_app(pool)) as url:
        c = client(url)
        with pytest.raises(openai.APIError) as e:
            for _ in c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=20, stream=True):
                pass
        assert "out of memory" in e.value.message
        r = c.chat.completions.create(model="sft/chat", messages=CONV, max_tokens=5, temperature=0)
        assert r.usage.completion_tokens > 0
    pool.close()


@pytest.mark.slow
def test_the_serve_command_serves_until_terminated(models, tmp_path):
    """`nanoforge serve CKPT --port P` as a user runs it: a real process, the API answers, SIGTERM ends it."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge", "serve", str(models["base/tiny"]), "--port", str(port),
                             "--threads", "1", "--device", "cpu"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if http("GET", url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        r = client(url).completions.create(model="base/tiny", prompt="Haus", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens > 0
    finally:
        proc.terminate()
        proc.wait(30)
    err = proc.stderr.read()
    assert f"web UI: http://127.0.0.1:{port}/" in err and "serving 1 model(s): base/tiny" in err
