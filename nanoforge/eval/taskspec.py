"""lm-eval-style task files: YAML (task, dataset_path: json, dataset_kwargs.data_files, test_split,
doc_to_text, doc_to_target, doc_to_choice, target_delimiter, output_type, metric_list, generation_kwargs,
filter_list) with Jinja2 templates, read the way lm-evaluation-harness reads them so one file runs in both.

    spec = load_task("nanoforge/eval/tasks/demo_mc.yaml")    # or a bundled name: load_task("demo_mc")
    docs = spec.docs()

Errors name the file, the line and the field. Python hooks (`!function`) are refused: our evaluator runs
templates only (Jinja2, with lm-eval's `regex_replace` filter).
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanoforge.errors import UserError
from nanoforge.home import home

BUNDLED = Path(__file__).parent / "tasks"
OUTPUT_TYPES = ("multiple_choice", "generate_until")


class TaskError(UserError):
    """A task file or its data is wrong; the message names the file, line and field."""


class _Function:
    def __init__(self, name: str) -> None:
        self.name = name


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))

# lm-eval hooks that nanoforge implements itself (the hook file ships beside the bundled YAMLs for lm-eval).
KNOWN_HOOKS = {"process_results": "truthfulqa_utils.process_results_mc2"}
HOOK_FILES = {"truthfulqa_utils.process_results_mc2": "truthfulqa_utils.py"}


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda dumper, f: dumper.represent_scalar("!function", f.name))


def _env() -> Any:
    from jinja2 import BaseLoader, Environment, StrictUndefined

    env = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


_ENV = None


def render(template: str, doc: dict[str, Any]) -> str:
    global _ENV
    if _ENV is None:
        _ENV = _env()
    return _ENV.from_string(template).render(**doc)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int], int]:
    """(mapping, line of each top-level key, last line) of a YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"task file {path} does not exist") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise TaskError(f"{path}: {line}invalid YAML ({getattr(e, 'problem', e)})") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise TaskError(f"{path}: line 1: a task file must be a YAML mapping (task: ..., doc_to_text: ...)")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return data, lines, node.end_mark.line + 1


