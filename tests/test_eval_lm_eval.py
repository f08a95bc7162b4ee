"""lm-evaluation-harness agreement: on one local multiple-choice task, `run_tasks`, lm-eval on the native
checkpoint (`nanoforge lm-eval --model nanoforge`) and lm-eval `--model hf` on the Hugging Face export give
the same acc/acc_norm. lm-eval is slow to import and run: every run happens once in a module fixture."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nanoforge.cli import main

from _eval_helpers import make_checkpoint, make_tokenizer

pytest.importorskip("lm_eval")

WORDS = "der die das Haus Baum Katze Hund rot blau grün groß klein Sonne Mond Stern Wasser".split()


def local_task(folder: Path, n: int = 16) -> Path:
    """A multiple-choice task in lm-eval's local format: dataset_path json, absolute data_files."""
    rng = random.Random(3)
    docs = []
    for i in range(n):
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        docs.append({"q": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + (" " if i % 3 == 0 else ""),
                     "choices": choices, "label": rng.randrange(4)})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "local_mc.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (folder / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Frage: {{q}}\"\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return folder / "local_mc.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nanoforge.eval.tasks import run_tasks

    root = tmp_path_factory.mktemp("lmeval")
    ck = make_checkpoint(root, make_tokenizer(root))
    yaml_path = local_task(root / "task")
    ours = run_tasks(ck, [yaml_path])
    out = {"root": root, "ckpt": ck, "ours": ours}
    native_dir = root / "native_out"
    out["cli_rc"] = main(["lm-eval", "--model", "nanoforge", "--model_args", f"checkpoint={ck}", "--tasks",
                          "local_mc", "--include_path", str(yaml_path.parent), "--output_path", str(native_dir)])
    found = sorted(native_dir.rglob("results*.json"))
    out["native_file"] = found[-1] if found else None
    out["native"] = json.loads(found[-1].read_text()) if found else None
    try:
        from nanoforge.export.hf import export_hf
    except ImportError:
        out["hf"] = None
        return out
    export = export_hf(ck, root / "export")
    out["hf"] = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32", device="cpu",
                                        tasks=["local_mc"], batch_size=16,
                                        task_manager=TaskManager(include_path=str(yaml_path.parent)))
    return out


def _scores(results: dict) -> dict[str, float]:
    r = results["results"]["local_mc"]
    return {k: r[k] for k in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none")}


def test_nanoforge_lm_eval_cli_runs_the_native_checkpoint(runs) -> None:
    assert runs["cli_rc"] == 0 and runs["native"] is not None
    assert runs["native"]["n-samples"]["local_mc"]["effective"] == 16


def test_run_tasks_agrees_with_lm_eval_on_the_native_checkpoint(runs) -> None:
    ours, native = _scores(runs["ours"]), _scores(runs["native"])
    for key in ours:
        assert ours[key] == pytest.approx(native[key], abs=1e-6), key


def test_run_tasks_agrees_with_lm_eval_hf_on_the_export(runs) -> None:
    if runs["hf"] is None:
        pytest.skip("nanoforge.export.hf is not available")
    ours, hf = _scores(runs["ours"]), _scores(runs["hf"])
    for key in ours:
        assert ours[key] == pytest.approx(hf[key], abs=1e-6), key


def test_scores_are_not_degenerate(runs) -> None:
    """The random model must separate choices, or agreement would be trivial."""
    from nanoforge.eval.scoring import encode_pair, score_group
    from nanoforge.infer.engine import load_checkpoint

    model, tok, _ = load_checkpoint(runs["ckpt"])
    ctx, cont = encode_pair(tok, "Frage: der Hund", " rot")
    ctx2, cont2 = encode_pair(tok, "Frage: der Hund", " Sonne Mond")
    (a, _), (b, _) = score_group(model, ctx, [cont, cont2])
    assert abs(a - b) > 1e-3


def test_evaluate_with_lm_eval_accepts_a_model_object(runs) -> None:
    from nanoforge.eval.lm_adapter import evaluate_with_lm_eval
    from nanoforge.infer.engine import load_checkpoint

    model, tok, _ = load_checkpoint(runs["ckpt"])
    res = evaluate_with_lm_eval(model, ["local_mc"], tokenizer=tok, include_path=runs["root"] / "task", limit=4)
    assert res["results"]["local_mc"]["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_compare_reads_our_and_lm_eval_results_alike(runs, tmp_path) -> None:
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps(runs["ours"]))
    out = tmp_path / "table.csv"
    assert main(["eval", "compare", str(ours), str(runs["native_file"]), "--format", "csv",
                 "--names", "ours", "lm-eval", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("model,local_mc acc,local_mc acc_norm,Avg")
    assert rows[1].split(",")[1:3] == rows[2].split(",")[1:3]
