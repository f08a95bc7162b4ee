"""The batched engine: rows of different lengths decode as if alone, the cache equals recomputing,
seeds reproduce per row, rows join and leave mid-flight, n samples share a prefill, tool calls force
their output with mask 0, streaming never splits a character, prefix reuse prefills only new tokens,
and greedy tokens equal transformers' `generate` on the exported model."""

from __future__ import annotations

import pytest
import torch
from _engine_helpers import Scripted, byte_ids
from _eval_helpers import make_checkpoint, make_tokenizer

from nanoforge.errors import UserError
from nanoforge.infer.engine import Engine, SamplingParams, load_checkpoint
from nanoforge.infer.tools import ToolRegistry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("engine")
    ckpt = make_checkpoint(root, make_tokenizer(root))
    model, tok, _ = load_checkpoint(ckpt)
    return ckpt, model, tok


def _greedy_recompute(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by running the whole sequence through the model at every step (no cache)."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


PROMPTS = ["der Hund", "die Katze sieht den großen blauen Mond und", "rot", "zwei drei vier fünf sechs ist"]


def _no_stops(**kw) -> SamplingParams:
    return SamplingParams(stop_token_ids=(), **kw)


def test_batched_greedy_rows_equal_each_row_alone_and_full_recompute(loaded: tuple) -> None:
    _, model, tok = loaded
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: padding is exercised
    params = _no_stops(max_tokens=12)
    batched = Engine(model, tok).generate(prompts, params)
    for p, c in zip(prompts, batched):
        alone = Engine(model, tok).generate([p], params)[0]
        assert c.ids == alone.ids == _greedy_recompute(model, p, 12)
        assert c.mask == [1] * 12 and c.finish_reason == "length" and c.prompt_tokens == len(p)


def test_rows_join_and_leave_between_steps(loaded: tuple) -> None:
    _, model, tok = loaded
    a, b, c = (tok.encode(p, bos=True) for p in PROMPTS[:3])
    engine = Engine(model, tok, max_batch=2)
    ra = engine.add(a, _no_stops(max_tokens=10))
    for _ in range(3):
        engine.step()
    rb = engine.add(b, _no_stops(max_tokens=4))    # joins while a runs
    rc = engine.add(c, _no_stops(max_tokens=6))    # waits: max_batch is 2
    seen_c = []
    while engine.has_work():
        deltas = engine.step()
        assert len(deltas) <= 2
        seen_c += [t for d in deltas if d.rid == rc for t in d.token_ids]
    for rid, p, n in ((ra, a, 10), (rb, b, 4), (rc, c, 6)):
        assert engine.result(rid).ids == _greedy_recompute(model, p, n)
    assert seen_c == engine.result(rc).ids


def test_cancel_removes_a_row_and_the_others_go_on(loaded: tuple) -> None:
    _, model, tok = loaded
    a, b = (tok.encode(p, bos=True) for p in PROMPTS[:2])
    engine = Engine(model, tok)
    ra, rb = engine.add(a, _no_stops(max_tokens=8)), engine.add(b, _no_stops(max_tokens=8))
    engine.step()
    engine.step()
    engine.cancel(ra)
    while engine.has_work():
        assert all(d.rid == rb for d in engine.step())
    assert engine.result(ra).finish_reason == "cancelled" and len(engine.result(ra).ids) == 2
    assert engine.result(rb).ids == _greedy_recompute(model, b, 8)


def test_seeds_reproduce_per_row_whatever_the_batch(loaded: tuple) -> None:
    _, model, tok = loaded
    p = tok.encode("die Sonne", bos=True)
    params = _no_stops(temperature=1.0, top_k=50, top_p=0.9, seed=11, max_tokens=16)
    alone = Engine(model, tok).generate([p], params)[0].ids
    others = [tok.encode(x, bos=True) for x in PROMPTS]
    in_batch = Engine(model, tok).generate([others[0], p, others[1]], params)[1].ids
    assert alone == in_batch
    other_seed = Engine(model, tok).generate([p], _no_stops(temperature=1.0, seed=12, max_tokens=16))[0].ids
    assert other_seed != alone


def test_n_samples_share_one_prefill_and_equal_separately_seeded_rows(loaded: tuple) -> None:
    _, model, tok = loaded
    p = tok.encode("das Haus ist", bos=True)
    params = _no_stops(temperature=1.2, seed=5, max_tokens=10)
    engine = Engine(model, tok)
    calls = []
    forward = engine._forward
    engine._forward = lambda slot, tokens, starts: (calls.append(len(tokens[0])), forward(slot, tokens, starts))[1]
    samples = engine.generate([p], params, n=3)
    assert calls.count(len(p)) == 1  # one prefill for the three samples
    for i, c in enumerate(samples):
        single = Engine(model, tok).generate([p], _no_stops(temperature=1.2, seed=5 + i, max_tokens=10))[0]
        assert c.ids == single.ids
    assert len({tuple(c.ids) for c in samples}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(loaded: tuple) -> None:
    _, model, tok = loaded
    p = tok.encode("der Baum", bos=True)
    greedy = Engine(model, tok).generate([p], _no_stops(max_tokens=8))[0].ids
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        assert Engine(model, tok).generate([p], _no_stops(temperature=1.5, seed=3, max_tokens=8, **kw))[0].ids == greedy


def test_bad_sampling_params_and_prompts_are_user_errors(loaded: tuple) -> None:
    _, model, tok = loaded
    for kw, words in (({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                      ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"top_k": -1}, "top_k")):
        with pytest.raises(UserError, match=words):
            SamplingParams(**kw)
    engine = Engine(model, tok)
    with pytest.raises(UserError, match="context is 256"):
        engine.add([1] * 256)
    with pytest.raises(UserError, match="empty"):
        engine.add([])


def test_generation_stops_at_the_context(loaded: tuple) -> None:
    _, model, tok = loaded
    c = Engine(model, tok).generate([[tok.bos_id] * 250], _no_stops(max_tokens=100))[0]
    assert c.finish_reason == "length" and c.prompt_tokens + len(c.ids) == 256 + 1  # the last one is not fed


def test_streaming_never_splits_a_multibyte_character(loaded: tuple) -> None:
    _, model, tok = loaded
    text = "Grüße 😀 aus 東京 – ok"
    prompt = [tok.bos_id]
    script = prompt + byte_ids(tok, text) + [tok.special_id("<|assistant_end|>")]
    engine = Engine(Scripted(model.config, script), tok)
    deltas = list(engine.stream(prompt, SamplingParams(max_tokens=100)))
    pieces = [d.text for d in deltas]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") >= 10  # continuation bytes wait for their character
    assert deltas[-1].finish_reason == "stop"


def test_stop_strings_cut_across_tokens_and_are_not_sent(loaded: tuple) -> None:
    _, model, tok = loaded
    prompt = [tok.bos_id]
    script = prompt + byte_ids(tok, "eins zwei\nUser: drei")
    engine = Engine(Scripted(model.config, script), tok)
    rid = None
    pieces = []
    for d in engine.stream(prompt, SamplingParams(max_tokens=100, stop=["\nUser:"])):
        rid, _ = d.rid, pieces.append(d.text)
    c = engine.result(rid)
    assert "".join(pieces) == c.text == "eins zwei" and c.finish_reason == "stop"


def test_tool_call_forces_the_calculator_output_with_mask_zero(loaded: tuple) -> None:
    _, model, tok = loaded
    sid = tok.special_id
    prompt = [tok.bos_id, sid("<|assistant_start|>")]
    answer = tok.encode("7")
    forced = [sid("<|output_start|>"), *answer, sid("<|output_end|>")]
    script = (prompt + [sid("<|python_start|>")] + tok.encode("3+4") + [sid("<|python_end|>")]
              + [0] * len(forced) + tok.encode(" also 7") + [sid("<|assistant_end|>")])
    engine = Engine(Scripted(model.config, script), tok)
    rid = engine.add(prompt, SamplingParams(max_tokens=100))
    deltas = []
    while engine.has_work():
        deltas += engine.step()
    c = engine.result(rid)
    n_call = 2 + len(tok.encode("3+4"))
    assert c.ids == script[len(prompt):len(prompt) + n_call] + forced + tok.encode(" also 7") + [sid("<|assistant_end|>")]
    assert c.mask == [1] * n_call + [0] * len(forced) + [1] * (len(tok.encode(" also 7")) + 1)
    assert c.parts == [{"type": "python", "text": "3+4"}, {"type": "python_output", "text": "7"},
                       {"type": "text", "text": " also 7"}]
    assert c.text == " also 7" and c.message()["content"][1] == {"type": "python_output", "text": "7"}
    assert [d.forced for d in deltas] == [m == 0 for m in c.mask]
    assert "".join(d.text for d in deltas if d.part == "python_output") == "7"


def test_a_second_tool_start_inside_a_call_starts_the_call_again(loaded: tuple) -> None:
    _, model, tok = loaded
    sid = tok.special_id
    prompt = [tok.bos_id, sid("<|assistant_start|>")]
    forced = [sid("<|output_start|>"), *tok.encode("7"), sid("<|output_end|>")]
    script = (prompt + [sid("<|python_start|>")] + tok.encode("9*") + [sid("<|python_start|>")] + tok.encode("3+4")
              + [sid("<|python_end|>")] + [0] * len(forced) + [sid("<|assistant_end|>")])
    engine = Engine(Scripted(model.config, script), tok)
    rid = engine.add(prompt, SamplingParams(max_tokens=100))
    while engine.has_work():
        engine.step()
    c = engine.result(rid)
    assert c.ids[-len(forced) - 1:-1] == forced  # the calculator saw "3+4", not "9*<|python_start|>3+4"


def test_a_tool_added_to_the_registry_runs_without_engine_changes(loaded: tuple) -> None:
    _, model, tok = loaded
    sid = tok.special_id
    tools = ToolRegistry()
    tools.register("shout", lambda s: s.upper())
    prompt = [tok.bos_id]
    script = prompt + [sid("<|python_start|>")] + tok.encode("rot") + [sid("<|python_end|>")] + [0] * 8
    c = Engine(Scripted(model.config, script), tok, tools=tools).generate([prompt], SamplingParams(max_tokens=30))[0]
    assert {"type": "python_output", "text": "ROT"} in c.parts


def test_prefix_reuse_prefills_only_new_tokens_and_gives_the_same_reply(loaded: tuple) -> None:
    _, model, tok = loaded
    turn1 = tok.encode("der Hund läuft", bos=True)
    params = _no_stops(max_tokens=6)
    engine = Engine(model, tok)
    rid = engine.add(turn1, params, keep_cache=True)
    while engine.has_work():
        engine.step()
    first = engine.result(rid)
    snap = engine.snapshot(rid)
    assert snap.ids == (turn1 + first.ids)[:len(turn1) + 5]  # the last sampled token was never fed
    turn2 = turn1 + first.ids + tok.encode(" und die Katze")
    reused = Engine(model, tok)
    for _ in engine.stream(turn2, params, prefix=snap):
        pass
    rid2 = max(engine._done)
    again, full = engine.result(rid2), reused.generate([turn2], params)[0]
    assert again.ids == full.ids
    assert again.cached_tokens == len(snap.ids)
    assert again.timings["prefill_tokens"] == len(turn2) - len(snap.ids) == 1 + len(tok.encode(" und die Katze"))
    # an edited earlier token: only the part before it is reused
    edited = list(turn2)
    edited[3] = (edited[3] + 1) % tok.vocab_size
    for _ in engine.stream(edited, params, prefix=snap):
        pass
    c = engine.result(max(engine._done))
    assert c.cached_tokens == 3 and c.ids == Engine(model, tok).generate([edited], params)[0].ids


def test_greedy_equals_transformers_generate_on_the_export(loaded: tuple, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from nanoforge.export.hf import export_hf

    ckpt, model, tok = loaded
    out = export_hf(ckpt, tmp_path / "hf", force=True)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # ten tokens each side, stop tokens included
    prompts = [tok.encode(p, bos=True) for p in PROMPTS[:3]]
    ours = Engine(model, tok).generate(prompts, _no_stops(max_tokens=10))
    for p, c in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert c.ids == ref


@pytest.mark.parametrize("options", [{"mlp": "relu2", "qk_norm": True, "embed_norm": True, "norm_weights": False,
                                      "logit_softcap": 15.0}, {"qkv_bias": True}])
def test_model_options_decode_in_batches_as_recomputed(options: dict) -> None:
    from nanoforge.model import LLaMA, ModelConfig

    torch.manual_seed(0)
    model = LLaMA(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                              vocab_size=300, max_seq_len=128, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    prompts = [[1, 5, 9, 200], [7, 8], [3, 4, 5, 6, 7, 8, 9]]
    out = Engine(model, None).generate(prompts, SamplingParams(max_tokens=8, stop_token_ids=()))
    assert [c.ids for c in out] == [_greedy_recompute(model, p, 8) for p in prompts]


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_eager_tokens() -> None:
    """`compile=True` (`nanoforge chat --compile`, meant for CUDA) runs the model's forward under torch.compile
    with dynamic shapes: on the CPU too it must give the tokens of the uncompiled model."""
    from nanoforge.model import LLaMA, ModelConfig

    torch.manual_seed(0)
    model = LLaMA(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                              vocab_size=300, max_seq_len=128))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    prompts = [[1, 5, 9, 200], [7, 8], [3, 4, 5, 6, 7, 8, 9]]
    params = SamplingParams(max_tokens=8, stop_token_ids=())
    compiled = Engine(model, None, compile=True)
    assert compiled._decode_step is None  # the compiled model's path, not the eager decode step
    assert [c.ids for c in compiled.generate(prompts, params)] == [_greedy_recompute(model, p, 8) for p in prompts]
