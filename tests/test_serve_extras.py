"""The server's extras, driven by the official openai client (httpx where it has no method):
/v1/embeddings (float and base64, batches, token ids, against the pooled hidden state computed
here), usage.prompt_tokens_details.cached_tokens and the prefix-cache counters of /metrics,
/tokenize and /detokenize, and LoRA adapters loaded and unloaded at run time while another
stream goes on."""

from __future__ import annotations

import base64
import copy
import threading

import httpx
import numpy as np
import openai
import pytest
import torch
from test_serve_utils import ServerThread, make_checkpoint, wait_until

from lmforge import peft
from lmforge.checkpoint import load_model, load_tokenizer_if_any, save_model
from lmforge.infer.generate import generate
from lmforge.model import build_model
from lmforge.serve import ServeConfig

torch.set_num_threads(1)
LONG = " ".join(["Paged attention keeps keys and values in fixed-size blocks."] * 6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("extras"))


@pytest.fixture(scope="module")
def server(ckpt):
    model_dir, _ = ckpt
    with ServerThread(ServeConfig(model=str(model_dir), enable_lora_runtime=True)) as s:  # engine process
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def base(ckpt):
    return load_model(ckpt[0]), load_tokenizer_if_any(ckpt[0])


def _pooled(model, ids: list[int]) -> np.ndarray:
    """The reference: mean over tokens of the final normed hidden state, L2-normalised."""
    with torch.no_grad():
        _, hidden = model(torch.tensor([ids]), return_hidden=True)
    v = hidden[0].mean(0)
    return (v / v.norm()).numpy()


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_float_and_base64_equal_the_pooled_hidden_state(client, server, base):
    model, tok = base
    texts = ["hello there", "The quick brown fox jumps over the lazy dog.", "A"]  # unequal lengths: padding
    floats = client.embeddings.create(model="tiny-chat", input=texts, encoding_format="float")
    default = client.embeddings.create(model="tiny-chat", input=texts)  # the client asks for base64 and decodes
    raw = _post(server, "/v1/embeddings", dict(model="tiny-chat", input=texts, encoding_format="base64")).json()
    assert floats.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts) == floats.usage.total_tokens
    for i, t in enumerate(texts):
        v = np.array(floats.data[i].embedding, dtype=np.float32)
        assert floats.data[i].index == i and v.shape == (model.config.hidden_size,)
        np.testing.assert_allclose(v, _pooled(model, tok.encode(t)), atol=2e-5)
        assert abs(np.linalg.norm(v) - 1) < 1e-5
        decoded = np.frombuffer(base64.b64decode(raw["data"][i]["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, v)  # base64 is the same float32 bytes
        np.testing.assert_array_equal(np.array(default.data[i].embedding, dtype=np.float32), v)


def test_embeddings_of_token_ids_and_batches_equal_single_texts(client, base):
    _, tok = base
    texts = ["Language models predict the next token.", "Hello"]
    ids = [tok.encode(t) for t in texts]
    one = [
        client.embeddings.create(model="tiny-chat", input=t, encoding_format="float").data[0].embedding for t in texts
    ]
    by_ids = client.embeddings.create(model="tiny-chat", input=ids, encoding_format="float")
    single_ids = client.embeddings.create(model="tiny-chat", input=ids[0], encoding_format="float")
    np.testing.assert_allclose(single_ids.data[0].embedding, one[0], atol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(by_ids.data[i].embedding, one[i], atol=1e-5)
    assert by_ids.usage.prompt_tokens == len(ids[0]) + len(ids[1])


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (dict(input="x", dimensions=8), 400, "dimensions"),
        (dict(input=[]), 400, "at least one"),
        (dict(input=[1, 99999]), 400, "outside the vocabulary"),
        (dict(input=""), 400, "empty"),
        (dict(input="x", encoding_format="int8"), 400, "encoding_format"),
        (dict(input="x", truncate=True), 400, "truncate"),
        (dict(input="x " * 600), 400, "at most"),
        (dict(input="x", model="nope"), 404, "nope"),
    ],
)
def test_embedding_errors_are_4xx_naming_the_problem(server, body, status, needle):
    r = _post(server, "/v1/embeddings", {"model": "tiny-chat", **body})
    assert r.status_code == status and needle in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- prefix cache in usage and /metrics


def test_cached_tokens_in_usage_and_prefix_cache_counters(client, server):
    hits, queries = (
        _metric(server, "lmforge_prefix_cache_hits_total"),
        _metric(server, "lmforge_prefix_cache_queries_total"),
    )
    kw = dict(model="tiny-chat", prompt="cache me: " + LONG, max_tokens=2, temperature=0)
    first = client.completions.create(**kw).usage
    again = client.completions.create(**kw).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = again.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < again.prompt_tokens  # whole blocks, >= 1 token computed
    assert wait_until(lambda: _metric(server, "lmforge_prefix_cache_hits_total") == hits + cached)
    assert _metric(server, "lmforge_prefix_cache_queries_total") == queries + 2 * first.prompt_tokens
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached  # the final streamed usage chunk
    msgs = [{"role": "user", "content": LONG}]
    client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=2)
    chat = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=2).usage
    assert chat.prompt_tokens_details.cached_tokens > 0


