"""Audio front end and encoder: log-mel equal to transformers' WhisperFeatureExtractor, the encoder
equal to transformers' WhisperEncoder (both directions of the weight mapping), resampling exact on
band-limited signals, and bad audio refused with a message naming the file."""

import math

import numpy as np
import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.multimodal.audio import decode_samples, load_audio, log_mel, mel_filters, resample
from lmforge.multimodal.whisper import AudioEncoder, AudioEncoderConfig, hf_to_lmforge, lmforge_to_hf

transformers = pytest.importorskip("transformers")


def _speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(a * np.sin(2 * np.pi * f * t) for a, f in [(0.5, 220), (0.3, 1340), (0.1, 3100)])
    return (wave * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    ref = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    np.testing.assert_allclose(mel_filters(n_mels).numpy(), ref.mel_filters, rtol=1e-5, atol=1e-7)
    waves = [_speechlike(1.3, seed=0), 0.1 * _speechlike(2.1, seed=1)]  # a quiet clip keeps its own floor
    expected = ref(waves, sampling_rate=16000, return_tensors="np").input_features
    ours = log_mel(torch.stack([torch.from_numpy(np.pad(w, (0, 480000 - w.size))) for w in waves]), n_mels)
    assert ours.shape == expected.shape == (2, n_mels, 3000)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4)
    one = log_mel(waves[1], n_mels, num_samples=480000)
    np.testing.assert_allclose(one.numpy(), expected[1], atol=1e-4)


def test_resample_is_band_limited_interpolation():
    t_in = torch.arange(44100) / 44100
    sine = torch.sin(2 * math.pi * 440 * t_in)
    out = resample(sine, 44100, 16000)
    assert out.shape == (16000,)
    expected = torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)
    assert (out[200:-200] - expected[200:-200]).abs().max() < 1e-3  # away from the clip's edges
    # Above the new Nyquist frequency nothing survives (no aliasing).
    alias = resample(torch.sin(2 * math.pi * 12000 * t_in), 44100, 16000)
    assert alias[200:-200].abs().max() < 0.02
    assert torch.equal(resample(sine, 16000, 16000), sine)
    assert resample(torch.stack([sine, sine]), 44100, 16000).shape == (2, 16000)


def _hf_whisper(config: AudioEncoderConfig):
    torch.manual_seed(0)
    hf_config = transformers.WhisperConfig(**config.to_hf())
    model = transformers.WhisperModel(hf_config).eval()
    return model


def test_encoder_matches_transformers_both_ways(tmp_path):
    config = AudioEncoderConfig(
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        max_source_positions=50,
    )
    hf = _hf_whisper(config)
    ours = AudioEncoder(config).eval()
    ours.load_state_dict(hf_to_lmforge(hf.state_dict()), strict=True)
    mel = log_mel(torch.from_numpy(_speechlike(1.0)), 80)  # 100 frames = 2 x max_source_positions
    with torch.no_grad():
        expected = hf.encoder(mel[None]).last_hidden_state
        got = ours(mel[None])
    assert got.shape == expected.shape == (1, 50, 64)
    assert (got - expected).abs().max() < 1e-4
    # Ours -> HF: a freshly initialised lmforge encoder exported gives the same outputs in transformers.
    torch.manual_seed(1)
    fresh = AudioEncoder(config).eval()
    target = _hf_whisper(config)
    missing, unexpected = target.load_state_dict(lmforge_to_hf(fresh.state_dict(), "encoder."), strict=False)
    assert not unexpected and all(not k.startswith("encoder.") for k in missing)
    with torch.no_grad():
        assert (target.encoder(mel[None]).last_hidden_state - fresh(mel[None])).abs().max() < 1e-4
        # Shorter clips than 30 s (here 0.5 s) run without padding: positions are sliced.
        assert fresh(mel[None, :, :50]).shape == (1, 25, 64)


def test_encoder_refuses_wrong_shapes():
    enc = AudioEncoder(AudioEncoderConfig(d_model=32, encoder_ffn_dim=64, max_source_positions=10))
    with pytest.raises(LmforgeError, match="log-mel"):
        enc(torch.zeros(1, 40, 10))
    with pytest.raises(LmforgeError, match="mel frames"):
        enc(torch.zeros(1, 80, 21))


def test_load_audio_reads_resamples_and_refuses_bad_files(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    wave = _speechlike(0.5, rate=22050)
    stereo = np.stack([wave, wave], axis=1)
    for ext in ("wav", "flac", "ogg"):
        path = tmp_path / f"a.{ext}"
        soundfile.write(str(path), stereo, 22050)
        got = load_audio(path)
        assert got.dtype == torch.float32 and got.shape == (8000,)
    lossless = load_audio(tmp_path / "a.flac")
    expected = resample(torch.from_numpy(wave), 22050, 16000)
    assert (lossless - expected).abs().max() < 1e-3
    with pytest.raises(LmforgeError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(LmforgeError, match="corrupt.wav"):
        load_audio(tmp_path / "corrupt.wav")
    soundfile.write(str(tmp_path / "empty.wav"), np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(LmforgeError, match="no samples"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(LmforgeError, match="limit"):
        load_audio(tmp_path / "a.wav", max_seconds=0.1)
    with pytest.raises(LmforgeError, match="NaN"):
        decode_samples(np.full((10, 1), np.nan, dtype=np.float32), 16000)
