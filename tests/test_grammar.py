"""Grammar-constrained decoding (infer/grammar.py, llguidance) in the engine, the decode driver,
generate() and `lmforge generate`: outputs of an untrained model at temperature 1.0 always parse
and validate; constrained greedy output is the same alone, among unconstrained requests, with
speculative drafts (draft model, prompt lookup), under preemption/swap and with multi-LoRA rows;
bad schemas/regexes/grammars are clear errors."""

import json
import re

import jsonschema
import pytest
import torch

from lmforge import peft
from lmforge.common import LmforgeError
from lmforge.infer import grammar as G
from lmforge.infer.decode import decode_ids
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate, generate_text
from lmforge.infer.grammar import GrammarSpec, check_grammar, grammar_masks, grammar_matcher
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import DraftProposer, LookupProposer
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_tokenizer

torch.set_num_threads(1)

SCHEMAS = [
    {  # nested objects, required fields, bounded integers
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "address": {
                "type": "object",
                "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "city": {"enum": ["Oslo", "Rome"]}},
                "required": ["zip", "city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    {  # arrays of enums and of bounded numbers
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
            "scores": {"type": "array", "items": {"type": "number", "minimum": -2.5, "maximum": 7}, "maxItems": 3},
        },
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    {  # booleans, null, an optional field, integer bounds with exclusive limits
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "note": {"type": ["string", "null"], "maxLength": 4},
            "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
            "extra": {"type": "integer", "minimum": 0, "maximum": 3},
        },
        "required": ["ok", "note", "n"],
        "additionalProperties": False,
    },
    {  # an array of objects
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 500}, "kind": {"const": "x"}},
                    "required": ["id", "kind"],
                    "additionalProperties": False,
                },
                "maxItems": 3,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def tok():
    corpus = [json.dumps({"name": "ab" * (i % 5), "age": i, "tags": ["red", "blue"][: i % 3]}) for i in range(150)]
    return train_tokenizer(corpus + ["the quick brown fox jumps over the lazy dog"] * 5, 512)


def _model(seed=0, std=0.02, layers=2):
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig.preset("tiny", vocab_size=512, num_hidden_layers=layers, initializer_range=std)
    ).eval()


@pytest.fixture(scope="module")
def untrained():
    return _model()


@pytest.fixture(scope="module")
def peaked():  # greedy comparisons: peaked logits keep choices far from ties
    return _model(std=0.2)


def _spec(schema) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema))


def _prompts(tok, n):
    words = ["hello", "the fox", "a lazy dog", "json please", "quick"]
    return [tok.encode(words[i % len(words)] + " " * (i % 3) + "x" * (i % 4)) for i in range(n)]


def test_schemas_always_validate_from_an_untrained_model_at_temperature_1(tok, untrained):
    engine = Engine(untrained, tok, max_seqs=32)
    requests = []
    for s, schema in enumerate(SCHEMAS):
        for i, prompt in enumerate(_prompts(tok, 8)):
            params = SamplingParams(max_new_tokens=120, temperature=1.0, seed=100 * s + i, grammar=_spec(schema))
            requests.append((engine.add_request(prompt, params), schema))
    while engine.has_unfinished():
        engine.step()
    for rid, schema in requests:
        seq = engine.requests[rid]
        assert seq.finish_reason == "stop", (seq.finish_reason, tok.decode(seq.output))
        assert seq.output[-1] == tok.eos_id  # the grammar's end: only the stop ids were allowed
        jsonschema.validate(json.loads(tok.decode(seq.output)), schema)


