"""Tiny random Hugging Face models of every supported family, built from configs (no download)."""

import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_hf_model(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
            attn_pdrop=0.0,
            embd_pdrop=0.0,
            resid_pdrop=0.0,
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "llama":
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(
                **TINY,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            )
        )
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY, tie_word_embeddings=True))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**TINY, sliding_window=8))
    elif family == "mixtral":
        model = tf.MixtralForCausalLM(
            tf.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
        )
    else:
        raise ValueError(family)
    # Non-trivial norms and biases so that a wrong mapping cannot hide behind ones/zeros.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "mixtral"]
