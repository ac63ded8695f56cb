"""lmforge.tokenizer: byte-level round trips, special tokens, HF folder save/load parity with
transformers, chat template parity, loss masks, and errors on bad input."""

import json
import pickle

import pytest

from lmforge.common import LmforgeError
from lmforge.tokenizer import CHATML_TEMPLATE, DEFAULT_SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "机器学习是人工智能的一个分支。语言模型预测下一个词。",
    "Emoji: 🙂🚀👩‍👩‍👧 and accents: café naïve résumé.",
    "Numbers 12345 67890 and\ttabs\tand  double  spaces.",
]

SAMPLES = [
    "Hello, world!",
    "机器学习很有趣，你好世界。",
    "🙂 👩‍👩‍👧 🇫🇷 🚀🚀",
    " leading and trailing spaces  \t\n\r\n \u00a0\u3000 ",
    "control \x00\x01\x1f\x7f chars and e\u0301 combining",
    "mixed: abc 中文 🙂 \n\n\tcode(x) ≠ y",
    "",
]

# A second template in a different style: BOS, role headers, EOS as end of turn.
ALPACA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Assistant:\n' + m['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
# transformers' {% generation %} markers (what return_assistant_tokens_mask reads).
GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Block tags on their own indented lines (so trim_blocks/lstrip_blocks matter), namespace,
# tojson and tools, as in Llama-3/Qwen templates.
TOOLS_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for m in messages %}
    {%- if m['role'] == 'system' %}
        {%- set ns.system = m['content'] %}
    {%- endif %}
{%- endfor %}
{% if tools is not none %}
Tools: {{ tools | tojson }}
{% endif %}
{% if ns.system %}System: {{ ns.system }}
{% endif %}
{% for m in messages if m['role'] != 'system' %}
    <{{ m['role'] }} n={{ loop.index0 }}>
    {{ m['content'] | trim }}{{ eos_token if m['role'] == 'assistant' else '' }}
{% endfor %}
{% if add_generation_prompt %}
    <assistant>
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "你好! 🙂"},
    {"role": "assistant", "content": " Hello\nthere 你好 🚀 "},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(iter(CORPUS * 5), vocab_size=400)


def _hf_fast(tok: Tokenizer, template: str):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, **tok.special_tokens)
    hf.chat_template = template
    return hf


# ----------------------------------------------------------------------------- basics


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True)) == text  # the BOS is skipped on decode


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]
    assert tok.encode_batch(SAMPLES, add_bos=True) == [[tok.bos_id] + tok.encode(t) for t in SAMPLES]


