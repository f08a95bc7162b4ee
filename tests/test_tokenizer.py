"""Tokenizer stage: one Tokenizer class, Hugging Face export round trip, our BPE == rustbpe, imports."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoforge.cli import main
from nanoforge.data.corpus import iter_documents
from nanoforge.errors import UserError
from nanoforge.tokenizer import NANOCHAT_PATTERN, SPECIAL_TOKENS, Tokenizer
from nanoforge.tokenizer.train import train_tokenizer

pytestmark = pytest.mark.corpus
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"

HARD = [
    "", " ", "Grüße aus Bad Tölz, Straße, Maß, ÄÖÜ äöü ß ẞ",
    "Willkommen in Holzkirchen, südlich von München!",
    "Familie: 👨‍👩‍👧‍👦, Flagge 🏳️‍🌈, Hautton 👍🏽",
    "日本語のテキストと中文文本，한국어",
    "a  b   c    d\n\n\n\te\t\t\tf \t \n end   ",
    "Windows\r\nZeilen\r\n\r\nEnde\r", "\n", "\t", "   ", "\r\n",
    " ".join(str(10 ** k + 7) for k in range(0, 21)) + " 0 00 000 3.14159 1,000,000",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # Kommentar\n",
    "<|bos|>", "Text mit <|user_start|>Frage<|user_end|> und <|assistant_start|>Antwort<|assistant_end|>",
    "".join(SPECIAL_TOKENS), "<|python_start|>print(1)<|python_end|><|output_start|>1<|output_end|>",
    "Ünïcödé — “quotes” «guillemets» … €100 ¼ ½ ™ ©",
    "don't I'LL we've THEY'RE it's", "\u00a0nbsp\u2009thin\u200bzwsp",
]


@pytest.fixture(scope="module")
def slice_docs() -> list[str]:
    if not (CORPUS / "de").is_dir():
        pytest.skip("needs the shared corpus")
    docs, n = [], 0
    for d in iter_documents(CORPUS / "de"):
        docs.append(d)
        n += len(d)
        if n > 1_000_000:
            break
    return docs


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory, slice_docs: list[str]) -> dict[str, Tokenizer]:
    """One small tokenizer per backend (and the GPT-NeoX recipe), trained on a 1M-character slice."""
    root = tmp_path_factory.mktemp("toks")
    out = {}
    for backend, compat in (("rustbpe", False), ("python", False), ("neox", False), ("neox", True)):
        key = backend + ("-compat" if compat else "")
        path = train_tokenizer(CORPUS / "de", vocab_size=1024, backend=backend, out=root / key,
                               max_chars=1_000_000, neox_compat=compat)
        out[key] = Tokenizer.load(path)
    return out


@pytest.mark.parametrize("key", ["rustbpe", "neox", "neox-compat"])
def test_autotokenizer_gives_our_ids_and_text_on_the_hard_set(toks: dict[str, Tokenizer], key: str) -> None:
    from transformers import AutoTokenizer

    tok = toks[key]
    hf = AutoTokenizer.from_pretrained(str(tok.path / "hf"), local_files_only=True)
    assert hf.bos_token == "<|bos|>" and hf.eos_token_id == tok.bos_id and hf.pad_token_id == tok.bos_id
    for text in HARD:
        ids = tok.encode(text, bos=True)
        assert hf(text)["input_ids"] == ids, text                      # specials as text (default)
        parsed = tok.encode(text, bos=True, parse_special=True)
        assert hf(text, split_special_tokens=False)["input_ids"] == parsed, text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids[1:])
        if key != "neox-compat":                                       # NFKC and dropped bytes are lossy
            assert tok.decode(ids[1:]) == text
            assert tok.decode(parsed) == "<|bos|>" + text


def test_special_strings_in_text_are_plain_text_unless_parsed(toks: dict[str, Tokenizer]) -> None:
    tok = toks["rustbpe"]
    assert tok.bos_id not in tok.encode("<|bos|>")
    assert tok.encode("<|bos|>", parse_special=True) == [tok.bos_id] == [tok.special_id("<|bos|>")]
    assert tok.eos_id == tok.bos_id and tok.vocab_size == 1024
    assert sorted(tok.special_tokens.values()) == list(range(1024 - 9, 1024))


def _rustbpe_ranks(docs: list[str], vocab: int) -> dict[bytes, int]:
    import rustbpe

    r = rustbpe.Tokenizer()
    r.train_from_iterator(iter(docs), vocab, pattern=NANOCHAT_PATTERN)
    return {bytes(b): i for b, i in r.get_mergeable_ranks()}


@pytest.mark.parametrize(("max_chars", "vocab"), [(2_000_000, 4096),
                                                  pytest.param(None, 8192, marks=pytest.mark.slow)])
def test_python_backend_makes_exactly_rustbpes_merges_on_real_text(corpus_de: Path, max_chars: int | None,
                                                                   vocab: int) -> None:
    from nanoforge.tokenizer.bpe import count_chunks, merges_to_ranks, train_bpe

    docs, n = [], 0
    for d in iter_documents(corpus_de):
        docs.append(d)
        n += len(d)
        if max_chars and n > max_chars:
            break
    merges = train_bpe(count_chunks(docs, NANOCHAT_PATTERN), vocab - 256)
    assert len(merges) == vocab - 256
    assert merges_to_ranks(merges) == _rustbpe_ranks(docs, vocab)


@pytest.mark.parametrize("docs", [["ab cd ef gh"], ["aaaa aaa aa", "abab baba"], ["zz yy xx ww " * 3, "ba ab"],
                                  ["\u00e4\u00f6 \u00f6\u00e4 " * 2 + "12 21 123"]])
@pytest.mark.parametrize("vector_min", [0, 2, float("inf")])
def test_python_backend_breaks_ties_like_rustbpe(docs: list[str], vector_min: float) -> None:
    """Both ways of applying a merge (numpy on the flat state, str on the words) and the switch between them."""
    from nanoforge.tokenizer.bpe import count_chunks, merges_to_ranks, train_bpe

    for vocab in (258, 262, 270):
        merges = train_bpe(count_chunks(docs, NANOCHAT_PATTERN, processes=1), vocab - 256, vector_min=vector_min)
        assert merges_to_ranks(merges) == _rustbpe_ranks(docs, vocab), vocab


@settings(max_examples=120, deadline=None)
@given(docs=st.lists(st.text(alphabet="aab \u00e4\u00df\U0001f600\n1", max_size=40), min_size=1, max_size=6),
       merges=st.integers(1, 40), vector_min=st.sampled_from([0, 3, float("inf")]))
def test_python_backend_matches_rustbpe_on_random_text(docs: list[str], merges: int, vector_min: float) -> None:
    """Runs of one character (a == b merges), adjacent repeats, multi-byte characters, digits, newlines; numpy
    throughout, strings throughout, or a switch between them."""
    from nanoforge.tokenizer.bpe import count_chunks, merges_to_ranks, train_bpe

    counts = count_chunks(docs, NANOCHAT_PATTERN, processes=1)
    ranks = merges_to_ranks(train_bpe(counts, merges, vector_min=vector_min))
    expected = _rustbpe_ranks(docs, 256 + merges)
    assert ranks == expected


def test_count_chunks_in_worker_processes_counts_every_regex_chunk(slice_docs: list[str]) -> None:
    """Two workers started from a fork server (this process has rayon's threads by now), small batches so both
    get some; the total is the regex module's own count over every document."""
    import threading
    from collections import Counter

    import regex

    from nanoforge.tokenizer.bpe import count_chunks

    docs = slice_docs[:60]
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait)  # a live thread in the parent, as after the earlier stages
    busy.start()
    try:
        counts = count_chunks(iter(docs), NANOCHAT_PATTERN, processes=2, batch_chars=20_000)
    finally:
        stop.set()
        busy.join()
    pat = regex.compile(NANOCHAT_PATTERN)
    assert counts == Counter(c for d in docs for c in pat.findall(d))
    assert count_chunks([], NANOCHAT_PATTERN) == Counter()