def test_metrics_counters_are_typed_counter(server):
    types = dict(
        line.split()[2:4] for line in httpx.get(server.url + "/metrics").text.splitlines() if line.startswith("# TYPE")
    )
    for name in ("prefix_cache_hits", "prefix_cache_queries", "preemptions", "spec_drafted_tokens"):
        assert types[f"lmforge_{name}_total"] == "counter"
    assert all(name.endswith("_total") for name, kind in types.items() if kind == "counter")


# ----------------------------------------------------------------------------- tokenize / detokenize


def test_tokenize_detokenize_round_trip(server, base):
    _, tok = base
    text = "Hello there, how are you today?"
    r = _post(server, "/tokenize", dict(model="tiny-chat", prompt=text)).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    assert _post(server, "/detokenize", dict(model="tiny-chat", tokens=r["tokens"])).json() == {"prompt": text}
    msgs = [{"role": "user", "content": text}]
    chat = _post(server, "/tokenize", dict(messages=msgs, return_token_strs=True)).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert "".join(chat["token_strs"]) == tok.decode(chat["tokens"], skip_special_tokens=False)
    for path, body, status in (
        ("/detokenize", dict(tokens=[5, 400]), 400),
        ("/detokenize", dict(tokens=[-1]), 400),
        ("/tokenize", dict(prompt="a", messages=msgs), 400),
        ("/tokenize", dict(prompt="a", add_generation_prompt=False), 400),
        ("/tokenize", dict(prompt="a", model="nope"), 404),
    ):
        assert _post(server, path, body).status_code == status, (path, body)


def test_api_key_guards_the_extras_and_runtime_lora_is_off_by_default(ckpt, base, tmp_path):
    torch.manual_seed(2)
    embedder = build_model("tiny", vocab_size=400, hidden_size=32, intermediate_size=64).eval()
    folder = save_model(embedder, tmp_path / "embedder", tokenizer=base[1])
    cfg = ServeConfig(model=str(ckpt[0]), api_key="secret", engine_process=False, embedding_model=str(folder))
    with ServerThread(cfg) as s:
        for path in ("/tokenize", "/detokenize", "/v1/embeddings", "/v1/load_lora_adapter"):
            assert _post(s, path, {}).status_code == 401, path
        auth = {"Authorization": "Bearer secret"}
        ok = httpx.post(s.url + "/tokenize", json=dict(prompt="hi"), headers=auth)
        assert ok.status_code == 200 and ok.json()["count"] > 0
        body = dict(lora_name="x", lora_path=str(ckpt[1]))
        off = httpx.post(s.url + "/v1/load_lora_adapter", json=body, headers=auth)
        assert off.status_code == 404 and "--enable-lora-runtime" in off.json()["error"]["message"]
        # --embedding-model: embeddings come from that model, under its folder name or the served name
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key="secret", max_retries=0)
        for name in ("embedder", "tiny-chat"):
            r = keyed.embeddings.create(model=name, input="hello there", encoding_format="float")
            np.testing.assert_allclose(r.data[0].embedding, _pooled(embedder, base[1].encode("hello there")), atol=2e-5)
        assert [m.id for m in keyed.models.list()] == ["tiny-chat", "embedder"]  # listed, without a parent
        assert keyed.models.retrieve("embedder").id == "embedder"
        assert "parent" not in httpx.get(s.url + "/v1/models/embedder", headers=auth).json()


# ----------------------------------------------------------------------------- LoRA at run time