def test_decode_accepts_tensors_and_rejects_bad_ids(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode(SAMPLES[1])
    assert tok.decode(torch.tensor(ids)) == SAMPLES[1]
    with pytest.raises(LmforgeError, match="token id -100 is outside the vocabulary"):
        tok.decode(ids + [-100])
    with pytest.raises(LmforgeError, match=f"token id {tok.vocab_size} is outside"):
        tok.decode([tok.vocab_size])


def test_pickles_for_dataloader_workers(tok):
    tok.render_chat(MESSAGES)  # fill the cached properties first
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert copy.render_chat(MESSAGES) == tok.render_chat(MESSAGES)


def test_special_tokens(tok):
    ids = {t: tok.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS}
    assert list(ids.values()) == list(range(len(DEFAULT_SPECIAL_TOKENS)))  # specials come first
    assert tok.bos_id == tok.eos_id == ids["<|endoftext|>"] and tok.pad_id == ids["<|pad|>"]
    assert tok.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.encode("a<image>b") == tok.encode("a") + [ids["<image>"]] + tok.encode("b")
    assert tok.encode("<|im_start|>user") == [ids["<|im_start|>"]] + tok.encode("user")
    assert tok.id_to_token(ids["<|im_end|>"]) == "<|im_end|>"
    assert tok.token_to_id("no-such-token") is None and tok.id_to_token(10**6) is None
    with_specials = tok.encode("<|im_start|>hi<|im_end|>")
    assert tok.decode(with_specials) == "hi"
    assert tok.decode(with_specials, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_training_streams_a_generator_and_respects_vocab_size():
    consumed = []

    def texts():
        for t in CORPUS * 20:
            consumed.append(1)
            yield t

    small = train_tokenizer(texts(), vocab_size=300, special_tokens=["<|endoftext|>"])
    assert len(consumed) == len(CORPUS) * 20
    assert small.vocab_size == 300
    assert small.pad_id is None and small.chat_template is None
    for text in SAMPLES:
        assert small.decode(small.encode(text)) == text
    # Bigger vocab -> more merges -> fewer tokens for the same text.
    big = train_tokenizer(CORPUS * 5, vocab_size=600, min_frequency=1)
    assert 300 < big.vocab_size <= 600
    assert len(big.encode(CORPUS[0])) < len(small.encode(CORPUS[0]))


# ----------------------------------------------------------------------------- files


def test_save_load_identity(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == CHATML_TEMPLATE and config["pad_token"] == "<|pad|>"
    for loaded in (load_tokenizer(tmp_path), Tokenizer.load(tmp_path / "tokenizer.json")):
        assert loaded.backend.get_vocab() == tok.backend.get_vocab()
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert loaded.special_tokens == tok.special_tokens and loaded.chat_template == tok.chat_template
        assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
        assert loaded.render_chat(MESSAGES) == tok.render_chat(MESSAGES)


def test_bare_tokenizer_json_gets_default_roles(tok, tmp_path):
    (tmp_path / "my.json").write_text(tok.backend.to_str())
    loaded = load_tokenizer(tmp_path / "my.json")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert loaded.chat_template is None


@pytest.mark.parametrize("kind", ["bytelevel_trim_offsets", "template_adds_bos", "truncation"])
def test_post_processors_and_truncation_in_a_file_change_nothing(tok, tmp_path, kind):
    """GPT-2's file trims offsets, Llama-style files add BOS, some files truncate: none of it may
    leak into encode() or shift the loss mask."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    backend = Backend.from_str(tok.backend.to_str())
    if kind == "bytelevel_trim_offsets":
        backend.post_processor = processors.ByteLevel(trim_offsets=True)
    elif kind == "template_adds_bos":
        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_id)]
        )
    else:
        backend.enable_truncation(max_length=4)
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert loaded.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])
    # A header ending in a space before content starting with "\n": trimmed offsets would pull
    # the space token into the assistant span.
    spaced = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    leading_newlines = MESSAGES[:2] + [{"role": "assistant", "content": "\n\nIt is 4. "}]
    for template, messages in ((CHATML_TEMPLATE, MESSAGES), (spaced, leading_newlines)):
        ids, mask = Tokenizer(loaded.backend, **tok.special_tokens, chat_template=template).render_chat(messages)
        assert ids == tok.encode(
            Tokenizer(tok.backend, **tok.special_tokens, chat_template=template).apply_chat_template(messages)
        )
        assert _masked_runs(tok, ids, mask) == [
            m["content"] + "<|endoftext|>" if template != CHATML_TEMPLATE else m["content"] + "<|im_end|>"
            for m in messages
            if m["role"] == "assistant"
        ]


def test_hf_config_variants(tok, tmp_path):
    """AddedToken dicts for special tokens, a list of named templates, and a .jinja file that wins."""
    (tmp_path / "tokenizer.json").write_text(tok.backend.to_str())
    config = {
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "special": True},
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"},
        "pad_token": None,
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ 1 }}"}],
        "model_max_length": 128,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded.bos_id == tok.token_to_id("<|im_start|>") and loaded.eos_id == tok.token_to_id("<|im_end|>")
    assert loaded.pad_id is None and loaded.chat_template == "{{ 1 }}"
    (tmp_path / "chat_template.jinja").write_text(ALPACA_TEMPLATE)
    assert load_tokenizer(tmp_path).chat_template == ALPACA_TEMPLATE
    # Saving over the folder keeps the unknown fields and the .jinja file in step with the config.
    loaded.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 128
    assert load_tokenizer(tmp_path).chat_template == "{{ 1 }}"


def test_load_what_transformers_saved(tok, tmp_path):
    hf = _hf_fast(tok, ALPACA_TEMPLATE)
    hf.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert ours.chat_template == ALPACA_TEMPLATE
    for text in SAMPLES:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    for prompt in (False, True):
        expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=prompt) == expected


@pytest.mark.parametrize(
    "tools",
    [
        None,
        [
            {
                "type": "function",
                "function": {
                    "name": "add",
                    "parameters": {
                        "type": "object",
                        "properties": {"a": {"type": "number", "description": "ünïcode <&>"}},
                    },
                },
            }
        ],
    ],
)
def test_whitespace_control_and_tools_match_transformers(tok, tools):
    hf = _hf_fast(tok, TOOLS_TEMPLATE)
    ours = Tokenizer(tok.backend, **tok.special_tokens, chat_template=TOOLS_TEMPLATE)
    for prompt in (False, True):
        expected = hf.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=prompt)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=prompt, tools=tools) == expected
    assert "\n\n" not in expected.replace(tok.special_tokens["eos_token"], "")  # trim_blocks was applied


def test_transformers_loads_what_we_saved(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert [hf.encode(t, add_special_tokens=False) for t in SAMPLES] == tok.encode_batch(SAMPLES)
    for prompt in (False, True):
        expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=prompt) == expected
        ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=prompt, return_dict=True)
        assert ids["input_ids"] == tok.render_chat(MESSAGES, add_generation_prompt=prompt)[0]


def test_template_sees_other_named_tokens_like_transformers(tok, tmp_path):
    template = "{{ unk_token }}|{{ bos_token }}|{% for m in messages %}{{ m['content'] }}{% endfor %}|{{ pad_token }}"
    hf = _hf_fast(tok, template)
    hf.unk_token = "<image>"
    hf.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert ours.apply_chat_template(MESSAGES[:2]) == hf.apply_chat_template(MESSAGES[:2], tokenize=False)
    assert ours.apply_chat_template(MESSAGES[:2], bos_token="B").startswith("<image>|B|")


def test_chatml_renders_image_parts(tok):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
    ]
    text = tok.apply_chat_template(messages)
    assert text == "<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    hf = _hf_fast(tok, CHATML_TEMPLATE)
    assert hf.apply_chat_template(messages, tokenize=False) == text


# ----------------------------------------------------------------------------- loss masks


def _masked_runs(tok, ids, mask) -> list[str]:
    """Decoded text of each contiguous run of mask==1 tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def _assistant_texts(end_token: str) -> list[str]:
    return [m["content"] + end_token for m in MESSAGES if m["role"] == "assistant"]


def test_loss_mask_chatml(tok):
    ids, mask = tok.render_chat(MESSAGES)
    assert ids == tok.encode(tok.apply_chat_template(MESSAGES)) and len(mask) == len(ids)
    assert _masked_runs(tok, ids, mask) == _assistant_texts("<|im_end|>")
    assert ids[-1] == tok.token_to_id("\u010a") and mask[-1] == 0  # the "\n" after <|im_end|> is template
    ids1, mask1 = tok.render_chat([{"role": "assistant", "content": "Hi"}] + MESSAGES[1:2])
    assert _masked_runs(tok, ids1, mask1) == ["Hi<|im_end|>"]
    ids2, mask2 = tok.render_chat(MESSAGES[:4], add_generation_prompt=True)
    assert _masked_runs(tok, ids2, mask2) == _assistant_texts("<|im_end|>")[:1]
    assert ids2 == tok.encode(tok.apply_chat_template(MESSAGES[:4], add_generation_prompt=True))


def test_loss_mask_other_template(tok):
    tok2 = Tokenizer(tok.backend, **tok.special_tokens, chat_template=ALPACA_TEMPLATE)
    ids, mask = tok2.render_chat(MESSAGES)
    assert ids[0] == tok.bos_id and ids == tok2.encode(tok2.apply_chat_template(MESSAGES))
    assert _masked_runs(tok2, ids, mask) == _assistant_texts("<|endoftext|>")


def test_loss_mask_generation_tags_match_transformers(tok):
    tok2 = Tokenizer(tok.backend, **tok.special_tokens, chat_template=GENERATION_TEMPLATE)
    ids, mask = tok2.render_chat(MESSAGES)
    assert _masked_runs(tok2, ids, mask) == _assistant_texts("<|im_end|>")
    hf = _hf_fast(tok, GENERATION_TEMPLATE)
    out = hf.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids and out["assistant_masks"] == mask


def test_loss_mask_rejects_non_incremental_template(tok):
    template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}{% endfor %}"
    tok2 = Tokenizer(tok.backend, **tok.special_tokens, chat_template=template)
    with pytest.raises(LmforgeError, match="message 2"):
        tok2.render_chat(MESSAGES)


# ----------------------------------------------------------------------------- errors


def test_load_errors_name_the_path(tok, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(LmforgeError, match=str(missing)):
        load_tokenizer(missing)
    with pytest.raises(LmforgeError, match=f"no tokenizer.json in {tmp_path}"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(LmforgeError, match=f"{bad}: invalid JSON at line 1"):
        load_tokenizer(tmp_path)
    bad.write_text('{"version": "1.0"}')
    with pytest.raises(LmforgeError, match=f"{bad}: not a valid tokenizer.json"):
        load_tokenizer(bad)
    bad.write_text(tok.backend.to_str())
    config = tmp_path / "tokenizer_config.json"
    config.write_text("[1, 2")
    with pytest.raises(LmforgeError, match=f"{config}: invalid JSON"):
        load_tokenizer(tmp_path)
    config.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(LmforgeError, match=f"{config}: bos_token '<s>' is not in the tokenizer's vocabulary"):
        load_tokenizer(tmp_path)
    config.write_text(json.dumps({"eos_token": 3}))
    with pytest.raises(LmforgeError, match="eos_token must be a string"):
        load_tokenizer(tmp_path)


def test_message_errors_name_the_index(tok):
    with pytest.raises(LmforgeError, match="message 1: unknown role 'robot'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}])
    with pytest.raises(LmforgeError, match=r"message 0 \(user\): missing 'content'"):
        tok.render_chat([{"role": "user"}])
    with pytest.raises(LmforgeError, match="message 2: expected a dict"):
        tok.apply_chat_template(MESSAGES[:2] + ["hi"])
    with pytest.raises(LmforgeError, match="messages must be a list"):
        tok.apply_chat_template("hi")


def test_other_errors(tok):
    tok2 = Tokenizer(tok.backend, **tok.special_tokens, chat_template=ALPACA_TEMPLATE)
    with pytest.raises(LmforgeError, match="unsupported role tool"):  # the template's raise_exception
        tok2.apply_chat_template([{"role": "tool", "content": "42"}])
    with pytest.raises(LmforgeError, match="syntax error"):
        Tokenizer(tok.backend, chat_template="{% for %}").apply_chat_template(MESSAGES)
    with pytest.raises(LmforgeError, match="no chat template"):
        Tokenizer(tok.backend).render_chat(MESSAGES)
    with pytest.raises(LmforgeError, match="no bos_token"):
        Tokenizer(tok.backend).encode("hi", add_bos=True)
    with pytest.raises(LmforgeError, match="vocab_size 100 is too small"):
        train_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(LmforgeError, match="text 1 is a int"):
        train_tokenizer(["ok", 3], vocab_size=300)
    with pytest.raises(LmforgeError, match="text 0 is a bytes"):
        tok.encode_batch([b"x"])
