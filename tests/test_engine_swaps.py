"""Module swaps under the engine, nothing special-cased: multi-LoRA (rows of one batch use different
LoRA adapters, or none, on a shared base without merging; each request gets the tokens it would get
with its adapter alone, with a draft model too) and quantized linears (same tokens as the static-cache generator)."""

import torch

from lmforge import peft, quant
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer

torch.set_num_threads(1)


def test_rows_with_different_adapters_match_each_adapter_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", initializer_range=0.2)).eval()
    for name in ("a", "b"):
        peft.apply(
            model, peft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], adapter_name=name)
        )
    with torch.no_grad():  # random B so each adapter really changes the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, 512, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(6)
    ]
    adapters = [None, "a", "b", "a", None, "b"]
    reference = []
    for p, a in zip(prompts, adapters):
        peft.set_adapter(model, [a] if a else [])
        reference.append(generate(model, p, max_new_tokens=10)[0].tolist())
    peft.set_adapter(model, [])
    out = Engine(model, block_size=4).generate_batch(prompts, SamplingParams(max_new_tokens=10), adapters)
    assert out == reference
    assert len({tuple(r) for r in reference[:3]}) == 3  # the adapters do change the tokens
    # A draft without adapters proposes; each row's adapter verifies: the same tokens.
    torch.manual_seed(2)
    draft = Transformer(ModelConfig.preset("tiny", num_hidden_layers=1, initializer_range=0.2)).eval()
    spec = Engine(model, block_size=4, draft=draft, num_speculative=3)
    assert spec.generate_batch(prompts, SamplingParams(max_new_tokens=10), adapters) == reference


def test_quantized_model_in_the_engine():
    torch.manual_seed(0)
    model = quant.swap(Transformer(ModelConfig.preset("tiny", initializer_range=0.2)).eval(), "int4-g32")
    prompts = [[1, 2, 3, 4, 5], list(range(30, 50)), [7] * 9]
    reference = [generate(model, p, max_new_tokens=8)[0].tolist() for p in prompts]
    assert Engine(model, block_size=4).generate_batch(prompts, SamplingParams(max_new_tokens=8)) == reference
