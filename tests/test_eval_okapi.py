"""The bundled German tasks build the same prompts as lm-eval's own okapi task definitions (arc_de, m_mmlu_de,
hellaswag_de, truthfulqa_de_mc1/mc2 with their Python process_docs), pointed at the same local JSON rows:
contexts (few-shot examples included), continuations and gold answers, with lm-eval's default n-shot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nanoforge.eval.taskspec import load_task
from nanoforge.home import home

ARC_TEST = [
    {"id": "t1", "instruction": " Was ist [x] blau? ", "option_a": "Himmel", "option_b": "Gras [title] grün",
     "option_c": "Erde", "option_d": "Feuer", "option_e": "", "answer": "A"},
    {"id": "t2", "instruction": "Welcher  Planet ist am größten?", "option_a": "Mars", "option_b": "Jupiter",
     "option_c": "Venus", "option_d": "Merkur", "option_e": "Saturn", "answer": "E"},
    {"id": "t3", "instruction": "Wie viele Beine hat eine Spinne?", "option_a": "sechs", "option_b": "acht",
     "option_c": "zehn", "option_d": "vier", "answer": "B"},  # no option_e key at all
    {"id": "t4", "instruction": "Was schmilzt [step] bei 0 °C?", "option_a": " Eis ", "option_b": "Stahl",
     "option_c": "Glas", "option_d": "Holz", "option_e": None, "answer": "A"},
]
ARC_TRAIN = [{"id": f"r{i}", "instruction": f"Trainingsfrage {i}?", "option_a": f"ja {i}", "option_b": f"nein {i}",
              "option_c": "vielleicht", "option_d": "nie", **({"option_e": "immer"} if i % 2 else {}),
              "answer": "ABCDE"[i % (5 if i % 2 else 4)]} for i in range(9)]
ARC_VAL = [{**r, "id": "v" + r["id"], "instruction": "Validierung: " + r["instruction"]} for r in ARC_TRAIN[:4]]
MMLU_TEST = [{"id": f"m{i}", "instruction": f" Frage {i}: Was ist {i}+{i}? ", "option_a": str(2 * i),
              "option_b": str(i), "option_c": str(i + 1), "option_d": "keins", "answer": "ABCD"[i % 4]}
             for i in range(4)]
MMLU_TRAIN = [{**r, "id": "x" + r["id"], "instruction": "Beispiel " + r["instruction"]} for r in MMLU_TEST * 2]
HELLASWAG = [{"ind": i, "activity_label": ["Kochen", "Sport [title] Laufen", "Haus"][i % 3],
              "ctx_a": f"Ein Mann {i} steht", "ctx_b": ["schneidet [step] Brot", "läuft", ""][i % 3],
              "ctx": "", "endings": [" und isst. ", "[header] dann", "weiter  so", "nichts"], "label": str(i % 4)}
             for i in range(5)]
TRUTHFUL = [{"question": q, "mc1_targets_choices": ["wahr", "falsch"], "mc1_targets_labels": [1, 0],
             "mc2_targets_choices": ["wahr", "auch wahr", "falsch"], "mc2_targets_labels": [1, 1, 0]}
            for q in (" Wer  war [x] Kanzler? ", "Ist die Erde flach?", "Was ist 2+2?")]

DATA = {"m_arc": {"train": ARC_TRAIN, "validation": ARC_VAL, "test": ARC_TEST},
        "m_mmlu": {"train": MMLU_TRAIN, "test": MMLU_TEST}, "m_hellaswag": {"val": HELLASWAG},
        "m_truthfulqa": {"val": TRUTHFUL}}
# task -> (okapi folder, its files, our data folder)
OKAPI = {"arc_de": ("arc_multilingual", ["_arc_yaml", "arc_de.yaml", "utils.py"], "m_arc"),
         "m_mmlu_de": ("mmlu_multilingual", ["_default_yaml", "m_mmlu_de.yaml"], "m_mmlu"),
         "hellaswag_de": ("hellaswag_multilingual", ["_hellaswag_yaml", "hellaswag_de.yaml", "utils.py"], "m_hellaswag"),
         "truthfulqa_de_mc1": ("truthfulqa_multilingual", ["_truthfulqa_mc1_yaml", "truthfulqa_de_mc1.yaml", "utils.py"],
                               "m_truthfulqa"),
         "truthfulqa_de_mc2": ("truthfulqa_multilingual", ["_truthfulqa_mc1_yaml", "_truthfulqa_mc2_yaml",
                                                           "truthfulqa_de_mc2.yaml", "utils.py"], "m_truthfulqa")}


@pytest.fixture
def okapi(tmp_path: Path) -> dict[str, Path]:
    """Our task data under $NANOFORGE_HOME/task_data, and lm-eval's own okapi task files copied into one folder
    per task with dataset_path/dataset_name replaced by the same local JSON files."""
    import lm_eval

    for folder, splits in DATA.items():
        for split, rows in splits.items():
            f = home() / "task_data" / folder / f"de_{split}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    src = Path(lm_eval.__file__).parent / "tasks" / "okapi"
    out = {}
    for task, (folder, files, data) in OKAPI.items():
        dest = tmp_path / "okapi" / task
        dest.mkdir(parents=True)
        data_files = {s: str(home() / "task_data" / data / f"de_{s}.jsonl") for s in DATA[data]}
        for name in files:
            text = (src / folder / name).read_text(encoding="utf-8")
            if name == f"{task}.yaml":
                text = re.sub(r"^dataset_path: .*$", "dataset_path: json", text, flags=re.M)
                if "dataset_path" not in text:  # m_mmlu_de takes it from _default_yaml
                    text += "dataset_path: json\n"
                text = re.sub(r"^dataset_name: .*$", "dataset_kwargs: " + json.dumps({"data_files": data_files}),
                              text, flags=re.M)
                assert "dataset_path: json" in text and "dataset_kwargs" in text, name
            (dest / name).write_text(text, encoding="utf-8")
        out[task] = dest
    return out


def lm_eval_requests(folder: Path, task_name: str, num_fewshot: int | None) -> tuple[int, dict[int, tuple]]:
    """(n-shot lm-eval uses, {doc_id: (context, [continuations], gold)}) as lm-eval's evaluator builds them."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict([task_name], TaskManager(include_path=str(folder), include_defaults=False))[task_name]
    if num_fewshot is not None:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:  # what simple_evaluate does
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(rank=0, world_size=1)
    rows: dict[int, tuple] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        ctx, cont = inst.args
        gold = task.doc_to_target(inst.doc)
        if isinstance(gold, str):  # a letter: lm-eval scores it as the index among the choices
            gold = task.doc_to_choice(inst.doc).index(gold)
        prev = rows.get(inst.doc_id, (ctx, [], gold))
        assert prev[0] == ctx
        rows[inst.doc_id] = (ctx, [*prev[1], cont], prev[2])
    return int(task.get_config("num_fewshot")), rows


