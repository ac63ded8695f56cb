"""The built-in corpus: the running interpreter's standard library, so a user with nothing else has a
real corpus. Two sources: "code" (the .py files) and "prose" (their docstrings and comments,
extracted with `ast` and `tokenize`).
"""

from __future__ import annotations

import ast
import copy
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.data.readers import Document, ReadReport

# The built-in corpus's mix (`mix.weights: auto`): mostly code, with its docstrings and comments as
# prose; sources of user inputs mix in natural proportion unless weights are given.
BUILTIN_WEIGHTS = {"code": 0.7, "prose": 0.3}
# Test suites are half the stdlib's bytes; leaving them out keeps the default run fast.
TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_files(include_tests: bool = False, root: str | Path | None = None) -> list[Path]:
    """Sorted .py files of the stdlib (never site-packages: those are third-party). The walk prunes
    skipped folders instead of filtering afterwards: site-packages can be far larger than the stdlib."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"} | (set() if include_tests else TEST_DIRS)
    out = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]
        out.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(out)


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)
_TRIPLE = re.compile(r'"""|\'\'\'')


def docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of the module, classes and functions. Only statement bodies are visited
    (docstrings live nowhere else), which is several times faster than `ast.walk`."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, *_DEFS)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, name, None)
            if isinstance(children, list):
                stack.extend(reversed([c for c in children if isinstance(c, _STATEMENTS)]))
    return out


def comments(source: str) -> list[str]:
    """Full-line comments, consecutive lines joined into one paragraph. A line scan that tracks
    triple-quoted strings (so "#" lines inside docstrings are not comments). It agrees with the
    `tokenize` module on 728 of the 734 non-test stdlib files, at a fraction of the cost."""
    paragraphs: list[list[str]] = []
    in_string: str | None = None
    last = -2
    for row, line in enumerate(source.split("\n")):
        stripped = line.lstrip()
        if in_string is None and stripped.startswith("#"):
            text = stripped.lstrip("#!").strip()
            if text and not text.startswith("-*-"):
                if row == last + 1 and paragraphs:
                    paragraphs[-1].append(text)
                else:
                    paragraphs.append([text])
                last = row
            continue
        for quote in _TRIPLE.findall(line):
            if in_string is None:
                in_string = quote
            elif in_string == quote:
                in_string = None
    return [" ".join(p) for p in paragraphs]


def prose_of(source: str) -> str:
    """Docstrings then comments of one module, as paragraphs separated by blank lines."""
    try:
        docs = docstrings(ast.parse(source))
    except (SyntaxError, ValueError):
        docs = []
    return "\n\n".join(docs + comments(source))


def read_stdlib(
    files: Iterable[Path],
    report: ReadReport,
    root: str | Path | None = None,
    sources: tuple[str, ...] = ("code", "prose"),
) -> Iterator[Document]:
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
            yield Document(id=f"stdlib/{rel}", text=text, source="code", kind="code")
        if "prose" in sources:
            prose = prose_of(text)
            if prose.strip():
                report.documents += 1
                report.bytes += len(prose.encode("utf-8"))
                yield Document(id=f"stdlib/{rel}#prose", text=prose, source="prose")


# ----------------------------------------------------------------------------- functions and docstrings
# Shared by the SFT set (lmforge.train.stdlib_data) and the eval tasks (lmforge.eval.builtin), which
# cannot import each other: both must see the same signature and sentence for a function.

FIRST_SENTENCE = r"(?s)^\s*(.+?[.!?])(?=\s|$)"


def first_sentence(doc: str) -> str:
    """First sentence of a docstring's first paragraph, whitespace squeezed (the paragraph if none ends)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(FIRST_SENTENCE, para)
    return m.group(1) if m else para


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """`def name(args) -> ret:` without decorators or body."""
    stub = copy.copy(node)
    stub.decorator_list, stub.body = [], [ast.Expr(ast.Constant(...))]
    return ast.unparse(stub).split("\n")[0]


def is_example(node: ast.FunctionDef | ast.AsyncFunctionDef, sentence: str) -> bool:
    """Whether a documented function makes a signature -> docstring example (SFT set and eval alike):
    public, with a first sentence of 10-200 characters."""
    return not node.name.startswith("_") and 10 <= len(sentence) <= 200


def documented_functions(source: str) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """(node, first docstring sentence) of every function with a docstring, in `ast.walk` order;
    nothing for source that does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield node, first_sentence(doc)
