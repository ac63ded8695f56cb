"""The built-in corpus: the running interpreter's standard library, so a user with nothing else has a
real corpus. Two sources: "code" (the .py files) and "prose" (their docstrings and comments,
extracted with `ast` and `tokenize`).
"""

from __future__ import annotations

import ast
import io
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.data.readers import Document, ReadReport

# Test suites are half the stdlib's bytes; leaving them out keeps the default run fast.
TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_files(include_tests: bool = False, root: str | Path | None = None) -> list[Path]:
    """Sorted .py files of the stdlib (never site-packages: those are third-party)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        parts = set(p.relative_to(root).parts[:-1])
        if "site-packages" in parts or "dist-packages" in parts or "__pycache__" in parts:
            continue
        if not include_tests and parts & TEST_DIRS:
            continue
        out.append(p)
    return out


def docstrings(tree: ast.AST) -> list[str]:
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            out.append(doc)
    return out


def comments(source: bytes) -> list[str]:
    """Comment texts, consecutive comment lines joined into one paragraph."""
    paragraphs: list[list[str]] = []
    last_row = -2
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#!").strip()
            if not text or text.startswith("-*-"):
                continue
            if tok.start[0] == last_row + 1 and paragraphs:
                paragraphs[-1].append(text)
            else:
                paragraphs.append([text])
            last_row = tok.start[0]
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        pass  # keep the comments found before the fault
    return [" ".join(p) for p in paragraphs]


def prose_of(source: bytes) -> str:
    """Docstrings then comments of one module, as paragraphs separated by blank lines."""
    try:
        docs = docstrings(ast.parse(source))
    except (SyntaxError, ValueError):
        docs = []
    return "\n\n".join(docs + comments(source))


def read_stdlib(files: Iterable[Path], report: ReadReport, root: str | Path | None = None,
                sources: tuple[str, ...] = ("code", "prose")) -> Iterator[Document]:
    """Per file: a "code" document (the file) and a "prose" document (its docstrings + comments)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in files:
        report.files += 1
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            report.skip(f"unreadable ({e.__class__.__name__})", str(path))
            continue
        if "code" in sources and text.strip():
            report.documents += 1
            report.bytes += len(raw)
            yield Document(id=f"stdlib/{rel}", text=text, source="code")
        if "prose" in sources:
            prose = prose_of(raw)
            if prose.strip():
                report.documents += 1
                report.bytes += len(prose.encode("utf-8"))
                yield Document(id=f"stdlib/{rel}#prose", text=prose, source="prose")
