"""The web UI in a real headless Chromium (Debian's, driven by Playwright): one browser session walks through
chat, streaming, stop, copy, the model picker, stats, hostile markup, tool blocks, reload, side by side,
the tokenizer playground and a server that went away; screenshots land in the test's folder (and in
$NANOFORGE_SCREENSHOTS when set, which is how the README's pictures are made)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from _serve_helpers import ScriptedEngine, http, make_models

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without this Chromium resolves Google hosts through the system resolver (traffic off the machine).
BROWSER_ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]

SCRIPT = [("text", "Here is **bold** text.\n\n"), ("text", '<img src="x" onerror="window.__pwned=1">'),
          ("text", "<script>window.__pwned=2</script>\n\n"), ("text", "```python\nprint(1)\n```\n\n"),
          ("text", "Let me compute: "), ("python", "2+3"), ("python_output", ""), ("python_output", "5"),
          ("text", " so the answer is 5.")]
LONG = [("text", f"word{i} ") for i in range(400)]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e .[test])")
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium (make test installs it when run as root: "
                    "apt-get install -y --no-install-recommends chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield b
        b.close()


def test_web_ui_in_chromium(browser, tmp_path: Path, nanoforge_home: Path):
    pytest.importorskip("fastapi")
    from nanoforge.infer.engine import load_checkpoint
    from nanoforge.infer.models import ModelPool, ServedModel, default_engine, discover
    from nanoforge.infer.server import create_app, run_in_thread
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    paths = make_models(tmp_path / "models")
    tok = Tokenizer.load(paths["tokenizer"])
    small = train_tokenizer(tmp_path / "models" / "text", vocab_size=300, backend="rustbpe",
                            out=nanoforge_home / "tokenizers" / "small", force=True)
    served = discover([str(paths["sft/chat"]), str(paths["base/tiny"])])
    served.append(ServedModel("sft/scripted", paths["sft/chat"], "checkpoint", {**served[0].info}, 0))

    def loader(s):
        model, t, _ = load_checkpoint(s.path)
        model.scripted = s.id == "sft/scripted"
        return model, t

    def factory(model, t, max_batch):
        return ScriptedEngine(t, SCRIPT, LONG) if model.scripted else default_engine(model, t, max_batch)

    pool = ModelPool(served, device="cpu", max_batch=4, loader=loader, engine_factory=factory)
    shots = [tmp_path]
    if os.environ.get("NANOFORGE_SCREENSHOTS"):
        shots.append(Path(os.environ["NANOFORGE_SCREENSHOTS"]))
    with run_in_thread(create_app(pool)) as url:
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")

        def last_reply():
            return page.locator(".msg.assistant").last

        def wait_idle():
            page.wait_for_function("!document.querySelector('#stop') || document.querySelector('#stop').hidden")

        def stored():
            return json.loads(page.evaluate("localStorage.getItem('nanoforge.conversations')"))

        # --- type and send; stats for nerds are plausible
        page.click("#settings-toggle")
        page.fill("#max_tokens", "40")
        page.fill("#temperature", "0")
        page.dispatch_event("#max_tokens", "change")
        page.select_option("#model", "sft/chat")
        page.fill("#input", "Wie groß ist")
        page.press("#input", "Shift+Enter")  # a new line, not a send
        page.type("#input", "der Baum?")
        assert page.input_value("#input") == "Wie groß ist\nder Baum?" and page.locator(".msg").count() == 0
        page.fill("#input", "Wie groß ist der Baum?")
        page.press("#input", "Enter")
        wait_idle()
        page.wait_for_function("document.querySelector('.msg.assistant .stats').textContent.includes('TTFT')")
        stats = last_reply().locator(".stats").inner_text()
        m = re.search(r"TTFT (\d+) ms · ([\d.]+) tok/s · prompt (\d+) tok · reply (\d+) tok · context (\d+)/256", stats)
        assert m, stats
        prompt_n = len(tok.render_for_completion([{"role": "user", "content": "Wie groß ist der Baum?"}]))
        assert int(m[1]) > 0 and float(m[2]) > 0 and int(m[3]) == prompt_n and 0 < int(m[4]) <= 40
        assert int(m[5]) == int(m[3]) + int(m[4])

        # --- copy puts the message on the clipboard
        reply = stored()[0]["messages"][1]["content"]
        last_reply().locator(".copy-msg").click()
        assert page.evaluate("navigator.clipboard.readText()") == reply

        # --- the model picker switches models
        page.select_option("#model", "base/tiny")
        assert "base" in page.inner_text("#model-info") and "step 10" in page.inner_text("#model-info")
        assert not http("GET", url + "/health")[1]["models"]["base/tiny"]["loaded"]
        page.fill("#input", "Hallo")
        page.press("#input", "Enter")
        wait_idle()
        assert http("GET", url + "/health")[1]["models"]["base/tiny"]["loaded"]
        assert stored()[0]["messages"][-1]["model"] == "base/tiny"

        # --- a long reply streams in pieces, stop (Esc) halts it and the server frees the slot
        page.click("#new-chat")
        page.select_option("#model", "sft/scripted")
        page.evaluate("""() => { window.__lens = []; new MutationObserver(() => {
            const b = [...document.querySelectorAll('#messages .bubble.assistant')].pop();
            if (b) window.__lens.push(b.textContent.length); })
            .observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true}); }""")
        page.fill("#input", "a long answer please")
        page.press("#input", "Enter")
        page.wait_for_function("(document.querySelector('.msg.assistant .bubble')?.textContent || '').length > 60")
        page.keyboard.press("Escape")
        wait_idle()
        lens = page.evaluate("window.__lens")
        assert len({n for n in lens if n > 0}) >= 3, f"the reply did not stream in pieces: {lens}"
        text = last_reply().locator(".bubble").inner_text()
        page.wait_for_timeout(300)
        assert last_reply().locator(".bubble").inner_text() == text and "word399" not in text
        assert "stopped" in last_reply().locator(".stats").inner_text()
        for _ in range(100):  # the server notices the closed stream and frees the slot
            if http("GET", url + "/health")[1]["models"]["sft/scripted"]["active"] == 0:
                break
            page.wait_for_timeout(100)
        else:
            raise AssertionError("the stopped reply still holds its slot")

        # --- hostile markup executes nothing; markdown, code copy and the tool block render
        page.fill("#input", "show me")
        page.press("#input", "Enter")
        wait_idle()
        bubble = last_reply().locator(".bubble")
        assert page.evaluate("window.__pwned") is None
        assert bubble.locator("script").count() == 0 and bubble.locator("img[onerror]").count() == 0
        assert bubble.locator("strong").inner_text() == "bold"
        tool = bubble.locator("details.tool")
        assert tool.count() == 1 and "2+3" in tool.locator("summary").inner_text()
        assert "= 5" in tool.locator("summary").inner_text()
        bubble.locator("pre .copy-code").click()
        assert page.evaluate("navigator.clipboard.readText()") == "print(1)\n"
        page.click("#settings-toggle")
        for d in shots:
            page.screenshot(path=str(d / "serve-chat.png"))

        # --- a reload keeps the conversations
        n_convs = len(stored())
        page.reload()
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        assert page.locator("#conversations li").count() == n_convs == 2
        assert page.locator(".bubble.assistant details.tool").count() == 1

        # --- edit a message (the reply after it is regenerated), then regenerate the last reply
        page.locator(".msg.user .edit").nth(1).click()
        page.fill(".edit-box", "show me again")
        page.evaluate("renderAll()")  # what the model list arriving or a reply finishing does: the edit stays
        assert page.locator(".edit-box").input_value() == "show me again"
        page.click(".save-edit")
        wait_idle()
        msgs = next(c for c in stored() if c["id"] == page.evaluate("JSON.parse(localStorage.getItem('nanoforge.current'))"))["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
        assert msgs[2]["content"] == "show me again" and "so the answer is 5." in msgs[3]["content"]
        last_reply().locator(".regen").click()
        wait_idle()
        assert page.locator(".msg").count() == 4 and page.locator(".bubble.assistant details.tool").count() == 1

        # --- side by side streams two replies, each with its stats
        page.click("[data-tab=compare]")
        panes = page.locator("#tab-compare .pane")
        panes.nth(0).locator(".pane-model").select_option("sft/chat")
        panes.nth(1).locator(".pane-model").select_option("base/tiny")
        page.fill("#compare-input", "Erzähl mir von der Sonne")
        page.press("#compare-input", "Enter")
        page.wait_for_function("[...document.querySelectorAll('.pane-stats')].every(s => s.textContent.includes('tok/s'))")
        outs = [panes.nth(i).locator(".pane-out").inner_text() for i in range(2)]
        assert all(outs) and outs[0] != outs[1]

        # --- the tokenizer playground shows Tokenizer.encode's ids, two tokenizers side by side
        page.click("[data-tab=tokenizer]")
        tp = page.locator(".tok-pane")
        tp.nth(0).locator(".tok-name").select_option("tok")
        tp.nth(1).locator(".tok-name").select_option("small")
        sample = "Die Katze läuft schnell über die grüne Wiese. 12345"
        page.fill("#tok-input", sample)
        expect = [tok.encode(sample), Tokenizer.load(small).encode(sample)]
        for i in range(2):
            page.wait_for_function(f"document.querySelectorAll('.tok-ids')[{i}].textContent === '{json.dumps(expect[i]).replace(' ', '')}'")
            assert tp.nth(i).locator(".tok-view span").count() == len(expect[i])
            assert tp.nth(i).locator(".tok-count").inner_text().startswith(f"{len(expect[i])} tokens")
        assert len(expect[0]) != len(expect[1])
        theme = page.evaluate("document.documentElement.dataset.theme")
        page.click("#theme")
        assert page.evaluate("document.documentElement.dataset.theme") == {"light": "dark", "dark": "light"}[theme]
        for d in shots:
            page.screenshot(path=str(d / "serve-tokenizer.png"))
        page.click("[data-tab=chat]")

        # --- a server with an API key: the page says so, and works once the key is set
        with run_in_thread(create_app(pool, api_key="k3y")) as keyed:
            p2 = ctx.new_page()
            p2.goto(keyed + "/")
            p2.wait_for_function("!document.querySelector('#banner').hidden")
            assert "API key" in p2.inner_text("#banner")
            p2.click("#settings-toggle")
            p2.fill("#api_key", "k3y")
            p2.dispatch_event("#api_key", "change")
            p2.wait_for_function("document.querySelectorAll('#model option').length === 3")
            assert p2.locator("#banner").is_hidden()
            p2.close()
    pool.close()

    # --- the server is gone: a clear message, no crash
    page.fill("#input", "noch da?")
    page.press("#input", "Enter")
    page.wait_for_function("!document.querySelector('#banner').hidden")
    assert "Cannot reach the server" in page.inner_text("#banner")
    assert errors == []
    for name in ("serve-chat.png", "serve-tokenizer.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    ctx.close()