def ours(task_name: str, num_fewshot: int | None) -> tuple[int, dict[int, tuple]]:
    spec = load_task(task_name)
    k = num_fewshot if num_fewshot is not None else int(spec.config.get("num_fewshot") or 0)  # as run_tasks does
    docs = spec.docs()
    delim = spec.config.get("target_delimiter", " ")
    return k, {i: (ctx, [delim + c for c in spec.doc_to_choice(d)], spec.gold_index(d, spec.doc_to_choice(d)))
               for i, (d, ctx) in enumerate(zip(docs, spec.contexts(docs, k)))}


@pytest.mark.parametrize(("task", "shots"), [("arc_de", None), ("arc_de", 3), ("m_mmlu_de", None),
                                             ("m_mmlu_de", 5), ("hellaswag_de", None), ("hellaswag_de", 2),
                                             ("truthfulqa_de_mc1", None), ("truthfulqa_de_mc2", None)])
def test_bundled_task_renders_like_lm_evals_okapi_definition(okapi: dict[str, Path], task: str,
                                                              shots: int | None) -> None:
    k_theirs, theirs = lm_eval_requests(okapi[task], task, shots)
    k_ours, mine = ours(task, shots)
    assert k_ours == k_theirs == (shots or 0)  # m_mmlu_de, like every okapi task, is 0-shot by default
    assert len(mine) == len(theirs) == len(load_task(task).docs())
    for i in theirs:
        assert mine[i] == theirs[i], (task, i)
    if task == "arc_de":  # the row without an option_e key has four options, as lm-eval's None does
        assert len(mine[2][1]) == 4 and len(mine[1][1]) == 5
    if shots:  # few-shot examples really are in the prompt (from train for arc_de, as lm-eval takes them)
        assert mine[0][0].count("\n\n") >= shots
        if task == "arc_de":
            assert "Trainingsfrage" in mine[0][0] and "Validierung" not in mine[0][0]


def test_truthfulqa_mc2_reports_lm_evals_metric_name(okapi: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import math

    from lm_eval.tasks import TaskManager, get_task_dict

    from nanoforge.eval import tasks as T
    from nanoforge.eval.taskspec import BUNDLED

    theirs = get_task_dict(["truthfulqa_de_mc2"], TaskManager(include_path=str(okapi["truthfulqa_de_mc2"]),
                                                              include_defaults=False))["truthfulqa_de_mc2"]
    assert [m["metric"] for m in theirs.config.metric_list] == ["acc"]
    lls = [-1.0, -2.5, -0.5]
    expected = theirs.process_results(theirs.validation_docs()[0], [(ll, False) for ll in lls])["acc"]
    # the hook our YAML hands lm-eval, and our own scoring, give lm-eval's number under its name
    hook_spec = importlib.util.spec_from_file_location("truthfulqa_utils", BUNDLED / "truthfulqa_utils.py")
    hook = importlib.util.module_from_spec(hook_spec)
    hook_spec.loader.exec_module(hook)
    assert math.isclose(hook.process_results_mc2(TRUTHFUL[0], [(ll, False) for ll in lls])["acc"], expected)
    monkeypatch.setattr(T, "_score_docs", lambda model, docs_pairs, **kw: [lls for _ in docs_pairs])
    spec = load_task("truthfulqa_de_mc2")
    values = T.evaluate_multiple_choice(None, _tok(), spec, spec.docs(), spec.contexts(spec.docs(), 0))
    assert set(values) == {"acc", "mc2"} and values["acc"] == values["mc2"]
    assert all(math.isclose(v, expected) for v in values["acc"])


def _tok():
    from nanoforge.tokenizer import Tokenizer

    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, r"\S+|\s+", ["<|bos|>"])
