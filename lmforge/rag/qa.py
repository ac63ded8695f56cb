"""The built-in RAG set from the standard library: "What does `module.function` do?" -> the first sentence
of its docstring, with the function's file and `def` line as the passage to find.

Questions come from the held-out modules only (the pipeline's validation split, as the built-in eval
tasks: `lmforge.eval.builtin.held_out`), and the corpus to search is those modules' source. The
bi-encoder trains on the other modules (`training_pairs`), so neither retrieval nor reading has seen a
test module.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

from lmforge.data.stdlib import first_sentence, is_example, stdlib_files
from lmforge.eval.builtin import BuiltinConfig, held_out
from lmforge.rag.chunking import Chunk

QUESTION = "What does `{name}` do?"


def module_name(rel: str) -> str:
    """ "json/decoder.py" -> "json.decoder"; "json/__init__.py" -> "json"."""
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def documented(source: str) -> list[tuple[str, int, str]]:
    """(qualified name within the module, def line, first docstring sentence) of each public documented
    function and method (methods as Class.method); the SFT set's rule decides which count."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []

    def visit(body: list, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    sentence = first_sentence(doc)
                    if is_example(node, sentence) and len(sentence.split()) >= 3:
                        out.append((prefix + node.name, node.lineno, sentence))

    visit(tree.body, "")
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _examples(files: list[tuple[str, Path]], base: Path) -> list[dict]:
    out, seen = [], set()
    for _, path in files:
        module = module_name(path.relative_to(base).as_posix()) if path.is_relative_to(base) else path.stem
        for name, line, sentence in documented(_read(path) or ""):
            qualified = f"{module}.{name}"
            if sentence in seen or qualified in seen:
                continue  # a sentence shared by several functions cannot tell them apart
            seen.update((sentence, qualified))
            out.append(
                {
                    "id": f"{qualified}:{line}",
                    "question": QUESTION.format(name=qualified),
                    "answer": sentence,
                    "sources": [{"file": str(path), "line": line}],
                }
            )
    return out


def builtin_qa(cfg: BuiltinConfig | None = None, num_examples: int | None = 200) -> tuple[list[dict], list[Path]]:
    """(questions, corpus files) of the held-out modules; `num_examples` seeded sample (None: all)."""
    cfg = cfg or BuiltinConfig()
    base = Path(cfg.root) if cfg.root else _stdlib_root()
    files = held_out(cfg)
    examples = _examples(files, base)
    if num_examples is not None and len(examples) > num_examples:
        examples = sorted(random.Random(cfg.seed).sample(examples, num_examples), key=lambda e: e["id"])
    return examples, [p for _, p in files]


def _stdlib_root() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def training_pairs(
    cfg: BuiltinConfig | None = None, max_files: int | None = None, max_chars: int = 800, overlap: int = 150
) -> list[tuple[str, str]]:
    """(query, passage) pairs from the modules that are not held out: the query is the function's
    docstring sentence or its question, the passage the chunk holding its `def` line (chunked as an
    index chunks a file, so training sees what search will)."""
    from lmforge.rag.chunking import chunk_text
    from lmforge.rag.index import indexed_text

    cfg = cfg or BuiltinConfig()
    base = Path(cfg.root) if cfg.root else _stdlib_root()
    held = {p for _, p in held_out(cfg)}
    files = [f for f in stdlib_files(root=base) if f not in held]
    if max_files is not None:
        files = files[:: max(1, len(files) // max_files)][:max_files]
    pairs = []
    for path in files:
        examples = _examples([(str(path), path)], base)
        if not examples:
            continue
        chunks = chunk_text(_read(path) or "", str(path), code=True, max_chars=max_chars, overlap=overlap)
        for ex in examples:
            line = ex["sources"][0]["line"]
            chunk = next((c for c in chunks if c.start_line <= line <= c.end_line), None)
            if chunk is not None:
                pairs += [(ex["answer"], indexed_text(chunk)), (ex["question"], indexed_text(chunk))]
    return pairs


def is_relevant(chunk: Chunk, sources: list[dict]) -> bool:
    """A chunk answers a question when it is in a source file, of the source's record (a JSONL line "L3"
    or id) if it names one, and spans the source's line if it names one."""
    for s in sources:
        same = chunk.file == s["file"] or Path(chunk.file).resolve() == Path(s["file"]).resolve()
        same = same and ("record" not in s or chunk.record == s["record"])
        if same and ("line" not in s or chunk.start_line <= int(s["line"]) <= chunk.end_line):
            return True
    return False