@dataclass
class TaskSpec:
    name: str
    path: Path
    config: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)
    _docs: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def where(self, key: str) -> str:
        return f"{self.path}: line {self.lines.get(key, self.lines.get('task', 1))}"

    @property
    def output_type(self) -> str:
        return self.config.get("output_type", "generate_until")

    @property
    def metrics(self) -> list[str]:
        ml = self.config.get("metric_list")
        if not ml:
            return ["acc", "acc_norm"] if self.output_type == "multiple_choice" else ["exact_match"]
        return [m["metric"] if isinstance(m, dict) else str(m) for m in ml]

    def metric_args(self, metric: str) -> dict[str, Any]:
        for m in self.config.get("metric_list") or []:
            if isinstance(m, dict) and m.get("metric") == metric:
                return {k: v for k, v in m.items() if k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
        return {}

    # ---- data -------------------------------------------------------------------------------------
    def _data_files(self) -> dict[str, list[Path]]:
        files = (self.config.get("dataset_kwargs") or {}).get("data_files")
        if files is None:
            raise TaskError(f"{self.where('dataset_kwargs')}: task {self.name!r} is missing the field "
                            f"dataset_kwargs.data_files (the JSON/JSONL file(s) with the documents)")
        if isinstance(files, (str, list)):
            files = {"train": files}  # as datasets.load_dataset("json", data_files=...) names it
        out = {}
        for split, fs in files.items():
            fs = [fs] if isinstance(fs, str) else list(fs)
            out[split] = [(self.path.parent / os.path.expanduser(f.replace("{home}", str(home())))).resolve()
                          for f in fs]
        return out

    def docs(self, split: str | None = None) -> list[dict[str, Any]]:
        """Documents of `split` (default: test_split, else validation_split)."""
        split = split or self.eval_split
        if split not in self._docs:
            files = self._data_files()
            if split not in files:
                raise TaskError(f"{self.where('dataset_kwargs')}: task {self.name!r} has no split {split!r} in "
                                f"data_files (it has: {', '.join(files)}); a single file is the split 'train'")
            docs: list[dict[str, Any]] = []
            for f in files[split]:
                docs.extend(_read_json_docs(f, self.where("dataset_kwargs")))
            self._docs[split] = docs
        return self._docs[split]

    @property
    def eval_split(self) -> str:
        split = self.config.get("test_split") or self.config.get("validation_split")
        if not split:
            raise TaskError(f"{self.where('task')}: task {self.name!r} is missing the field test_split")
        return split

    # ---- templates (lm-eval's rules) -------------------------------------------------------------
    def _field(self, key: str, doc: dict[str, Any]) -> Any:
        spec = self.config.get(key)
        if isinstance(spec, (int, list)):
            return spec
        if isinstance(spec, dict):
            return list(spec.values())
        if not isinstance(spec, str):
            raise TaskError(f"{self.where(key)}: field {key} must be a string, number or list")
        if spec in doc:
            return doc[spec]
        try:
            return render(spec, doc)
        except Exception as e:  # noqa: BLE001 - any template error is the task file's fault
            raise TaskError(f"{self.where(key)}: field {key}: template failed on a document "
                            f"({type(e).__name__}: {e})") from None

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return str(self._field("doc_to_text", doc))

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        spec = self.config.get("doc_to_choice")
        value = self._field("doc_to_choice", doc)
        if isinstance(spec, str) and spec not in doc and isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise TaskError(f"{self.where('doc_to_choice')}: doc_to_choice must render a Python list, "
                                f"got {value[:60]!r}") from None
        if not isinstance(value, (list, tuple)) or not value:
            raise TaskError(f"{self.where('doc_to_choice')}: doc_to_choice gave {value!r} for a document; it must "
                            f"be a non-empty list of choices")
        return [str(c) for c in value]

    def doc_to_target(self, doc: dict[str, Any]) -> Any:
        spec = self.config.get("doc_to_target")
        value = self._field("doc_to_target", doc)
        if isinstance(spec, str) and spec not in doc and isinstance(value, str):
            if value.isdigit() and self.config.get("doc_to_choice") is not None:
                return ast.literal_eval(value)
            if len(value) >= 2 and value[0] == "[" and value[-1] == "]":
                try:
                    return ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    return value
        return value

    def gold_index(self, doc: dict[str, Any], choices: list[str]) -> int | list[int]:
        target = self.doc_to_target(doc)
        if isinstance(target, str):
            if target not in choices:
                raise TaskError(f"{self.where('doc_to_target')}: target {target!r} is not one of the choices")
            return choices.index(target)
        golds = target if isinstance(target, list) else [target]
        for g in golds:
            if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < len(choices):
                raise TaskError(f"{self.where('doc_to_target')}: target {g!r} is not the index of one of the "
                                f"{len(choices)} choices {choices!r}")
        return target

    def target_string(self, doc: dict[str, Any]) -> str:
        target = self.doc_to_target(doc)
        if self.output_type == "multiple_choice" and isinstance(target, int):
            return self.doc_to_choice(doc)[target]
        if isinstance(target, list):
            target = target[0]
        return str(target)

    # ---- prompts ----------------------------------------------------------------------------------
    def contexts(self, docs: list[dict[str, Any]], num_fewshot: int) -> list[str]:
        """Prompt of each doc: description + k examples (drawn with lm-eval's seed 1234) + doc_to_text."""
        description = self.config.get("description") or ""
        if num_fewshot <= 0:
            return [description + self.doc_to_text(d) for d in docs]
        fs_split = next((self.config.get(k) for k in ("fewshot_split", "training_split", "validation_split")
                         if self.config.get(k) and k in self.config and self.config.get(k) in self._data_files()),
                        self.eval_split)
        pool = self.docs(fs_split)
        rnd = random.Random(1234)
        delim = self.config.get("fewshot_delimiter", "\n\n")
        tdelim = self.config.get("target_delimiter", " ")
        first_n = (self.config.get("fewshot_config") or {}).get("sampler") == "first_n"
        out = []
        for d in docs:
            if first_n:
                shots = pool[:num_fewshot]
            else:
                shots = rnd.sample(pool, min(len(pool), num_fewshot + (fs_split == self.eval_split)))
                shots = [s for s in shots if s is not d][:num_fewshot]
            prefix = delim.join(self.doc_to_text(s) + tdelim + self.target_string(s) for s in shots)
            out.append(description + prefix + delim + self.doc_to_text(d))
        return out


def _read_json_docs(path: Path, where: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise TaskError(f"{where}: data file {path} does not exist (point data_files at your download)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"data file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lineno = 0
    try:
        if text.lstrip().startswith(("[", "{")) and not path.suffix == ".jsonl":
            docs = json.loads(text)
        else:
            docs = []
            for lineno, line in enumerate(text.splitlines(), 1):  # noqa: B007 - read by the except
                if line.strip():
                    docs.append(json.loads(line))
    except json.JSONDecodeError as e:  # per line, its position is within the line
        line = lineno or e.lineno
        raise TaskError(f"data file {path}: line {line}: not valid JSON/JSONL ({e.msg})") from None
    if isinstance(docs, dict) and "data" in docs:
        docs = docs["data"]
    if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
        raise TaskError(f"data file {path}: expected JSON objects (one per line, or a list of them)")
    if not docs:
        raise TaskError(f"{where}: data file {path} holds no documents")
    return docs


REQUIRED = ("task", "dataset_path", "doc_to_text", "doc_to_target")


def load_task(name_or_path: str | os.PathLike) -> TaskSpec:
    """A task from a YAML path or a bundled task name (see `list_tasks`). Validates required fields."""
    p = Path(name_or_path).expanduser()
    if not p.suffix and not p.exists():
        bundled = {t["task"]: t["path"] for t in list_tasks()}
        if str(name_or_path) not in bundled:
            raise TaskError(f"unknown task {name_or_path!r}: give a YAML file or one of {', '.join(sorted(bundled))}")
        p = Path(bundled[str(name_or_path)])
    config, lines, last = _read_yaml(p)
    include = config.pop("include", None)
    if include:
        base, base_lines, _ = _read_yaml((p.parent / include).resolve())
        config = {**base, **config}
        lines = {**{k: lines.get("include", 1) for k in base_lines}, **lines}
    for key, value in config.items():
        if isinstance(value, _Function) and KNOWN_HOOKS.get(key) != value.name:
            raise TaskError(f"{p}: line {lines.get(key, 1)}: field {key} uses a Python hook (!function "
                            f"{value.name}); nanoforge runs template-only tasks: write it as a Jinja2 template")
    name = config.get("task")
    for key in REQUIRED:
        if config.get(key) is None:
            raise TaskError(f"{p}: line {lines.get(key, last)}: task {name or p.stem!r} is missing the field {key}")
    if config["dataset_path"] != "json":
        raise TaskError(f"{p}: line {lines['dataset_path']}: dataset_path must be json (local files; got "
                        f"{config['dataset_path']!r}): nothing is downloaded at run time")
    out_type = config.get("output_type", "generate_until")
    if out_type not in OUTPUT_TYPES:
        raise TaskError(f"{p}: line {lines.get('output_type', last)}: output_type {out_type!r} is not supported "
                        f"(supported: {', '.join(OUTPUT_TYPES)})")
    if out_type == "multiple_choice" and config.get("doc_to_choice") is None:
        raise TaskError(f"{p}: line {last}: task {name!r} is missing the field doc_to_choice "
                        f"(needed for output_type: multiple_choice)")
    spec = TaskSpec(name=str(name), path=p.resolve(), config=config, lines=lines)
    _check_spec(spec)
    return spec


METRICS = {"multiple_choice": ("acc", "acc_norm", "mc2"), "generate_until": ("exact_match",)}


def _check_spec(spec: TaskSpec) -> None:
    """What lm-eval would only find out mid-run (or not at all): unknown metrics, stop strings that are not
    strings, regular expressions that do not compile."""
    supported = METRICS[spec.output_type]
    for m in spec.metrics:
        if m not in supported:
            raise TaskError(f"{spec.where('metric_list')}: metric {m!r} is not supported for {spec.output_type} "
                            f"(supported: {', '.join(supported)})")
    gk = spec.config.get("generation_kwargs") or {}
    if not isinstance(gk, dict):
        raise TaskError(f"{spec.where('generation_kwargs')}: generation_kwargs must be a mapping")
    until = gk.get("until")
    if until is not None and not (isinstance(until, str) or
                                  (isinstance(until, list) and all(isinstance(u, str) and u for u in until))):
        raise TaskError(f"{spec.where('generation_kwargs')}: generation_kwargs.until must be a string or a list "
                        f"of non-empty strings, got {until!r}")
    max_gen = gk.get("max_gen_toks", 256)
    if isinstance(max_gen, bool) or not isinstance(max_gen, int) or max_gen < 1:
        raise TaskError(f"{spec.where('generation_kwargs')}: generation_kwargs.max_gen_toks must be a positive "
                        f"integer, got {max_gen!r}")
    filters = spec.config.get("filter_list") or []
    if not isinstance(filters, list):
        raise TaskError(f"{spec.where('filter_list')}: filter_list must be a list")
    for f in filters:
        steps = f.get("filter", []) if isinstance(f, dict) else None
        if not isinstance(f, dict) or "name" not in f or not isinstance(steps, list):
            raise TaskError(f"{spec.where('filter_list')}: each filter_list entry needs a name and a filter list")
        for step in steps:
            pattern = step.get("regex_pattern") if isinstance(step, dict) else None
            if pattern is not None:
                try:
                    re.compile(str(pattern))
                except re.error as e:
                    raise TaskError(f"{spec.where('filter_list')}: regex_pattern {pattern!r} of filter "
                                    f"{f['name']!r} is not a valid regular expression ({e})") from None
    for entry in spec.config.get("metric_list") or []:
        for r in (entry.get("regexes_to_ignore") or []) if isinstance(entry, dict) else []:
            try:
                re.compile(str(r))
            except re.error as e:
                raise TaskError(f"{spec.where('metric_list')}: regexes_to_ignore {r!r} is not a valid regular "
                                f"expression ({e})") from None


def list_tasks() -> list[dict[str, Any]]:
    """Bundled tasks: name, path, output type, description (the first comment line of the file)."""
    rows = []
    for f in sorted(BUNDLED.glob("*.yaml")):
        data, _, _ = _read_yaml(f)
        if "task" not in data:
            continue
        first = f.read_text(encoding="utf-8").splitlines()[0]
        rows.append({"task": data["task"], "path": str(f), "output_type": data.get("output_type", "generate_until"),
                     "about": first.lstrip("# ").strip() if first.startswith("#") else ""})
    return rows


def lm_eval_yaml(spec: TaskSpec, folder: str | os.PathLike) -> Path:
    """Write `spec` into `folder` with absolute data_files (lm-eval's --include_path wants those); the
    folder can then be passed to lm-eval as `--include_path`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(spec.config)
    cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}),
                             "data_files": {k: [str(f) for f in v] for k, v in spec._data_files().items()}}
    for value in cfg.values():  # a hook lm-eval imports from the YAML's folder travels with it
        if isinstance(value, _Function) and value.name in HOOK_FILES:
            hook = Path(__file__).resolve().parent / "tasks" / HOOK_FILES[value.name]
            (folder / hook.name).write_bytes(hook.read_bytes())
    out = folder / f"{spec.name}.yaml"
    out.write_text(yaml.dump(cfg, Dumper=_Dumper, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return out
