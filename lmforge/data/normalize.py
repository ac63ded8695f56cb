"""Stage 2, normalize: Unicode form, full-width ASCII, control characters, whitespace; optional
mojibake repair (ftfy, when installed) and PII redaction; script-based language identification.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from lmforge.common import LmforgeError

# Full-width ASCII (U+FF01..U+FF5E) -> ASCII, and the ideographic space -> space. NFKC does this too,
# but this table also applies when the user turns NFKC off (e.g. to keep ligatures).
_FULLWIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
# C0/C1 control characters except tab, newline, carriage return; plus zero-width and BOM.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")


@dataclass
class NormalizeConfig:
    unicode_form: str | None = "NFKC"  # NFC, NFKC, NFD, NFKD or None
    fullwidth_to_ascii: bool = True
    remove_control: bool = True
    # "trailing" keeps indentation (collapsing spaces inside lines breaks code); "all" collapses runs.
    whitespace: str = "trailing"  # "none" | "trailing" (strip line ends, squeeze blank lines) | "all"
    fix_mojibake: bool = False
    redact_pii: bool = False

    def __post_init__(self) -> None:
        if self.unicode_form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise LmforgeError(f"normalize.unicode_form: unknown form {self.unicode_form!r} "
                               "(NFC, NFKC, NFD, NFKD or null)")
        if self.whitespace not in ("none", "trailing", "all"):
            raise LmforgeError(f"normalize.whitespace: {self.whitespace!r} is not one of none, trailing, all")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    if cfg.fix_mojibake:
        text = _fix_mojibake(text)
    if cfg.unicode_form:
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.fullwidth_to_ascii:
        text = text.translate(_FULLWIDTH)
    if cfg.remove_control:
        text = _CONTROL.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.whitespace == "all":
        text = _SPACES.sub(" ", text)
    if cfg.whitespace != "none":
        text = _BLANK_LINES.sub("\n\n", _TRAILING.sub("\n", text)).strip()
    if cfg.redact_pii:
        text = redact_pii(text)
    return text


def _fix_mojibake(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        raise LmforgeError("normalize.fix_mojibake needs the ftfy package: pip install ftfy") from None
    return ftfy.fix_text(text, normalization=None)


def redact_pii(text: str) -> str:
    """Emails and IPv4 addresses -> placeholders (the common, checkable part of PII)."""
    return IPV4.sub("<IP_ADDRESS>", EMAIL.sub("<EMAIL>", text))


# ----------------------------------------------------------------------------- language by script

_SCRIPTS = [  # (name, first code point, last code point): a coarse map of the scripts that matter
    ("latin", 0x0041, 0x024F), ("greek", 0x0370, 0x03FF), ("cyrillic", 0x0400, 0x04FF),
    ("hebrew", 0x0590, 0x05FF), ("arabic", 0x0600, 0x06FF), ("devanagari", 0x0900, 0x097F),
    ("thai", 0x0E00, 0x0E7F), ("hangul", 0x1100, 0x11FF), ("kana", 0x3040, 0x30FF),
    ("han", 0x3400, 0x9FFF), ("hangul", 0xAC00, 0xD7AF), ("han", 0xF900, 0xFAFF),
]
SCRIPT_LANG = {"latin": "en", "greek": "el", "cyrillic": "ru", "hebrew": "he", "arabic": "ar",
               "devanagari": "hi", "thai": "th", "hangul": "ko", "kana": "ja", "han": "zh"}
# Scripts written without spaces between words: measure them in characters, not words.
CHAR_SCRIPTS = {"han", "kana", "thai"}


_SCRIPT_RE: dict[str, re.Pattern] = {}
for _name, _lo, _hi in _SCRIPTS:
    _prev = _SCRIPT_RE[_name].pattern[1:-1] if _name in _SCRIPT_RE else ""
    _SCRIPT_RE[_name] = re.compile(f"[{_prev}{chr(_lo)}-{chr(_hi)}]")


def script_counts(text: str, sample: int = 4000) -> dict[str, int]:
    """Letters per script over the first `sample` characters (enough to decide, cheap on long docs).
    Latin starts at "A", so digits, spaces and ASCII punctuation count for no script."""
    head = text[:sample]
    counts = {name: len(rx.findall(head)) for name, rx in _SCRIPT_RE.items()}
    return {k: v for k, v in counts.items() if v}


def detect_language(text: str) -> tuple[str, float]:
    """(language code, share of letters in its script). Japanese wins over Chinese on any kana."""
    counts = script_counts(text)
    total = sum(counts.values())
    if not total:
        return "unknown", 0.0
    if counts.get("kana", 0) >= 0.05 * total:  # Japanese mixes kana with han
        return "ja", (counts.get("kana", 0) + counts.get("han", 0)) / total
    script = max(counts, key=counts.__getitem__)
    return SCRIPT_LANG[script], counts[script] / total


def is_char_language(lang: str) -> bool:
    return lang in ("zh", "ja", "th")
