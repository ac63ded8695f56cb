"""The audio-language model and its data: espeak-ng synthesis deterministic for a seed, the ALM
trains (loss falls) and round-trips through save/load, transcription runs batched, the `audio`
CLI trains and evaluates end to end, and bad speech data gives clear errors."""

import json
import subprocess

import numpy as np
import pytest
import torch
from vlm_utils import tiny_alm

from lmforge.common import LmforgeError
from lmforge.multimodal import load_multimodal, save_multimodal
from lmforge.multimodal.alm import AudioLanguageModel
from lmforge.multimodal.alm import render_audio as render
from lmforge.multimodal.config import AudioTrainConfig
from lmforge.multimodal.speech import DIGITS_ZH, VOICES, SpeechExample, _utterance, make_speech, read_speech_jsonl
from lmforge.recipes.audio import build, error_rates, transcribe
from lmforge.tokenizer import train_tokenizer
from lmforge.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS

_TINY_AUDIO = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}


def test_synthesis_is_deterministic_and_varied():
    a = make_speech("digits-en", 6, seed=3)
    b = make_speech("digits-en", 6, seed=3)
    assert [e.text for e in a] == [e.text for e in b]
    assert all(torch.equal(x.wave, y.wave) for x, y in zip(a, b))
    assert all(e.text.replace(" ", "").isdigit() for e in a)
    assert len({e.wave.numel() for e in a}) > 1  # voices/rates vary the clips
    c = make_speech("digits-en", 6, seed=4)
    assert [e.text for e in c] != [e.text for e in a]
    zh = make_speech("digits-zh", 3, seed=0)
    assert all(set(e.text) <= set("零一二三四五六七八九") for e in zh)
    with pytest.raises(LmforgeError, match="unknown speech task"):
        make_speech("klingon", 1)


