"""Faithful Hugging Face exports, each loaded back by transformers: generation_config.json with every
end-of-turn id (ChatML's <|im_end|>) and the sampling defaults of an imported model, the real dtype,
PEFT-format adapters written by `lmforge sft`, and quantized models in the compressed-tensors layout."""

import json

import pytest
import torch

from lmforge.checkpoint import load_model, save_hf, save_model
from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

TEXTS = ["hello world, this is a test of the tokenizer. ", "def f(x):\n    return x + 1\n"] * 30
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=300)


def make(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SHAPE, "num_key_value_heads": 2, **overrides})).eval()


def hf_logits(folder, x, **kwargs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    with torch.no_grad():
        return hf(x).logits, hf


def test_generation_config_lists_the_end_of_turn_ids(tmp_path, tokenizer):
    save_hf(make(), tmp_path / "hf", tokenizer=tokenizer)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert gen.eos_token_id == [tokenizer.eos_id, im_end]
    assert (gen.bos_token_id, gen.pad_token_id) == (tokenizer.bos_id, tokenizer.pad_id)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_id and config["pad_token_id"] == tokenizer.pad_id
    # transformers stops at <|im_end|>: with the blocks' outputs zeroed, the last hidden state is the
    # prompt's last embedding, and <|im_end|>'s head row is aligned with it.
    model = make()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[im_end] = 100 * model.model.embed_tokens.weight[7]
    save_hf(model, tmp_path / "hf2", tokenizer=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    out = hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)
    assert out[0, 3:].tolist() == [im_end]


def test_sampling_defaults_survive_import_and_export(tmp_path, tokenizer):
    save_hf(make(), tmp_path / "hf", tokenizer=tokenizer)
    gen_file = tmp_path / "hf" / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen_file.write_text(json.dumps({**gen, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "lf")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "lf"), "--out", str(tmp_path / "hf2")]) == 0
    again = transformers.GenerationConfig.from_pretrained(tmp_path / "hf2")
    assert (again.do_sample, again.temperature, again.top_p, again.top_k) == (True, 0.7, 0.8, 20)
    assert again.eos_token_id == gen["eos_token_id"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_real_dtype_is_recorded_and_loaded(tmp_path, tokenizer, dtype):
    model = make().to(dtype)
    save_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    name = str(dtype).removeprefix("torch.")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == name
    x = torch.randint(0, SHAPE["vocab_size"], (1, 10))
    theirs, hf = hf_logits(tmp_path / "hf", x, dtype="auto")
    assert hf.dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(model(x).float(), theirs.float(), atol=0.05, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g128"])
def test_quantized_export_loads_in_transformers(tmp_path, tokenizer, scheme, monkeypatch):
    pytest.importorskip("compressed_tensors")
    from lmforge.quant import QuantLinear, swap

    model = make(arch="qwen2", attention_bias=True)
    swap(model, scheme)
    monkeypatch.setattr(QuantLinear, "use_kernels", False)  # dequantise + fp32 matmul: the exact reference
    save_model(model, tmp_path / "lf", tokenizer=tokenizer)
    assert main(["convert", "--to-hf", str(tmp_path / "lf"), "--out", str(tmp_path / "hf")]) == 0
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    x = torch.randint(0, SHAPE["vocab_size"], (2, 12))
    theirs, _ = hf_logits(tmp_path / "hf", x)
    with torch.no_grad():
        ours = load_model(tmp_path / "lf")(x)
        float_logits = make(arch="qwen2", attention_bias=True)(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - float_logits).abs().max() > 1e-4  # really the quantized weights


def test_exports_that_cannot_be_faithful_are_refused(tmp_path):
    from lmforge import peft
    from lmforge.quant import swap

    gpt2 = ModelConfig.preset("tiny-gpt2")
    model = swap(Transformer(gpt2).eval(), "int8")
    with pytest.raises(LmforgeError, match="renames linears"):
        save_hf(model, tmp_path / "hf")
    model = peft.apply(Transformer(gpt2), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LmforgeError, match="PEFT format"):
        peft.export_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "adapter").exists()


def test_sft_writes_a_peft_adapter_that_peft_loads(tmp_path, tokenizer):
    hf_peft = pytest.importorskip("peft")
    from lmforge import peft

    save_model(make(), tmp_path / "base", tokenizer=tokenizer)
    rows = [{"prompt": f"add {i} and {i + 1}", "response": f"{2 * i + 1}"} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["sft", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"), "--method", "lora"]
    argv += ["--steps", "4", "--lr", "0.05", "--runs-dir", str(tmp_path / "runs"), "--name", "lora"]
    argv += ["--seq-len", "32", "--batch-size", "2", "--set", "train.eval_every=0", "--set", "peft.options.r=4"]
    assert main(argv) == 0
    run = tmp_path / "runs" / "lora"
    assert json.loads((run / "adapter-peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ours = peft.load_adapter(load_model(tmp_path / "base"), run / "adapter").eval()
    save_hf(load_model(tmp_path / "base"), tmp_path / "hf", tokenizer=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, 9))
    with torch.no_grad():
        base = hf(x).logits
        theirs = hf_peft.PeftModel.from_pretrained(hf, run / "adapter-peft").eval()(x).logits
        mine = ours(x)
    assert (mine - base).abs().max() > 1e-3  # the adapter was trained
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
