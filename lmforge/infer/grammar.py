"""Grammar-constrained decoding: what a request may ask its output to match.

`GrammarSpec` is the request side (JSON mode, a JSON Schema, a regex or an EBNF grammar); the
matcher that turns it into a per-step token mask lives beside it (see `compile_grammar`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.common import LmforgeError

GRAMMAR_KINDS = ("json", "json_schema", "regex", "ebnf")


@dataclass(frozen=True)
class GrammarSpec:
    """kind: "json" (any JSON object), "json_schema" (source: the schema as JSON text), "regex"
    (source: the pattern the whole output matches) or "ebnf" (source: a grammar, start rule `start`)."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise LmforgeError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}")
        if self.kind != "json" and not self.source:
            raise LmforgeError(f"a {self.kind} grammar needs its source text")
