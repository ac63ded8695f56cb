"""Stage 2, normalize: Unicode form, full-width ASCII, control characters, whitespace; optional
mojibake repair (ftfy, when installed) and PII redaction. Language identification is in
`lmforge.data.langid` (re-exported here for callers of the former script-based version).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from lmforge.common import LmforgeError
from lmforge.data.langid import detect_language, is_char_language  # noqa: F401 (re-export)

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
            raise LmforgeError(
                f"normalize.unicode_form: unknown form {self.unicode_form!r} (NFC, NFKC, NFD, NFKD or null)"
            )
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
