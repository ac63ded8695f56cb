"""lm-evaluation-harness backend: the "lmforge" model type gives the same accuracy through lm-eval as
`lmforge eval` on the same local JSONL and model."""

import json
import math
import os
import re

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lmforge[eval]')")

from test_eval_common import tiny_lm  # noqa: E402

from lmforge.eval.tasks import TaskConfig, run_multiple_choice  # noqa: E402

ROWS = [
    {"context": f"def f{i}(x):\n    return x", "choices": [" + 1", " * 2", " - 3", " // 4"], "gold": i % 4}
    for i in range(12)
]

TASK_YAML = """task: lmforge_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
"""

ROLLING_YAML = """task: lmforge_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def test_harness_accuracy_equals_lmforge_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import lmforge.eval.harness  # noqa: F401  registers "lmforge"

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "import os\nprint(os.getcwd())\n"}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(TASK_YAML.format(path=data))
    (tasks / "ppl.yaml").write_text(ROLLING_YAML.format(path=texts))

    lm = tiny_lm()
    ours = run_multiple_choice(lm, TaskConfig("mc", "multiple_choice", path=str(data), target_delimiter=""))
    harness_lm = get_model("lmforge")(lm=lm)
    out = lm_eval.simple_evaluate(
        model=harness_lm,
        tasks=["lmforge_local_mc", "lmforge_local_ppl"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
    )
    res = out["results"]["lmforge_local_mc"]
    assert res["acc,none"] == pytest.approx(ours.metrics["acc"])
    assert res["acc_norm,none"] == pytest.approx(ours.metrics["acc_norm"])
    # Rolling log-likelihood: word perplexity = exp(-loglik / words), words counted as lm-eval does.
    text = "import os\nprint(os.getcwd())\n"
    words = len(re.split(r"\s+", text))
    expected = pytest.approx(math.exp(-lm.loglikelihood_rolling([text])[0] / words), rel=1e-4)
    assert out["results"]["lmforge_local_ppl"]["word_perplexity,none"] == expected
    assert 0.0 <= ours.metrics["acc"] <= 1.0 and os.path.isdir(tmp_path / "hf-cache")


def test_generate_until_honours_stop_strings():
    import lmforge.eval.harness as h

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = tiny_lm()
    outs = h.LmforgeHarnessLM(lm=lm).generate_until([Req("def f(x):", {"until": ["\n"], "max_gen_toks": 8})])
    assert len(outs) == 1 and "\n" not in outs[0]


def test_chat_template_comes_from_the_checkpoint():
    import lmforge.eval.harness as h

    lm = tiny_lm()
    harness_lm = h.LmforgeHarnessLM(lm=lm)
    messages = [{"role": "user", "content": "hi"}]
    assert harness_lm.apply_chat_template(messages) == lm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert "<|im_start|>" in harness_lm.chat_template() and harness_lm.tokenizer_name == "tiny"


@pytest.mark.slow
def test_lm_eval_cli_with_the_lmforge_model_type(tmp_path):
    """`python -m lmforge.eval.harness run --model lmforge ...` end to end in a subprocess."""
    import subprocess
    import sys

    from lmforge.checkpoint import save_model

    lm = tiny_lm()
    save_model(lm.model, tmp_path / "m", tokenizer=lm.tokenizer)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK_YAML.format(path=data))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.eval.harness",
            "run",
            "--model",
            "lmforge",
            "--model_args",
            f"pretrained={tmp_path / 'm'}",
            "--tasks",
            "lmforge_local_mc",
            "--include_path",
            str(tmp_path / "tasks"),
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ours = run_multiple_choice(lm, TaskConfig("mc", "multiple_choice", path=str(data), target_delimiter=""))
    [results] = list((tmp_path / "out").rglob("results_*.json"))
    assert json.loads(results.read_text())["results"]["lmforge_local_mc"]["acc,none"] == pytest.approx(
        ours.metrics["acc"]
    )
