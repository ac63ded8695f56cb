"""Speech data with no downloads: clips synthesised locally by espeak-ng, or a user's JSONL folder.

    examples = make_speech("digits-en", 2000, seed=0)     # [SpeechExample(text, wave 16 kHz, task)]
    examples = read_speech_jsonl("data/asr/train.jsonl")  # {"audio": "a.wav", "text": "..."} per line

Built-in tasks (transcripts are what the model must write):
    digits-en     3-6 digits read as English words ("three one four"), written "3 1 4"
    commands-en   short commands ("turn on the kitchen light", "play some music")
    digits-zh     3-6 digits read in Mandarin (sān yī sì), written as Chinese numerals ("三一四")
Each clip varies the voice (accent / speaker variant), speaking rate (words per minute), pitch and
added white noise (20-35 dB SNR), all drawn from one seeded generator, so a seed gives the same
clips on any machine with the same espeak-ng. espeak-ng is an OS package (`apt-get install
espeak-ng`; `.ci/run` installs it).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import wave as wavelib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.common import LmforgeError

from .audio import SAMPLE_RATE, decode_samples, load_audio

DIGITS_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_ZH = "零一二三四五六七八九"
VOICES = {
    "en": ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp"],
    "zh": ["cmn"],
}
VARIANTS = ["", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4"]  # espeak-ng speaker variants
_VERBS = ["turn on", "turn off", "open", "close", "check", "clean"]
_THINGS = ["the light", "the door", "the window", "the fan", "the oven", "the music"]
_PLACES = ["", " in the kitchen", " in the bedroom", " in the hall", " in the garden"]
TASKS = ("digits-en", "commands-en", "digits-zh")


@dataclass
class SpeechExample:
    text: str  # the transcript
    wave: torch.Tensor  # [T] float32 at 16 kHz
    task: str = "user"


def _utterance(task: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(what espeak-ng reads, the transcript, the language) for one random item of a task."""
    if task in ("digits-en", "digits-zh"):
        digits = rng.integers(0, 10, int(rng.integers(3, 7))).tolist()
        if task == "digits-en":
            return " ".join(DIGITS_EN[d] for d in digits), " ".join(map(str, digits)), "en"
        # espeak-ng reads Arabic digits with its Mandarin number rules (3 -> s'a55n), but the
        # numeral characters through its dictionary's pinyin with the tone digit spoken in English
        # (三 -> "san one", 九 -> "jiu three"): so the clip is synthesised from "3 1 4", written 三一四.
        return " ".join(map(str, digits)), "".join(DIGITS_ZH[d] for d in digits), "zh"
    if task == "commands-en":
        text = f"{rng.choice(_VERBS)} {rng.choice(_THINGS)}{rng.choice(_PLACES)}"
        return text, text, "en"
    raise LmforgeError(f"unknown speech task {task!r}: choose from {', '.join(TASKS)}")


def espeak(text: str, voice: str, speed: int = 160, pitch: int = 50) -> np.ndarray:
    """espeak-ng's rendering of text -> float32 samples at 16 kHz."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise LmforgeError("speech synthesis needs espeak-ng: apt-get install espeak-ng (or give a JSONL folder)")
    try:
        out = subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except subprocess.CalledProcessError as e:
        raise LmforgeError(f"espeak-ng failed on voice {voice!r}: {e.stderr.decode(errors='replace')[:200]}") from e
    with wavelib.open(io.BytesIO(out)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32)[:, None] / 32768.0
    return decode_samples(samples, rate, SAMPLE_RATE, f"espeak-ng output for {text!r}").numpy()


def make_speech(task: str, n: int, seed: int = 0, workers: int = 2) -> list[SpeechExample]:
    """n synthetic clips of a built-in task (or "mixed-en": digits and commands), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    tasks = ["digits-en", "commands-en"] if task == "mixed-en" else [task]
    plans = []
    for _ in range(n):
        t = tasks[int(rng.integers(len(tasks)))]
        spoken, transcript, lang = _utterance(t, rng)
        voice = str(rng.choice(VOICES[lang])) + str(rng.choice(VARIANTS))
        speed, pitch = int(rng.integers(130, 201)), int(rng.integers(30, 71))
        snr_db, noise_seed = float(rng.uniform(20, 35)), int(rng.integers(2**31))
        plans.append((t, spoken, transcript, voice, speed, pitch, snr_db, noise_seed))

    def render(plan) -> SpeechExample:
        t, spoken, transcript, voice, speed, pitch, snr_db, noise_seed = plan
        clean = espeak(spoken, voice, speed, pitch)
        power = float(np.mean(clean**2)) or 1e-8
        noise = np.random.default_rng(noise_seed).standard_normal(clean.size).astype(np.float32)
        noisy = clean + noise * np.sqrt(power / 10 ** (snr_db / 10))
        return SpeechExample(transcript, torch.from_numpy(noisy.astype(np.float32)), t)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # espeak-ng runs as a subprocess: threads overlap them
        return list(pool.map(render, plans))


def read_speech_jsonl(path: str | Path) -> list[SpeechExample]:
    """A JSONL file of {"audio": file (relative to the JSONL's folder), "text": transcript} lines."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"speech data file {path} does not exist")
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str) or not isinstance(row.get("text"), str):
            raise LmforgeError(f'{path}:{n}: expected {{"audio": "<file>", "text": "<transcript>"}}')
        examples.append(SpeechExample(row["text"], load_audio(path.parent / row["audio"]), "user"))
    if not examples:
        raise LmforgeError(f"{path} holds no examples")
    return examples


def load_speech(data: str, split: str, n: int, seed: int) -> list[SpeechExample]:
    """A built-in task's split (train and test draw from different seeds) or a user JSONL/folder
    (`data/train.jsonl`, `data/test.jsonl`)."""
    if data in TASKS or data == "mixed-en":
        return make_speech(data, n, seed * 2 + (split == "test"))
    folder = Path(data)
    file = folder / f"{split}.jsonl" if folder.is_dir() else folder
    return read_speech_jsonl(file)[:n] if n else read_speech_jsonl(file)
