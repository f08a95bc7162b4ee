"""The chat speedrun on the `ci` preset: base → SFT → RL → chat eval → export with the chat template →
a report that opens with its results, on the offline default data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from nanoforge import home
from nanoforge.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_ci_chat_speedrun_trains_sft_and_rl_and_reports_them(capsys: pytest.CaptureFixture) -> None:
    args = ["speedrun", "--preset", "ci", "--until", "rl", "--run", "chat"]
    assert main(args) == 0
    err = capsys.readouterr().err
    run_dir = home.run_dir("chat")
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    assert list(stages) == ["data", "tokenizer", "tokenizer_eval", "tokenize", "pretrain", "eval", "sft", "rl",
                            "chat_eval", "export", "report"]
    sft, rl = stages["sft"]["result"], stages["rl"]["result"]
    assert Path(sft["checkpoint_dir"]).parent.name == "sft" and Path(rl["checkpoint_dir"]).parent.name == "rl"
    assert rl["step"] == 4 and 0 <= rl["pass@1"] <= 1 and "pass@1_start" in rl

    # the log ends with the two commands to try the model, on the RL checkpoint
    tail = err.strip().splitlines()[-3:]
    assert tail[-2].strip() == f"nanoforge chat {rl['checkpoint_dir']}"
    assert tail[-1].strip() == f"nanoforge serve {rl['checkpoint_dir']}"

    # the export is the RL model's and carries the chat template
    export = Path(stages["export"]["result"]["export"])
    assert stages["export"]["result"]["checkpoint"] == rl["checkpoint_dir"]
    template = export / "chat_template.jinja"
    config = json.loads((export / "tokenizer_config.json").read_text()) if (export / "tokenizer_config.json").exists() else {}
    assert template.is_file() or "chat_template" in config

    report = (run_dir / "report.md").read_text()
    heads = [line for line in report.splitlines() if line.startswith("## ")]
    assert heads[:3] == ["## Headline", "## Try it", "## Curves"]
    assert report.index("## Chat") < report.index("<details>") < report.index("## Configuration")
    for png in ("loss.png", "val_bpb.png", "sft_loss.png", "rl_reward.png", "rl_pass1.png"):
        assert f"(plots/{png})" in report and (run_dir / "plots" / png).stat().st_size > 1000
    table = report[report.index("## Chat"):].splitlines()
    header = next(line for line in table if line.startswith("| task"))
    assert header == "| task | base | SFT | RL |"
    rows = [line for line in table if line.startswith("| arithmetic_chat exact_match")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 6
    assert "### Sample conversations" in report and report.count("**assistant (RL):**") == 3
    assert "RL: held-out arithmetic pass@1, before → after" in report

    html = (run_dir / "report.html").read_text()
    assert html.index("<h2>Headline</h2>") < html.index("<img") < html.index("<details>")
    assert re.search(r"<details><summary>[^<]+</summary>\s*<h2>Hardware and software</h2>", html)
    # pretraining loss and bpb, SFT loss and held-out loss, RL reward, pass@1 and pass@2
    assert html.count("data:image/png;base64,") == 7

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["chat_eval"]) == {"base", "sft", "rl"}
    assert len(summary["rl_reward_curve"]) == 4
    assert summary["try_commands"][:2] == [tail[-2].strip(), tail[-1].strip()]
    assert all(math.isfinite(v) for v in summary["chat_eval"]["rl"].values())

    # again: everything is up to date; --until sft on the same run reuses base and SFT
    assert main(args) == 0
    again = json.loads((run_dir / "stages.json").read_text())["stages"]
    assert [n for n, s in again.items() if not s["skipped"]] == ["report"]
    assert main(["speedrun", "--preset", "ci", "--until", "sft", "--run", "chat-sft"]) == 0
    sft_only = json.loads((home.run_dir("chat-sft") / "stages.json").read_text())["stages"]
    assert "rl" not in sft_only and all(sft_only[n]["skipped"] for n in ("pretrain", "sft"))
    assert not sft_only["chat_eval"]["skipped"] and sft_only["export"]["result"]["checkpoint"] == sft["checkpoint_dir"]