def _other_adapter(model_dir, root):
    """A second LoRA adapter for the same base, different weights."""
    model = load_model(model_dir)
    peft.apply(model, peft.LoraConfig(r=2, alpha=4, target_modules=["k_proj", "up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft.save_adapter(model, root / "other")


def _greedy(client, model: str, prompt: str, n: int = 12) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def test_an_adapter_loaded_at_run_time_serves_while_another_stream_continues(client, server, ckpt, base, tmp_path):
    model_dir, adapter_dir = ckpt
    ref_model, tok = base
    prompt = "The quick brown"
    streamed, long_kw = [], dict(model="tiny-chat", prompt="Hello there", max_tokens=300, temperature=0)
    expected_stream = _greedy(client, "tiny-chat", "Hello there", 300)
    started = threading.Event()

    def stream():
        for chunk in client.completions.create(**long_kw, stream=True):
            streamed.append(chunk.choices[0].text)
            started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(30)
    r = _post(server, "/v1/load_lora_adapter", dict(lora_name="live", lora_path=str(adapter_dir)))
    assert r.status_code == 200, r.text
    assert server.state.runner.in_flight >= 1  # the stream was still running while the adapter loaded
    assert "live" in [m.id for m in client.models.list().data]
    tuned = peft.load_adapter(copy.deepcopy(ref_model), adapter_dir, adapter_name="live").eval()
    ids = tok.encode(prompt)
    with_adapter = _greedy(client, "live", prompt)
    assert with_adapter == tok.decode(generate(tuned, ids, max_new_tokens=12)[0].tolist())  # = applied offline
    assert with_adapter != _greedy(client, "tiny-chat", prompt)
    t.join(60)
    assert "".join(streamed) == expected_stream  # the other stream went on, undisturbed

    # unloading an adapter that a request is using is refused; once it is done, unloading works
    busy = client.completions.create(model="live", prompt="Hello there", max_tokens=300, temperature=0, stream=True)
    next(iter(busy))
    r = _post(server, "/v1/unload_lora_adapter", dict(lora_name="live"))
    assert r.status_code == 409 and "in use" in r.json()["error"]["message"]
    busy.close()
    assert wait_until(lambda: server.state.runner.in_flight == 0)
    assert _post(server, "/v1/unload_lora_adapter", dict(lora_name="live")).status_code == 200
    assert "live" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        _greedy(client, "live", prompt)
    assert _post(server, "/v1/unload_lora_adapter", dict(lora_name="live")).status_code == 404

    # the same name loaded again from another folder serves the new weights (no stale prefix-cache blocks)
    other = _other_adapter(model_dir, tmp_path)
    assert _post(server, "/v1/load_lora_adapter", dict(lora_name="live", lora_path=str(other))).status_code == 200
    tuned2 = peft.load_adapter(copy.deepcopy(ref_model), other, adapter_name="live").eval()
    assert _greedy(client, "live", prompt) == tok.decode(generate(tuned2, ids, max_new_tokens=12)[0].tolist())
    assert _post(server, "/v1/unload_lora_adapter", dict(lora_name="live")).status_code == 200
    assert _greedy(client, "tiny-chat", prompt) == tok.decode(generate(ref_model, ids, max_new_tokens=12)[0].tolist())


def test_bad_adapters_are_refused_with_the_reason(server, ckpt, tmp_path):
    model_dir, adapter_dir = ckpt
    small = build_model("tiny", vocab_size=400, hidden_size=32, intermediate_size=64)
    peft.apply(small, peft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    misfit = peft.save_adapter(small, tmp_path / "misfit")
    ia3 = load_model(model_dir)
    peft.apply(ia3, peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3_dir = peft.save_adapter(ia3, tmp_path / "ia3")
    not_adapter = save_model(build_model("tiny", vocab_size=400), tmp_path / "model")
    for name, path, needle in (
        ("a", "/no/such/folder", "no such folder"),
        ("b", str(misfit), "does not fit"),
        ("c", str(ia3_dir), "only LoRA"),
        ("d", str(not_adapter), "not an adapter folder"),
        ("tiny-chat", str(adapter_dir), "already in use"),
        ("bad name", str(adapter_dir), "lora_name"),
    ):
        r = _post(server, "/v1/load_lora_adapter", dict(lora_name=name, lora_path=path))
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (name, r.text)
    assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["tiny-chat"]
    assert _greedy(openai.OpenAI(base_url=server.url + "/v1", api_key="x"), "tiny-chat", "The quick")  # still serving


def test_delete_adapter_gives_the_base_model_back(base):
    model = copy.deepcopy(base[0])
    x = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        ref = model(x)
        for name, r in (("a", 2), ("b", 4)):
            peft.apply(model, peft.LoraConfig(r=r, alpha=4, target_modules=["q_proj", "v_proj"], adapter_name=name))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        peft.delete_adapter(model, "a")
        peft.set_adapter(model, ["b"])
        assert not torch.equal(model(x), ref) and [c.adapter_name for c in peft.peft_configs(model)] == ["b"]
        peft.delete_adapter(model, "b")
        assert torch.equal(model(x), ref)  # the wrappers are gone: the plain linears compute as before
    assert not peft.peft_configs(model) and not any(isinstance(m, peft.LoraLinear) for m in model.modules())
    with pytest.raises(Exception, match="no LoRA adapter named 'b'"):
        peft.delete_adapter(model, "b")