def test_mandarin_digits_are_spoken_as_mandarin():
    """espeak-ng 1.51 reads the numeral characters through pinyin with the tone digit in English
    (三 -> "san one"): the clips are synthesised from Arabic digits, which its cmn voice reads with
    its Mandarin number rules, one syllable a digit and no switch to English."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        spoken, text, lang = _utterance("digits-zh", rng)
        assert lang == "zh" and spoken.split() == [str(DIGITS_ZH.index(c)) for c in text]
    every = " ".join(map(str, range(10)))
    phonemes = subprocess.run(
        ["espeak-ng", "-v", VOICES["zh"][0], "-x", "-q", every], capture_output=True, text=True, check=True
    ).stdout
    assert "(en)" not in phonemes and phonemes.count("_|") == 10, phonemes


def test_fresh_alm_tokenizer_keeps_chinese_characters_whole():
    """Byte-level BPE would merge frequent neighbours (三零 one token, 三 another), so a digit's
    target ids would depend on the next digit; the fresh ALM tokenizer isolates each character."""
    rng = np.random.default_rng(0)
    texts = [_utterance("digits-zh", rng)[1] for _ in range(300)]
    examples = [SpeechExample(t, torch.zeros(1600)) for t in texts]
    cfg = AudioTrainConfig(lm_overrides={"hidden_size": 32, "num_hidden_layers": 1}, audio=_TINY_AUDIO)
    _, tokenizer = build(cfg, examples, torch.device("cpu"))
    for t in texts[:50]:
        ids = tokenizer.encode(t)
        assert [tokenizer.decode([i]) for i in ids] == list(t)
    merged = train_tokenizer(texts + [cfg.prompt], cfg.vocab_size, DEFAULT_SPECIAL_TOKENS + ["<audio>"])
    assert any(len(merged.encode(t)) < len(t) for t in texts)  # what isolating prevents


def _tiny_alm(tokenizer) -> AudioLanguageModel:
    return tiny_alm(tokenizer)


def test_alm_trains_saves_and_transcribes(tmp_path):
    torch.manual_seed(0)
    examples = make_speech("digits-en", 8, seed=1)
    tokenizer = train_tokenizer([e.text for e in examples] * 4, 300, DEFAULT_SPECIAL_TOKENS + ["<audio>"])
    model = _tiny_alm(tokenizer)
    c = model.alm_config
    assert c.num_audio_tokens == 13  # 100 frames -> 50 encoder vectors -> 13 stacks of 4 (padded)
    ids, mask = render(tokenizer, c, "transcribe.", examples[0].text)
    assert ids.count(c.audio_token_id) == c.num_audio_tokens and sum(mask) > 0
    batch = torch.tensor([ids] * 2)
    mel = model.mel([examples[0].wave, examples[0].wave])
    assert mel.shape == (2, 80, 100)
    labels = torch.tensor([ids[1:] + [0]] * 2).masked_fill(torch.tensor([mask[1:] + [0]] * 2) == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(inputs_embeds=model.embed(batch, mel))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    out = transcribe(model, tokenizer, [examples[0].wave, examples[1].wave], "transcribe.", max_new=8)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    save_multimodal(model, tmp_path / "alm", tokenizer)
    loaded = load_multimodal(tmp_path / "alm", kind="alm")
    with torch.no_grad():
        assert torch.allclose(loaded(batch, mel), model(batch, mel), atol=1e-5)
    with pytest.raises(LmforgeError, match="audio-token slots"):
        short = list(ids)
        short.remove(c.audio_token_id)  # one slot too few for the clip's features
        model.embed(torch.tensor([short] * 2), mel)
    with pytest.raises(LmforgeError, match="no audio was given"):
        model.embed(batch)


def test_error_rates_score_words_and_characters():
    assert error_rates(["3 1 4"], ["3 1 4"]) == {"wer": 0.0, "cer": 0.0}
    assert error_rates(["3 1 5"], ["3 1 4"])["wer"] == pytest.approx(1 / 3, abs=1e-4)
    assert error_rates(["三一五"], ["三一四"])["cer"] == pytest.approx(1 / 3, abs=1e-4)
    assert error_rates([""], ["3 1"])["wer"] == 1.0  # an empty hypothesis is all deletions, not a crash


def test_speech_jsonl_errors_name_the_line(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    soundfile.write(str(tmp_path / "a.wav"), np.zeros(1600, dtype=np.float32) + 0.1, 16000)
    good = tmp_path / "train.jsonl"
    good.write_text(json.dumps({"audio": "a.wav", "text": "hi"}) + "\n")
    assert read_speech_jsonl(good)[0].wave.shape == (1600,)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "a.wav", "text": "hi"}) + "\n{oops\n")
    with pytest.raises(LmforgeError, match="bad.jsonl:2"):
        read_speech_jsonl(bad)
    bad.write_text(json.dumps({"audio": "missing.wav", "text": "x"}) + "\n")
    with pytest.raises(LmforgeError, match="missing.wav"):
        read_speech_jsonl(bad)
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(LmforgeError, match=":1"):
        read_speech_jsonl(bad)


def test_audio_cli_trains_and_evaluates(tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "asr"
    sets = [
        "--set",
        "train_size=24",
        "--set",
        "eval_size=4",
        "--set",
        "stage2_steps=3",
        "--set",
        "batch_size=4",
        "--set",
        "audio.d_model=32",
        "--set",
        "audio.encoder_layers=1",
        "--set",
        "audio.encoder_ffn_dim=64",
        "--set",
        "lm_overrides.hidden_size=32",
        "--set",
        "lm_overrides.num_hidden_layers=1",
        "--set",
        "max_new_tokens=4",
    ]
    assert main(["audio", "train", "--out", str(out), *sets]) == 0
    metrics = json.loads((out / "config.json").read_text())["extra"]["metrics"]
    assert {"wer", "cer", "noise_wer", "stage2_loss"} <= set(metrics)
    capsys.readouterr()
    assert main(["audio", "eval", "--model", str(out), *sets, "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["clips"] == 4
    assert main(["audio", "eval", "--model", str(tmp_path / "nothing")]) != 0
    assert "not an lmforge" in capsys.readouterr().err


def test_generate_audio_flag(tmp_path, capsys):
    """`lmforge generate --audio FILE` on an ALM folder: the same tokens as transcribe(), clear errors."""
    soundfile = pytest.importorskip("soundfile")
    from lmforge.cli import main

    torch.manual_seed(0)
    examples = make_speech("digits-en", 2, seed=5)
    tokenizer = train_tokenizer([e.text for e in examples] * 4, 300, DEFAULT_SPECIAL_TOKENS + ["<audio>"])
    model = _tiny_alm(tokenizer).eval()
    save_multimodal(model, tmp_path / "alm", tokenizer)
    clip = examples[0].wave[:16000]
    soundfile.write(str(tmp_path / "clip.wav"), clip.numpy(), 16000)
    expected = transcribe(model, tokenizer, [clip], "transcribe.", max_new=6)[0]
    args = ["generate", "--model", str(tmp_path / "alm"), "--audio", str(tmp_path / "clip.wav")]
    assert main([*args, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == expected
    assert main([*args, "--image", "x.png"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "alm"), "--audio", str(tmp_path / "none.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err
