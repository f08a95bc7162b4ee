"""The inference decode step (nanoforge/model/decode.py) gives the logits of the model's own forward over
the whole sequence, for rows at different positions and at one position, with every model option, and
follows in-place weight updates (RL trains the model between generations)."""

from __future__ import annotations

import pytest
import torch

from nanoforge.model import KVCache, LLaMA, ModelConfig
from nanoforge.model.decode import DecodeStep

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = [{}, {"tie_embeddings": True, "n_kv_heads": 4},
           {"mlp": "relu2", "qk_norm": True, "embed_norm": True, "norm_weights": False, "logit_softcap": 15.0},
           {"qkv_bias": True, "embed_norm": True}]


def _model(**options) -> LLaMA:
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=300,
               max_seq_len=64)
    model = LLaMA(ModelConfig(**{**cfg, **options})).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases too, so folding them into the products is exercised
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    return model


def _prefilled(model: LLaMA, rows: list[list[int]]) -> KVCache:
    """A cache holding each row's tokens, filled by the model's own forward (one row at a time)."""
    cache = KVCache(model.config, len(rows) + 1, model.config.max_seq_len)
    cache.k.normal_()  # stale contents beyond each row's length must not leak in
    cache.v.normal_()
    with torch.no_grad():
        for i, ids in enumerate(rows):
            cache.bind(slice(i, i + 1), [0], len(ids))
            model.hidden(torch.tensor([ids]), cache=cache)
    return cache


def _check(model: LLaMA, rows: list[list[int]], step: DecodeStep) -> None:
    nxt = [(7 * i + 11) % model.config.vocab_size for i in range(len(rows))]
    cache = _prefilled(model, rows)
    with torch.no_grad():
        got = step(torch.tensor(nxt), [len(r) for r in rows], cache)
        want = torch.stack([model(torch.tensor([r + [t]]))[0, -1] for r, t in zip(rows, nxt)])
    assert got.shape == want.shape == (len(rows), model.config.vocab_size)
    # float32 rounding only (the products sum in another order): logits here are O(1), errors ~5e-6
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # the new token's key and value are in the cache: a second step from there agrees too
    rows2 = [r + [t] for r, t in zip(rows, nxt)]
    with torch.no_grad():
        got2 = step(torch.tensor(nxt), [len(r) for r in rows2], cache)
        want2 = torch.stack([model(torch.tensor([r + [t]]))[0, -1] for r, t in zip(rows2, nxt)])
    torch.testing.assert_close(got2, want2, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("options", OPTIONS)
def test_rows_at_different_positions_get_the_forward_logits(options: dict) -> None:
    model = _model(**options)
    _check(model, [[1, 5, 9, 200], [7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]], DecodeStep(model))


@pytest.mark.parametrize("options", OPTIONS[:3])
def test_rows_at_one_position_get_the_forward_logits(options: dict) -> None:
    model = _model(**options)
    _check(model, [[1, 5, 9, 200, 4], [7, 8, 2, 2, 3], [3, 4, 5, 6, 7]], DecodeStep(model))
    _check(model, [[9, 8, 7]], DecodeStep(model))


@pytest.mark.parametrize("options", OPTIONS)
def test_one_row_takes_the_transposed_weights_and_gets_the_forward_logits(options: dict) -> None:
    model = _model(**options)
    step = DecodeStep(model)
    _check(model, [[9, 8, 7, 6]], step)
    assert step._rows is not None  # the [in, out] copies were made and used
    _check(model, [[1, 2, 3], [4, 5]], step)  # and more rows still take the other form


def test_in_place_weight_updates_are_followed() -> None:
    model = _model()
    step = DecodeStep(model)
    for rows in ([[1, 2, 3], [4, 5]], [[6, 7]]):  # several rows, and one row (the transposed copies)
        _check(model, rows, step)
    with torch.no_grad():  # what an optimizer step does: in place, same tensors
        for p in model.parameters():
            p.mul_(0.9).add_(0.01)
    for rows in ([[1, 2, 3], [4, 5]], [[6, 7]]):
        _check(model, rows, step)
    model.load_state_dict(_model(tie_embeddings=False).state_dict())
    for rows in ([[1, 2, 3], [4, 5]], [[6, 7]]):
        _check(model, rows, step)


def test_supports_only_fp32_without_autocast() -> None:
    model = _model()
    assert DecodeStep.supports(model, None)
    assert not DecodeStep.supports(model, torch.bfloat16)
    assert not DecodeStep.supports(model.to(torch.bfloat16), None)
    assert not DecodeStep.supports(torch.nn.Linear(2, 2), None)


def test_a_model_whose_logits_are_replaced_keeps_its_own_path() -> None:
    model = _model()
    model.logits = lambda h: LLaMA.logits(model, h)
    assert not DecodeStep.supports(model, None)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("start", [0, 9])
def test_prefill_gets_the_forward_logits_and_the_same_cache(options: dict, start: int) -> None:
    """A block of T tokens per row after `start` cached ones (a new turn after the conversation so far),
    rows 1..2 of the cache: the last position's logits and every key and value the model's forward gives."""
    model = _model(**options)
    step = DecodeStep(model)
    prefix = [[(5 * j + 3 * i) % 300 for j in range(start)] for i in range(2)]
    new = [[(11 * j + 7 * i + 1) % 300 for j in range(6)] for i in range(2)]
    ours, ref = (KVCache(model.config, 3, model.config.max_seq_len) for _ in range(2))
    for c in (ours, ref):
        c.k.normal_(generator=torch.Generator().manual_seed(1))
        c.v.normal_(generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i, ids in enumerate(prefix):  # the same cached prefix in both caches, from the model
            if ids:
                for c in (ours, ref):
                    c.bind(slice(i + 1, i + 2), [0], start)
                    model.hidden(torch.tensor([ids]), cache=c)
        got = step.prefill(torch.tensor(new), start, ours, row=1)
        ref.bind(slice(1, 3), [start, start], 6)
        want_cached = model.logits(model.hidden(torch.tensor(new), cache=ref)[:, -1])
        want = torch.stack([model(torch.tensor([p + n]))[0, -1] for p, n in zip(prefix, new)])
    assert got.shape == (2, model.config.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got, want_cached, atol=2e-5, rtol=1e-5)
    end = start + 6
    torch.testing.assert_close(ours.k[:, :, :, :end], ref.k[:, :, :, :end], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.v[:, :, :, :end], ref.v[:, :, :, :end], atol=2e-5, rtol=1e-5)
    assert torch.equal(ours.k[:, 0], ref.k[:, 0]) and torch.equal(ours.k[:, :, :, end:], ref.k[:, :, :, end:])
