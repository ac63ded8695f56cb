"""Audio in: read a file, resample it, and turn it into Whisper's log-mel spectrogram, all in torch.

    wave = load_audio("clip.flac")            # mono float32 at 16 kHz (soundfile reads wav/flac/ogg)
    mel = log_mel(wave, n_mels=80)            # [n_mels, frames], one frame every 10 ms

`log_mel` is Whisper's front end (and Hugging Face's `WhisperFeatureExtractor`): a 25 ms Hann
window every 10 ms (`torch.stft`, centred, reflect-padded), power spectrum, a Slaney mel filter
bank up to 8 kHz, log10 clamped at 1e-10, floored 8 decades under the clip's peak, then scaled to
about [-1, 1] by (x + 4) / 4. It matches the reference within 1e-4 (tests/test_audio.py). No
torchaudio: its wheels are built against one torch release each; `torch.stft` is all it takes.

Resampling is band-limited (windowed-sinc) interpolation, as torchaudio's default: the rate is
reduced to a ratio of small integers and each output phase gets its own Hann-windowed sinc kernel,
low-passed at 0.99 of the lower Nyquist frequency.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lmforge.common import LmforgeError

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms
MAX_SECONDS = 600.0  # a longer file is refused, not read into memory whole


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE, fmax: float = 8000.0):
    """[1 + n_fft // 2, n_mels] triangular filters on the Slaney mel scale, area-normalised (Slaney)."""
    fft_freqs = np.linspace(0, sampling_rate // 2, 1 + n_fft // 2)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # [F, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= 2.0 / (edges[2 : n_mels + 2] - edges[:n_mels])  # each filter integrates to the same energy
    return torch.from_numpy(bank.astype(np.float32))


def pad_or_trim(wave: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The last axis cut or zero-padded to num_samples (Whisper pads every clip to 30 s)."""
    n = wave.shape[-1]
    if n >= num_samples:
        return wave[..., :num_samples]
    return torch.nn.functional.pad(wave, (0, num_samples - n))


def log_mel(
    wave: torch.Tensor | np.ndarray,
    n_mels: int = 80,
    *,
    num_samples: int | None = None,
    sampling_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
) -> torch.Tensor:
    """[T] or [B, T] samples -> [n_mels, frames] or [B, n_mels, frames], frames = samples // hop_length.
    num_samples pads/trims each clip first (Whisper: 30 s = 480,000); None keeps its length."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.dim() not in (1, 2) or wave.shape[-1] == 0:
        raise LmforgeError(f"log_mel expects samples [T] or [B, T] with T > 0, got shape {list(wave.shape)}")
    if num_samples is not None:
        wave = pad_or_trim(wave, num_samples)
    window = torch.hann_window(n_fft, device=wave.device)
    stft = torch.stft(wave, n_fft, hop_length, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # the last frame overhangs the clip: dropped
    mel = mel_filters(n_mels, n_fft, sampling_rate).to(wave.device).T @ power
    log_spec = mel.clamp(min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # per clip: a quiet clip is not floored by a loud one
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


@lru_cache(maxsize=16)
def _sinc_kernels(orig: int, new: int, width: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """[new, 1, K] Hann-windowed sinc kernels, one per output phase, and the padding they need."""
    cutoff = min(orig, new) * rolloff
    pad = math.ceil(width * orig / cutoff)
    idx = torch.arange(-pad, pad + orig, dtype=torch.float64)[None, :] / orig  # input positions, in input periods
    t = idx - torch.arange(new, dtype=torch.float64)[:, None] / new  # offset from each output phase
    t = (t * cutoff).clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t.where(t != 0, torch.ones_like(t)))
    kernel = kernel * window * (cutoff / orig)
    return kernel[:, None, :].float(), pad


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """[T] or [B, T] from orig_rate to new_rate (Hz) by band-limited interpolation."""
    if orig_rate <= 0 or new_rate <= 0:
        raise LmforgeError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return wave
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernels, pad = _sinc_kernels(orig, new)
    flat = wave.reshape(-1, 1, wave.shape[-1]).float()
    n = flat.shape[-1]
    padded = torch.nn.functional.pad(flat, (pad, pad + orig))
    out = torch.nn.functional.conv1d(padded, kernels.to(flat.device), stride=orig)  # [B, new, steps]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(new * n / orig)]
    return out.reshape(*wave.shape[:-1], -1)


def load_audio(path: str | Path, sampling_rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS) -> torch.Tensor:
    """A mono float32 waveform at sampling_rate from any file soundfile reads (wav, flac, ogg, ...)."""
    path = Path(path)
    try:
        import soundfile
    except ImportError as e:
        raise LmforgeError("reading audio needs the soundfile package: pip install 'lmforge[audio]'") from e
    if not path.is_file():
        raise LmforgeError(f"audio file {path} does not exist")
    try:
        info = soundfile.info(str(path))
        if info.frames / max(info.samplerate, 1) > max_seconds:
            raise LmforgeError(
                f"audio file {path} lasts {info.frames / info.samplerate:.0f} s, over the {max_seconds:.0f} s limit"
            )
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except LmforgeError:
        raise
    except Exception as e:  # soundfile raises its own LibsndfileError / RuntimeError for corrupt data
        raise LmforgeError(f"cannot read audio file {path}: {e}") from e
    return decode_samples(data, rate, sampling_rate, str(path))


def decode_samples(data: np.ndarray, rate: int, sampling_rate: int = SAMPLE_RATE, name: str = "audio") -> torch.Tensor:
    """[T, channels] samples at `rate` -> mono [T'] at sampling_rate; empty or non-finite audio refused."""
    if data.size == 0:
        raise LmforgeError(f"{name} holds no samples")
    if not np.isfinite(data).all():
        raise LmforgeError(f"{name} holds NaN or infinite samples")
    mono = torch.from_numpy(np.ascontiguousarray(data.reshape(data.shape[0], -1).mean(axis=1), dtype=np.float32))
    return resample(mono, int(rate), sampling_rate)
