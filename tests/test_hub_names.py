"""A hub name where a model folder is expected resolves through the local huggingface_hub cache,
offline: a tiny model is written into a temporary cache in the hub's layout (refs/main -> a
snapshot folder) and found there by `load_model` and by the CLI (HF_HOME set, HF_HUB_OFFLINE=1)."""

import os
import subprocess
import sys

import pytest
import torch

from lmforge.checkpoint import load_model, load_tokenizer_if_any
from lmforge.common import LmforgeError
from lmforge.model.hub import resolve_model_path

huggingface_hub = pytest.importorskip("huggingface_hub")
transformers = pytest.importorskip("transformers")

REPO, COMMIT = "tiny-org/tiny-qwen3", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME with hub/models--tiny-org--tiny-qwen3/{refs/main, snapshots/COMMIT/...} (what
    `hf download` leaves, minus the blob symlinks, which the cache does not require)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home, model


@pytest.fixture
def cache(hf_home, monkeypatch):
    home, model = hf_home
    # huggingface_hub reads HF_HOME when imported (transformers imported it already): point its
    # constant at the temporary cache too; the CLI test below sets only the environment.
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    return home, model


def test_load_model_by_hub_name(cache):
    _, hf = cache
    assert resolve_model_path(REPO).name == COMMIT
    assert resolve_model_path(f"{REPO}@main").name == COMMIT
    ours = load_model(REPO)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    assert load_tokenizer_if_any(REPO) is None  # resolved too: the snapshot has no tokenizer.json


def test_a_folder_wins_over_a_hub_name(cache, tmp_path, monkeypatch):
    _, hf = cache
    local = tmp_path / REPO
    hf.save_pretrained(local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(REPO) == type(local)(REPO)  # the relative folder, not the cache


def test_unknown_name_is_a_clear_error(cache):
    with pytest.raises(
        LmforgeError, match=r"not a folder, nor a model in the Hugging Face cache.*hf download other/model"
    ):
        load_model("other/model")
    with pytest.raises(LmforgeError, match="model path not found: /no/such/folder$"):
        load_model("/no/such/folder")  # an absolute path is never a hub name


def _greedy(hf, prompt: list[int], n: int) -> list[int]:
    config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()


def test_cli_generate_with_a_hub_name(cache, capsys):
    from lmforge.cli import main

    _, hf = cache
    assert main(["generate", "--model", REPO, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, _greedy(hf, [1, 2, 3], 4)))


@pytest.mark.slow  # a fresh interpreter: ~10-15 s on 2 busy cores, for what the test above checks in-process
def test_cli_in_a_fresh_process_reads_hf_home(hf_home):
    """A fresh process finds the cache from HF_HOME alone (huggingface_hub reads it at import)."""
    home, hf = hf_home
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["generate", "--model", REPO, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    out = subprocess.run([sys.executable, "-m", "lmforge", *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ",".join(map(str, _greedy(hf, [1, 2, 3], 4)))


def test_cli_unknown_hub_name(cache, capsys):
    from lmforge.cli import main

    assert main(["generate", "--model", "nobody/nothing", "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err
    assert "nobody/nothing is not a folder, nor a model in the Hugging Face cache" in err and "Traceback" not in err
