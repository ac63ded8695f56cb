"""Documents -> chunks that a reader can cite: each chunk keeps its file, record and 1-based line span.

Splitting follows the text's own structure, coarse to fine:

* Markdown headings start a new section (a chunk never spans two); the heading path ("Install >
  From source") travels with each chunk as its title.
* Fenced code blocks (``` or ~~~) stay whole when they fit; source files split before top-level
  `def` / `class` / decorators, so a function and its docstring land together.
* Prose splits at sentence ends, English (. ! ? before a space) and Chinese (。！？, no space needed).

Units are packed greedily up to `max_chars`; the next chunk repeats the previous one's last units up to
`overlap` characters, so an answer that straddles a boundary is whole in one of the two.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# English: terminal punctuation (and closing quotes/brackets) followed by whitespace.
# Chinese: full-width terminal punctuation (and closing quotes), no whitespace needed.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|[。！？]+[”’」』）]*")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_TOP_LEVEL_DEF = re.compile(r"^(def |class |async def |@)")


@dataclass
class Chunk:
    id: str  # "<file>:<start>-<end>" or "<file>#<record>:<start>-<end>" (records of JSONL/parquet)
    file: str
    record: str | None  # the JSONL/parquet record, None for a whole-file document
    start_line: int  # 1-based, inclusive, within the record's text (the file's for a whole-file document)
    end_line: int
    title: str  # heading path, or the file for text without headings
    text: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def lines(self) -> str:
        return f"{self.start_line}-{self.end_line}"


@dataclass
class _Unit:
    start: int  # 1-based lines
    end: int
    text: str
    section: int  # index of the heading section it belongs to


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (English and Chinese ends); they cover it whole."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _blocks(lines: list[str], code: bool) -> tuple[list[tuple[int, int, str, int]], list[str]]:
    """(start, end, kind, section) blocks of 0-based line indices, and each section's title."""
    blocks: list[tuple[int, int, str, int]] = []
    titles: list[str] = [""]
    path: list[tuple[int, str]] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if not code and _FENCE.match(line):
            fence = _FENCE.match(line).group(1)
            j = i + 1
            while j < n and not lines[j].lstrip().startswith(fence):
                j += 1
            blocks.append((i, min(j, n - 1), "code", len(titles) - 1))
            i = j + 1
            continue
        heading = None if code else _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, heading.group(2))]
            titles.append(" > ".join(t for _, t in path))
            blocks.append((i, i, "heading", len(titles) - 1))
            i += 1
            continue
        j = i + 1
        if code:  # a source file: a block runs to the next top-level definition
            while j < n and not (_TOP_LEVEL_DEF.match(lines[j]) and not _TOP_LEVEL_DEF.match(lines[j - 1])):
                j += 1
        else:  # a paragraph runs to a blank line, a heading or a fence
            while j < n and lines[j].strip() and not _HEADING.match(lines[j]) and not _FENCE.match(lines[j]):
                j += 1
        while j - 1 > i and not lines[j - 1].strip():
            j -= 1
        blocks.append((i, j - 1, "code" if code else "prose", len(titles) - 1))
        i = j
    return blocks, titles


def _units(lines: list[str], code: bool, max_chars: int) -> tuple[list[_Unit], list[str]]:
    """Blocks small enough to pack: a long prose block splits into sentences, a long code block into
    runs of lines (a single line longer than `max_chars` is cut by characters)."""
    blocks, titles = _blocks(lines, code)
    units: list[_Unit] = []
    for start, end, kind, section in blocks:
        text = "\n".join(lines[start : end + 1])
        if len(text) <= max_chars:
            units.append(_Unit(start + 1, end + 1, text, section))
        elif kind == "prose":
            newlines = [m.start() for m in re.finditer("\n", text)]
            for a, b in sentence_spans(text):
                first = start + 1 + sum(1 for p in newlines if p < a)
                last = start + 1 + sum(1 for p in newlines if p < b - 1)
                for piece in _cut(text[a:b].strip(), max_chars):
                    units.append(_Unit(first, last, piece, section))
        else:
            for row in range(start, end + 1):
                for piece in _cut(lines[row], max_chars):
                    units.append(_Unit(row + 1, row + 1, piece, section))
    return units, titles


def _cut(text: str, max_chars: int) -> list[str]:
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)] or [text]


def chunk_text(
    text: str,
    file: str,
    record: str | None = None,
    code: bool = False,
    max_chars: int = 800,
    overlap: int = 150,
) -> list[Chunk]:
    """Chunks of one document (see the module docstring). `code`: a source file, split at top-level
    definitions instead of Markdown structure."""
    if max_chars < 1 or not 0 <= overlap < max_chars:
        raise ValueError(f"chunking needs max_chars >= 1 and 0 <= overlap < max_chars (got {max_chars}, {overlap})")
    units, titles = _units(text.split("\n"), code, max_chars)
    chunks: list[Chunk] = []
    current: list[_Unit] = []

    def flush() -> None:
        # Sentences of one line rejoin with a space, units of different lines with a newline.
        body = "".join(
            ("" if i == 0 else " " if current[i - 1].end == u.start else "\n") + u.text for i, u in enumerate(current)
        ).strip()
        if body:
            start, end = min(u.start for u in current), max(u.end for u in current)
            prefix = f"{file}#{record}" if record else file
            title = titles[current[0].section] or file
            chunks.append(Chunk(f"{prefix}:{start}-{end}", file, record, start, end, title, body))

    fresh = 0  # units of `current` not already emitted in an earlier chunk
    for unit in units:
        size = sum(len(u.text) + 1 for u in current)
        if current and (unit.section != current[-1].section or size + len(unit.text) > max_chars):
            if fresh:
                flush()
            keep: list[_Unit] = []
            if unit.section == current[-1].section:  # overlap: repeat the tail within one section
                for u in reversed(current):
                    if sum(len(k.text) + 1 for k in keep) + len(u.text) > overlap:
                        break
                    keep.insert(0, u)
                while keep and sum(len(k.text) + 1 for k in keep) + len(unit.text) > max_chars:
                    keep.pop(0)
            current, fresh = keep, 0
        current.append(unit)
        fresh += 1
    if current and fresh:
        flush()
    seen: dict[str, int] = {}
    for c in chunks:  # two chunks of one line (a line cut by characters) get distinct ids
        if c.id in seen:
            seen[c.id] += 1
            c.id = f"{c.id}.{seen[c.id]}"
        else:
            seen[c.id] = 0
    return chunks
