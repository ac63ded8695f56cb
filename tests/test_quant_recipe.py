"""`lmforge quantize`: calibration windows from packed shards or a text file, the command end to
end, and its errors (exit 2, nothing written)."""

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.cli import main as cli
from lmforge.common import LmforgeError
from lmforge.data.shards import ShardWriter, write_index
from lmforge.model import build_model
from lmforge.recipes.quantize import calibration_batches


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    writer = ShardWriter(out, "train", vocab_size=512, eos_id=0, shard_tokens=3000)
    for _ in range(10):
        writer.add(rng.integers(1, 512, 700))
    write_index(out, {"train": writer.close()}, vocab_size=512, eos_id=0)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(build_model("tiny").eval(), tmp_path_factory.mktemp("ckpt") / "fp")


def test_calibration_windows_from_packed_shards(shards):
    batches = calibration_batches(str(shards), None, samples=8, seq_len=64)
    assert len(batches) == 8 and all(b.shape == (1, 64) and b.dtype == torch.long for b in batches)
    tokens = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in sorted(shards.glob("train-*.bin"))])
    assert batches[0][0].tolist() == tokens[:64].tolist()  # windows are real slices of the shards
    assert len(calibration_batches(str(shards), None, samples=1000, seq_len=64)) == len(tokens) // 64


def test_calibration_errors_name_the_source(shards, tmp_path):
    with pytest.raises(LmforgeError, match="no split 'validation'"):
        calibration_batches(str(shards), None, 4, 64, split="validation")
    text = tmp_path / "calib.txt"
    text.write_text("hello world")
    with pytest.raises(LmforgeError, match="is text but the model has no tokenizer.json"):
        calibration_batches(str(text), None, 4, 64)
    with pytest.raises(LmforgeError, match="fewer than one window of --seq-len 100000"):
        calibration_batches(str(shards), None, 4, 100_000)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_command_end_to_end(ckpt, shards, tmp_path, capsys, method):
    out = tmp_path / method
    rc = cli(
        [
            "quantize",
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--method",
            method,
            "--scheme",
            "int4-g32",
            "--calib",
            str(shards),
            "--calib-samples",
            "8",
            "--seq-len",
            "64",
        ]
    )
    assert rc == 0 and '"size_after"' in capsys.readouterr().out
    model = load_model(out)
    assert model.lmforge_transforms[0]["method"] == method
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "IntNLinear"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_quantize_command_errors_exit_2_and_write_nothing(ckpt, shards, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli(["quantize", "--model", str(ckpt), "--out", str(out), "--method", "awq"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert (
        cli(
            [
                "quantize",
                "--model",
                str(ckpt),
                "--out",
                str(out),
                "--method",
                "gptq",
                "--calib",
                str(shards),
                "--calib-samples",
                "2",
                "--seq-len",
                "64",
            ]
        )
        == 2
    )
    assert "128 calibration tokens, need at least 512" in capsys.readouterr().err
    assert cli(["quantize", "--model", str(ckpt), "--out", str(out), "--scheme", "int5"]) == 2
    assert "unknown quantization scheme 'int5'" in capsys.readouterr().err
    assert not out.exists()