def test_json_mode_regex_and_ebnf_outputs_match(tok, untrained):
    lark = 'start: greeting " " name "!"\ngreeting: "hi" | "hello"\nname: /[a-z]{2,5}/'
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'
    cases = [
        (GrammarSpec("json"), lambda t: isinstance(json.loads(t), dict)),
        (GrammarSpec("regex", r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (GrammarSpec("ebnf", lark), lambda t: re.fullmatch(r"(hi|hello) [a-z]{2,5}!", t)),
        (GrammarSpec("ebnf", gbnf), lambda t: re.fullmatch(r"(yes|no) [0-9][0-9]?", t)),
    ]
    # Free JSON keys and strings close only when '"' is drawn (1 in ~300 for an untrained model): a bias
    # on the closing characters lets them end, and checks logit_bias and a grammar together.
    bias = {tok.token_to_id(c): 6.0 for c in '"}]'}
    engine = Engine(untrained, tok)
    for spec, ok in cases:
        params = [
            SamplingParams(max_new_tokens=200, temperature=1.0, seed=i, grammar=spec, logit_bias=bias) for i in range(6)
        ]
        for out in engine.generate_batch(_prompts(tok, 6), params):
            assert out[-1] == tok.eos_id and ok(tok.decode(out)), (spec, tok.decode(out))


def test_mixed_constrained_and_free_requests_equal_each_alone(tok, peaked):
    specs = [_spec(s) for s in SCHEMAS] + [GrammarSpec("json"), GrammarSpec("regex", r"(ab|cd)+[0-9]")]
    prompts = _prompts(tok, 32)  # the 32 concurrent requests, two thirds constrained
    params = [
        SamplingParams(max_new_tokens=40, grammar=specs[i % len(specs)] if i % 3 else None) for i in range(len(prompts))
    ]
    together = Engine(peaked, tok, max_seqs=32).generate_batch(prompts, params)
    alone = [Engine(peaked, tok).generate_batch([p], [s])[0] for p, s in zip(prompts, params)]
    assert together == alone
    # Logprobs report the model's own distribution, unchanged by masks on other rows (or its own).
    entries = []
    for grammar in (None, specs[0]):
        engine = Engine(peaked, tok)
        rids = [engine.add_request(prompts[0], SamplingParams(max_new_tokens=8), logprobs=2)]
        rids.append(engine.add_request(prompts[1], SamplingParams(max_new_tokens=8, grammar=grammar), logprobs=2))
        while engine.has_unfinished():
            engine.step()
        entries.append([engine.requests[r].token_logprobs for r in rids])
    assert [e[:2] for e in entries[0][0]] == pytest.approx([e[:2] for e in entries[1][0]], abs=1e-4)
    seq = engine.requests[rids[1]]  # the constrained row: its logprobs are a plain forward's
    with torch.no_grad():
        full = peaked(torch.tensor([seq.tokens]))[0].float().log_softmax(-1)
    want = [float(full[len(seq.prompt) - 1 + i, t]) for i, t in enumerate(seq.output)]
    assert [lp for _, lp, _ in seq.token_logprobs] == pytest.approx(want, abs=1e-4)
    # The decode driver (single sequence) gives the same tokens as the engine.
    driver = decode_ids(peaked, params[1], prompts[1], eos_token_ids=[tok.eos_id], tokenizer=tok)[0]
    assert driver == together[1]


def test_speculative_drafts_follow_the_grammar(tok, peaked):
    prompts = _prompts(tok, 10)
    params = [SamplingParams(max_new_tokens=48, grammar=_spec(SCHEMAS[i % len(SCHEMAS)])) for i in range(len(prompts))]
    plain = Engine(peaked, tok).generate_batch(prompts, params)
    noisy = _model(std=0.2)
    with torch.no_grad():
        for p, q in zip(noisy.parameters(), peaked.parameters()):
            p.copy_(q + 0.02 * torch.randn_like(q))
    for drafter in (dict(draft=noisy), dict(lookup=True)):
        engine = Engine(peaked, tok, num_speculative=3, **drafter)
        assert engine.generate_batch(prompts, params) == plain
        assert engine.counters["accepted_tokens"] > 0
    # The decode driver's speculative path: draft model and prompt lookup.
    ref = decode_ids(peaked, params[0], prompts[0], eos_token_ids=[tok.eos_id], tokenizer=tok)[0]
    for proposer in (DraftProposer(noisy, 256), LookupProposer()):
        spec = decode_ids(peaked, params[0], prompts[0], eos_token_ids=[tok.eos_id], tokenizer=tok, proposer=proposer)
        assert spec[0] == ref


@pytest.mark.parametrize("preemption", ["swap", "recompute"])
def test_preemption_keeps_grammar_state(tok, untrained, preemption):
    prompts = _prompts(tok, 8)
    params = [
        SamplingParams(max_new_tokens=60, temperature=1.0, seed=i, grammar=_spec(SCHEMAS[i % 2])) for i in range(8)
    ]
    roomy = Engine(untrained, tok).generate_batch(prompts, params)
    tight = Engine(untrained, tok, block_size=4, num_blocks=24, preemption=preemption)
    assert tight.generate_batch(prompts, params) == roomy
    assert tight.stats["preemptions"] > 0
    for i, out in enumerate(roomy):
        jsonschema.validate(json.loads(tok.decode(out)), SCHEMAS[i % 2])


def test_multi_lora_rows_and_prefix_cache_with_a_grammar(tok):
    model = _model(std=0.2)
    peft.apply(model, peft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter_name="a"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft.set_adapter(model, [])  # rows choose their adapter; None is the base
    prompt = tok.encode("the quick brown fox jumps over the lazy dog, the quick brown fox")
    params = SamplingParams(max_new_tokens=80, grammar=_spec(SCHEMAS[3]))
    adapters = [None, "a", None, "a"]
    engine = Engine(model, tok, block_size=4)
    out = engine.generate_batch([prompt] * 4, params, adapters)
    assert engine.generate_batch([prompt] * 4, params, adapters) == out  # again, from the prefix cache
    assert engine.stats["prefix_hit_blocks"] > 0
    for adapter, got in zip(adapters, out):
        assert (
            got == Engine(model, tok, block_size=4, prefix_caching=False).generate_batch([prompt], params, [adapter])[0]
        )
        jsonschema.validate(json.loads(tok.decode(got)), SCHEMAS[3])


def test_generate_and_generate_text_honour_a_grammar(tok, untrained):
    spec = _spec(SCHEMAS[1])
    text = generate_text(
        untrained, tok, "hello", SamplingParams(max_new_tokens=80, temperature=1.0, seed=1, grammar=spec)
    )
    jsonschema.validate(json.loads(text), SCHEMAS[1])
    rows = generate(
        untrained, _prompts(tok, 3), max_new_tokens=80, temperature=1.0, seed=2, grammar=spec, tokenizer=tok
    )
    for row in rows.tolist():
        jsonschema.validate(json.loads(tok.decode(row[: row.index(tok.eos_id)])), SCHEMAS[1])


def test_cut_off_is_length_and_a_complete_grammar_allows_only_stop_ids(tok, untrained):
    engine = Engine(untrained, tok)
    rid = engine.add_request(tok.encode("hi"), SamplingParams(max_new_tokens=3, grammar=GrammarSpec("json")))
    while engine.has_unfinished():
        engine.step()
    assert engine.requests[rid].finish_reason == "length"
    m = grammar_matcher(GrammarSpec("regex", "ab|abc"), tok, 512)
    for t in tok.encode("ab"):
        m.advance(t)
    allowed = grammar_masks([m], [[tok.eos_id, 3]], 512)[0]
    assert allowed[tok.eos_id] and allowed[3] and m.accepts_eos and not m.is_terminated  # "c" may still follow
    m.advance(tok.encode("c")[0])
    allowed = grammar_masks([m], [[tok.eos_id, 3]], 512)[0]
    assert m.is_terminated and allowed.nonzero().flatten().tolist() == [tok.eos_id, 3]
    m.rollback(1)
    assert not m.is_terminated and grammar_masks([m], [[tok.eos_id]], 512)[0].sum() > 1


def test_sixteen_requests_with_one_schema_compile_once(tok, untrained):
    spec = _spec({"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]})
    before = G.cache_info["compiles"]
    engine = Engine(untrained, tok)
    for prompt in _prompts(tok, 16):
        engine.add_request(prompt, SamplingParams(max_new_tokens=4, grammar=spec))
    assert G.cache_info["compiles"] == before + 1


def test_bad_grammars_are_clear_errors(tok, untrained):
    cases = [
        (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
        (GrammarSpec("json_schema", "[1, 2]"), "must be a JSON object"),
        (GrammarSpec("json_schema", '{"type": "nosuch"}'), "nosuch"),
        (GrammarSpec("regex", "(ab"), "unclosed group"),
        (GrammarSpec("ebnf", "start: foo"), "foo"),
    ]
    engine = Engine(untrained, tok)
    for spec, match in cases:
        with pytest.raises(LmforgeError, match=match):
            check_grammar(spec)
        with pytest.raises(LmforgeError, match=match):
            engine.add_request([1, 2], SamplingParams(grammar=spec))
    with pytest.raises(LmforgeError, match="kind must be one of"):
        GrammarSpec("yaml", "x")
    with pytest.raises(LmforgeError, match="needs the model's tokenizer"):
        Engine(untrained).add_request([1, 2], SamplingParams(grammar=GrammarSpec("json")))
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        engine.add_request([1, 2], SamplingParams(logit_bias={512: 1.0}))
    with pytest.raises(LmforgeError, match="Medusa"):
        from lmforge.infer.decode import decode

        class Tree(LookupProposer):
            tree = True

        decode(untrained, SamplingParams(grammar=GrammarSpec("json")), [1, 2], proposer=Tree(), tokenizer=tok)


def test_grammar_spec_pickles():
    import pickle

    spec = GrammarSpec("regex", "a+")
    params = SamplingParams(grammar=spec, logit_bias={"3": 1.5})
    again = pickle.loads(pickle.dumps(params))
    assert again.grammar == spec and again.logit_bias == {3: 1.5}


def test_cli_generate_json_schema_regex_and_bad_files(tok, untrained, tmp_path, capsys):
    from lmforge.checkpoint import save_model
    from lmforge.cli import main

    save_model(untrained, tmp_path / "m", tok)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS[0]))
    common = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "120"]
    assert main(common + ["--json-schema", str(schema_file), "--temperature", "1", "--seed", "3"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS[0])
    assert main(common + ["--regex", "[a-c]{4}", "--min-p", "0.05", "--presence-penalty", "1.5"]) == 0
    assert re.fullmatch("[a-c]{4}", capsys.readouterr().out.strip())
    (tmp_path / "bad.json").write_text('{"type": "object", "properties": {"a": {"type": "nosuch"}}}')
    assert main(common + ["--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(common + ["--json-schema", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(common + ["--json-mode", "--regex", "a"]) == 2  # one constraint at a time


def _sentencepiece_style(texts, vocab_size):
    """A Llama-2-style tokenizer.json: BPE over '▁'-joined words, byte fallback (<0xNN> in the vocab)."""
    from tokenizers import AddedToken, decoders, models, normalizers, trainers
    from tokenizers import Tokenizer as Backend

    from lmforge.tokenizer import Tokenizer

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Backend(models.BPE())
    base.normalizer = norm
    base.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 259, special_tokens=[]))
    learned = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = norm
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def test_sentencepiece_style_tokenizer(untrained):
    corpus = [json.dumps({"name": "ab" * (i % 5), "age": i}) for i in range(200)] + ["hello world"] * 20
    sp = _sentencepiece_style(corpus, 500)
    assert sp.decode(sp.encode('{"a": 1} é€')) == '{"a": 1} é€'  # byte fallback round trip
    schema = SCHEMAS[2]
    params = [SamplingParams(max_new_tokens=80, temperature=1.0, seed=i, grammar=_spec(schema)) for i in range(6)]
    for out in Engine(untrained, sp).generate_batch([sp.encode("hello")] * 6, params):
        assert out[-1] == sp.eos_id
        jsonschema.validate(json.loads(sp.decode(out)), schema)
