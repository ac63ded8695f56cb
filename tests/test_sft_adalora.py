"""`lmforge sft --method adalora` runs AdaLoRA's schedule: orthogonality regulariser in the loss and
rank pruning to the target budget, with the final ranks reported."""

import json

from lmforge.cli import main


def test_adalora_prunes_to_the_target_budget(tmp_path):
    rc = main(
        [
            "sft",
            "--method",
            "adalora",
            "--steps",
            "12",
            "--out",
            str(tmp_path),
            "--name",
            "ada",
            "--set",
            "train.eval_every=0",
            "--set",
            "data.max_bytes=300000",
            "--set",
            "peft.options.init_r=12",
            "--set",
            "peft.options.target_r=4",
            "--set",
            "peft.options.tinit=2",
            "--set",
            "peft.options.tfinal=2",
            "--set",
            "peft.options.delta_t=2",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "ada" / "metrics.jsonl").read_text().splitlines()]
    ranks = next(r for r in rows if "adalora_final_ranks" in r)
    modules = len(ranks["adalora_final_ranks"])
    assert modules > 0 and ranks["adalora_total_rank"] == 4 * modules
    assert len(set(ranks["adalora_final_ranks"].values())) > 1  # the budget is re-allocated, not uniform
