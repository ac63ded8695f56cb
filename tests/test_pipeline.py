"""End to end: `lmforge pipeline` with the micro recipe produces every artefact, and the report's
figures come from the run's own metric files. Then a re-run skips every stage (resume)."""

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
    for rel in ["data/index.json", "data/stats.json", "base/final/model.safetensors", "draft/final/model.safetensors",
                "sft/final/model.safetensors", "final/model.safetensors", "final/tokenizer.json",
                "quant/int8/model.safetensors", "quant/gptq-int4/model.safetensors", "eval/final/results.json",
                "generate/results.json", "report.md", "report.html", "loss_curves.png"]:
        assert (run / rel).is_file(), rel
    stamps = {p.stem for p in (run / ".stamps").glob("*.json")}
    assert stamps == {"data", "pretrain", "sft", "quantize", "eval", "generate", "report"}


def test_final_model_is_merged_and_quantized_ones_are_small(run):
    meta = json.loads((run / "final" / "lmforge_config.json").read_text())
    assert not [t for t in meta["transforms"] if t["kind"] == "peft"]  # LoRA folded into the weights
    sizes = {p: (run / p / "model.safetensors").stat().st_size for p in ["final", "quant/int8", "quant/gptq-int4"]}
    assert sizes["quant/gptq-int4"] < sizes["quant/int8"] < sizes["final"]


def test_report_figures_come_from_the_runs_files(run):
    report = (run / "report.md").read_text()
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert f"{stats['tokens']['train']['tokens']:,}" in report
    summary = next(json.loads(line)["summary"] for line in (run / "base" / "metrics.jsonl").read_text().splitlines()
                   if '"summary"' in line)
    assert f"final loss {summary['final_loss']:.4g}" in report
    results = json.loads((run / "eval" / "final" / "results.json").read_text())
    mc = next(t for t in results["tasks"] if t["name"] == "stdlib_docstring_mc")
    row = next(line for line in report.splitlines() if line.startswith("| final (sft, merged) |") and "KiB" not in line)
    assert f"{mc['metrics']['acc']:.4g}" in row
    gen = json.loads((run / "generate" / "results.json").read_text())
    spec = next(r for r in gen["rows"] if r["decoding"] == "speculative (draft model)")
    assert spec["identical_to_plain"] is True
    assert re.search(r"speculative \(draft model\) \| [0-9.]+ \| " + re.escape(f"{spec['acceptance_rate']:.4g}"), report)
    assert "not available" not in report


def test_rerun_skips_finished_stages(run, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lmforge"):
        assert main(["pipeline", "--recipe", "pipeline-micro", "--runs-dir", str(run.parent), "--only", "report"]) == 0
        assert main(["pipeline", "--recipe", "pipeline-micro", "--runs-dir", str(run.parent)]) == 0
    skipped = [r.getMessage() for r in caplog.records if "up to date, skipped" in r.getMessage()]
    assert len(skipped) == 7


def test_bad_recipe_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["pipeline", "--recipe", str(bad), "--runs-dir", str(tmp_path)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
