"""Generation engine: KV-cached greedy equals recomputing the whole sequence, seeded sampling repeats,
stop strings cut, streaming pieces add up to the text, `nanoforge sample` prints a continuation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _eval_helpers import make_checkpoint, make_tokenizer

from nanoforge.cli import main
from nanoforge.errors import UserError
from nanoforge.infer.engine import generate, generate_ids, load_checkpoint, stream

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("infer")
    ckpt = make_checkpoint(root, make_tokenizer(root))
    model, tok, _ = load_checkpoint(ckpt)
    return ckpt, model, tok


def _greedy_no_cache(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def test_cached_greedy_equals_full_recompute(loaded: tuple) -> None:
    _, model, tok = loaded
    ids = tok.encode("der Hund läuft schnell und", bos=True)
    assert list(generate_ids(model, ids, max_new_tokens=16)) == _greedy_no_cache(model, ids, 16)


def test_sampling_is_seeded_and_top_k_one_is_greedy(loaded: tuple) -> None:
    _, model, tok = loaded
    a = generate(model, tok, "die Katze", max_new_tokens=12, temperature=1.0, seed=3)
    b = generate(model, tok, "die Katze", max_new_tokens=12, temperature=1.0, seed=3)
    assert a == b
    ids = tok.encode("die Katze", bos=True)
    assert list(generate_ids(model, ids, max_new_tokens=8, temperature=1.0, top_k=1, seed=5)) == \
        list(generate_ids(model, ids, max_new_tokens=8))


def test_stop_string_cuts_and_stream_adds_up(loaded: tuple) -> None:
    _, model, tok = loaded
    full = generate(model, tok, "rot blau", max_new_tokens=20)
    assert full and "".join(stream(model, tok, "rot blau", max_new_tokens=20)) == full
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = generate(model, tok, "rot blau", max_new_tokens=20, stop=[stop])
    assert stop not in cut and full.startswith(cut) and len(cut) <= full.index(stop)


def test_sample_cli_prints_prompt_and_continuation(loaded: tuple, capsys: pytest.CaptureFixture) -> None:
    ckpt, model, tok = loaded
    assert main(["sample", str(ckpt), "--prompt", "der Baum", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out == "der Baum" + generate(model, tok, "der Baum", max_new_tokens=8) + "\n"


def test_sample_missing_checkpoint_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_generation_stops_at_bos_eos(loaded: tuple) -> None:
    _, model, tok = loaded
    ids = tok.encode("der Hund", bos=True)
    bump = torch.zeros(model.config.vocab_size)
    bump[tok.bos_id] = 1e4  # make "start the next document" the only choice

    logits = model.logits
    model.logits = lambda h: logits(h) + bump
    try:
        assert list(generate_ids(model, ids, max_new_tokens=3)) == [tok.bos_id] * 3
        assert generate(model, tok, "der Hund", max_new_tokens=3) == ""
    finally:
        del model.logits


def test_bad_prompts_are_user_errors(loaded: tuple) -> None:
    _, model, tok = loaded
    with pytest.raises(UserError, match="empty"):
        generate(model, tok, [], max_new_tokens=2)
    with pytest.raises(UserError, match="token ids"):
        list(generate_ids(model, [model.config.vocab_size], max_new_tokens=2))


def test_sample_json_with_bare_tag(loaded: tuple, nanoforge_home: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, model, tok = loaded
    dest = nanoforge_home / "checkpoints" / "base" / "demo"
    shutil.copytree(ckpt, dest)
    args = ["sample", "demo", "--prompt", "die Sonne", "--max-new-tokens", "6", "--temperature", "0.8",
            "--top-k", "20", "--seed", "7", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"prompt": "die Sonne", "completion": generate(model, tok, "die Sonne", max_new_tokens=6,
                                                                 temperature=0.8, top_k=20, seed=7)}