def test_python_and_rustbpe_backends_save_identical_tokenizers(toks: dict[str, Tokenizer]) -> None:
    assert toks["python"].ranks == toks["rustbpe"].ranks
    assert toks["python"].fingerprint == toks["rustbpe"].fingerprint


def test_neox_ranks_in_tiktoken_reproduce_hf_tokenizers_ids(toks: dict[str, Tokenizer],
                                                             slice_docs: list[str]) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    tok = toks["neox"]
    assert tok.engine == "tiktoken" and toks["neox-compat"].engine == "hf"
    hf = HFTokenizer.from_file(str(tok.path / "hf" / "tokenizer.json"))
    hf.encode_special_tokens = True  # what split_special_tokens in tokenizer_config.json does for AutoTokenizer
    for text in [*HARD, *slice_docs[:200]]:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_encode_decode_round_trips_any_text(toks: dict[str, Tokenizer], text: str) -> None:
    for key in ("rustbpe", "python", "neox"):
        tok = toks[key]
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, parse_special=True)) == text


def test_token_bytes_sum_to_the_utf8_length(toks: dict[str, Tokenizer]) -> None:
    for tok in toks.values():
        assert tok.token_bytes.dtype.name == "int32" and tok.token_bytes.shape == (tok.vocab_size,)
        assert tok.token_bytes[tok.bos_id] == 0
    tok = toks["rustbpe"]
    for text in HARD:
        assert int(tok.token_bytes[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_encode_batch_matches_encode(toks: dict[str, Tokenizer]) -> None:
    for tok in toks.values():
        assert tok.encode_batch(HARD, bos=True) == [tok.encode(t, bos=True) for t in HARD]


def test_save_load_round_trip_and_tampering_is_refused(toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    tok = toks["rustbpe"]
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    assert again.fingerprint == tok.fingerprint and again.encode(HARD[3]) == tok.encode(HARD[3])
    assert not list(tmp_path.rglob("*.pkl"))
    ranks = (tmp_path / "copy" / "ranks.tiktoken").read_text().splitlines()
    ranks[300], ranks[301] = ranks[301].split()[0] + " 300", ranks[300].split()[0] + " 301"
    (tmp_path / "copy" / "ranks.tiktoken").write_text("\n".join(ranks) + "\n")
    with pytest.raises(UserError, match="fingerprint"):
        Tokenizer.load(tmp_path / "copy")


def test_import_hf_and_export_hf_cli(toks: dict[str, Tokenizer], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    tok = toks["rustbpe"]
    assert main(["tokenizer", "export-hf", str(tok.path), "--out", str(tmp_path / "hf")]) == 0
    assert main(["tokenizer", "import-hf", str(tmp_path / "hf"), "--name", "imported"]) == 0
    imported = Tokenizer.load("imported")
    assert imported.engine == "hf" and imported.bos_id == tok.bos_id
    for text in HARD:
        assert imported.encode(text, bos=True) == tok.encode(text, bos=True)
    assert main(["tokenizer", "import-hf", str(tmp_path / "nothing"), "--name", "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_export_hf_cli_refuses_to_overwrite_without_force(toks: dict[str, Tokenizer], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Into a model folder: its other files stay; our three files are only replaced with --force."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "tokenizer.json").write_text("old")
    args = ["tokenizer", "export-hf", str(toks["rustbpe"].path), "--out", str(out)]
    assert main(args) == 2
    assert "already holds tokenizer.json" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_text() == "old"
    assert main([*args, "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    (tmp_path / "file").write_text("x")
    assert main(["tokenizer", "export-hf", str(toks["rustbpe"].path), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_import_nanochat_reads_the_pickle_without_trusting_it(toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    import tiktoken

    tok = toks["rustbpe"]
    enc = tiktoken.Encoding(name="nanochat", pat_str=NANOCHAT_PATTERN, mergeable_ranks=tok.ranks,
                            special_tokens=tok.special_tokens)
    (tmp_path / "nc").mkdir()
    (tmp_path / "nc" / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    assert main(["tokenizer", "import-nanochat", str(tmp_path / "nc"), "--name", "nc"]) == 0  # restricted unpickler
    nc = Tokenizer.load("nc")
    assert nc.fingerprint == tok.fingerprint
    assert [nc.encode(t) for t in itertools.islice(HARD, 8)] == [tok.encode(t) for t in itertools.islice(HARD, 8)]
