"""End to end: `lmforge pipeline` with the micro recipe produces every artefact, the report's
figures come from the run's own metric files, fine-tuning beats the base model on its task, and the
evaluation set shares no document with anything trained on. Then a re-run skips every stage."""

import json
import re

import pytest

from lmforge.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["pipeline", "--recipe", "pipeline-micro", "--runs-dir", str(root)]) == 0
    return root / "pipeline-micro"


def test_every_artefact_exists(run):
    for rel in [
        "data/index.json",
        "data/stats.json",
        "base/final/model.safetensors",
        "draft/final/model.safetensors",
        "sft/final/model.safetensors",
        "final/model.safetensors",
        "final/tokenizer.json",
        "quant/int8/model.safetensors",
        "quant/q8_0/model.safetensors",
        "quant/gptq-int4/model.safetensors",
        "eval/final/results.json",
        "generate/results.json",
        "report.md",
        "report.html",
        "loss_pretrain.png",
        "loss_sft.png",
        "sft/train_data.jsonl",
    ]:
        assert (run / rel).is_file(), rel
    stamps = {p.stem for p in (run / ".stamps").glob("*.json")}
    assert stamps == {"data", "pretrain", "sft", "draft", "quantize", "eval", "generate", "report"}


def test_final_model_is_merged_and_quantized_ones_are_small(run):
    meta = json.loads((run / "final" / "lmforge_config.json").read_text())
    assert not [t for t in meta["transforms"] if t["kind"] == "peft"]  # LoRA folded into the weights
    names = ["final", "quant/int8", "quant/q8_0", "quant/gptq-int4"]
    sizes = {p: (run / p / "model.safetensors").stat().st_size for p in names}
    assert sizes["quant/gptq-int4"] < sizes["quant/int8"] < sizes["final"]
    assert sizes["quant/q8_0"] < sizes["final"]


def test_report_figures_come_from_the_runs_files(run):
    report = (run / "report.md").read_text()
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert f"{stats['tokens']['train']['tokens']:,}" in report
    summary = next(
        json.loads(line)["summary"]
        for line in (run / "base" / "metrics.jsonl").read_text().splitlines()
        if '"summary"' in line
    )
    assert f"final loss {summary['final_loss']:.4g}" in report
    results = json.loads((run / "eval" / "final" / "results.json").read_text())
    mc = next(t for t in results["tasks"] if t["name"] == "stdlib_docstring_mc")
    row = next(line for line in report.splitlines() if line.startswith("| final (sft, merged) |") and "KiB" not in line)
    assert f"{mc['metrics']['acc_mutual_info']:.4g}" in row
    gen = json.loads((run / "generate" / "results.json").read_text())
    spec = next(r for r in gen["rows"] if r["decoding"] == "speculative (draft model)")
    assert spec["identical_to_plain"] is True
    assert re.search(
        r"speculative \(draft model\) \| [0-9.,]+ \| [0-9.]+ \| " + re.escape(f"{spec['acceptance_rate']:.4g}"), report
    )
    assert "not available" not in report


def test_rerun_skips_finished_stages(run, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lmforge"):
        assert main(["pipeline", "--recipe", "pipeline-micro", "--runs-dir", str(run.parent), "--only", "report"]) == 0
        assert main(["pipeline", "--recipe", "pipeline-micro", "--runs-dir", str(run.parent)]) == 0
    skipped = [r.getMessage() for r in caplog.records if "up to date, skipped" in r.getMessage()]
    assert len(skipped) == 8


def test_sft_beats_base_on_its_task(run):
    """On the SFT validation modules (held out of SFT training), asked in the chat format it trains,
    the fine-tuned model's loss is below the base model's (step 0 is the base itself), and what the
    pipeline ships is the best of those evaluations."""
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert rows[0]["step"] == 0 and val[0] == rows[0]["val_loss"]
    assert min(val[1:]) < val[0]
    summary = next(r["summary"] for r in rows if "summary" in r)
    assert summary["best_val_loss"] == min(val)
    assert (run / "sft" / "best" / "model.safetensors").is_file()


def test_eval_split_shares_nothing_with_training(run):
    import sysconfig
    from pathlib import Path

    from lmforge.eval.builtin import BuiltinConfig, held_out

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids = [
        json.loads(line)["id"].split("#")[0] for line in (run / "data" / "train_docs.jsonl").read_text().splitlines()
    ]
    trained = {
        Path(i).resolve() if Path(i).is_absolute() else (stdlib / i.removeprefix("stdlib/")).resolve() for i in ids
    }
    cfg = json.loads((run / "eval" / "final" / "results.json").read_text())["tasks"][0]["config"]["builtin"]
    held = {path.resolve() for _, path in held_out(BuiltinConfig(**cfg))}
    assert held and trained and not held & trained
    sft = (run / "sft" / "train_data.jsonl").read_text()
    results = json.loads((run / "eval" / "final" / "results.json").read_text())
    doc = next(t for t in results["tasks"] if t["name"] == "stdlib_docstring")
    for example in doc["examples"]:  # the held-out functions' signatures never appear in the SFT set
        assert json.dumps(example["input"].split("<|im_start|>user\n")[-1].split("<|im_end|>")[0])[1:-1] not in sft
        assert example.get("contamination", {}).get("contaminated", False) is False


def test_bad_recipe_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["pipeline", "--recipe", str(bad), "--runs-dir", str(tmp_path)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_draft_proposes_from_the_frequent_tokens(run):
    """The micro recipe's draft head scores the 256 most frequent ids (generate.draft_vocab); the row
    with the whole vocabulary is measured beside it, and both give plain decoding's tokens."""
    gen = json.loads((run / "generate" / "results.json").read_text())
    assert gen["draft_vocab"]["tokens"] == 256 and gen["draft_vocab"]["of"] == 512
    assert 0.5 < gen["draft_vocab"]["coverage"] <= 1.0
    rows = {r["decoding"]: r for r in gen["rows"] if r["decoding"].startswith("speculative")}
    assert set(rows) == {"speculative (draft model)", "speculative (draft model), whole vocabulary"}
    assert all(r["identical_to_plain"] for r in rows.values())
    assert "256 most frequent of the 512 token ids" in (run / "report.md").read_text()
