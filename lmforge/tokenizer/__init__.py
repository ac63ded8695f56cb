"""L1: byte-level BPE tokenizers (HF `tokenizers`), special tokens and chat templates.

tok = train_tokenizer(texts, vocab_size=1000)        # or load_tokenizer("path/to/hf-folder")
ids, mask = tok.render_chat(messages)                # SFT ids + assistant loss mask
tok.save("out/")                                     # tokenizer.json + tokenizer_config.json
"""

from lmforge.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer
from lmforge.tokenizer.chat import CHATML_TEMPLATE

__all__ = ["CHATML_TEMPLATE", "DEFAULT_SPECIAL_TOKENS", "Tokenizer", "load_tokenizer", "train_tokenizer"]
