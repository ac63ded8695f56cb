"""The built-in tools: a calculator, Python in the eval sandbox, reading files in one folder, and
search over an lmforge rag index. `builtin_tools(names, ...)` builds the ones a run asks for.

Each is a `Tool` (schema.py); what it raises becomes the call's result text in the agent loop.
"""

from __future__ import annotations

import ast
import math
import operator
from pathlib import Path

from lmforge.common import LmforgeError

from .schema import Tool

BUILTIN = ("calculator", "python", "files", "rag")

# ----------------------------------------------------------------------------- calculator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 1000
MAX_RESULT_BITS = 4096  # ~1,233 decimal digits: any bigger integer is refused before it is built


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic (+ - * / // % **, parentheses, int and float literals) without eval():
    the expression is parsed with `ast` and only those nodes are walked. Names, calls, attributes,
    subscripts and strings are refused; so is a power or product whose result would pass
    MAX_RESULT_BITS, so `9**9**9` fails at once instead of eating the machine."""
    if not isinstance(expression, str):
        raise ValueError("the expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        _check_size(type(node.op), a, b)
        try:
            out = _BINARY[type(node.op)](a, b)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
        if isinstance(out, complex):
            raise ValueError("the result is not a real number")
        if isinstance(out, float) and not math.isfinite(out):
            raise ValueError("the result is not finite")
        return out
    what = {ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attribute access"}.get(type(node))
    raise ValueError(f"{what or type(node).__name__ + ' is'} not allowed in the calculator (arithmetic only)")


def _bits(x: int | float) -> float:
    return math.log2(abs(x)) if x else 0.0


def _check_size(op: type, a: int | float, b: int | float) -> None:
    """Refuse results past MAX_RESULT_BITS before computing them (only int results can grow so)."""
    if op is ast.Pow:
        if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and b * _bits(a) > MAX_RESULT_BITS:
            raise ValueError(f"the result of {a} ** {b} would have more than {MAX_RESULT_BITS} bits")
        if isinstance(b, (int, float)) and abs(b) > 1e6 and abs(a) not in (0, 1):
            raise ValueError("the exponent is too large")
    elif op is ast.Mult and isinstance(a, int) and isinstance(b, int) and _bits(a) + _bits(b) > MAX_RESULT_BITS:
        raise ValueError(f"the product would have more than {MAX_RESULT_BITS} bits")


def calculator_tool() -> Tool:
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression exactly: numbers with + - * / // % ** and parentheses.

        Args:
            expression: the arithmetic expression, numbers and operators only.
        """
        return str(calculate(expression))

    return Tool.from_function(calculator)


# ----------------------------------------------------------------------------- python (sandboxed)


def python_tool(timeout: float = 10.0, memory_mb: int = 512, max_output_chars: int = 4000) -> Tool:
    """Runs code in lmforge.eval.sandbox (bubblewrap: no network, read-only root, rlimits), never in
    this process. Where no sandbox can be built the call's result says so; it never runs unsandboxed."""
    from lmforge.eval.sandbox import run_isolated

    def python(code: str) -> str:
        """Run a Python program in a sandbox (no network, no files kept) and return what it printed.

        Args:
            code: the whole program; print() what you need to see.
        """
        res = run_isolated(code, timeout, memory_mb, 16)
        if res is None:
            return f"timed out after {timeout:g} s"
        out = res.stdout
        if res.finished:  # drop the sandbox's end marker (the last line) and the newline before it
            out = out[: out.rstrip(b"\n").rfind(b"\n")]
        text = out.decode("utf-8", "replace").rstrip("\n")
        err = res.stderr.decode("utf-8", "replace")
        parts = [text] + ([f"[stderr]\n{err}"] if err.strip() else [])
        if not res.finished:
            parts.append(f"[exit status {res.returncode}]")
        body = "\n".join(p for p in parts if p)
        return body if len(body) <= max_output_chars else body[:max_output_chars] + "\n[... output cut]"

    return Tool.from_function(python)


# ----------------------------------------------------------------------------- files in one folder


def resolve_inside(root: Path, path: str) -> Path:
    """`path` (relative to `root`) resolved, symlinks followed; ValueError if it lands outside `root`."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError(f"bad path {path!r}")
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"{path!r} is outside the folder this tool may read")
    return target


MAX_FILE_BYTES = 16 << 20


def file_tools(folder: str | Path, max_chars: int = 20_000) -> list[Tool]:
    """read_file and list_files confined to `folder`: paths are resolved (symlinks followed) and must
    stay inside it, so `..`, absolute paths and symlinks pointing out are all refused."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise LmforgeError(f"--files {folder}: {'not a folder' if root.exists() else 'no such folder'}")
    root = root.resolve()

    def read_file(path: str, start_line: int = 1, max_lines: int = 200) -> str:
        """Read a text file from the working folder.

        Args:
            path: the file's path relative to the folder.
            start_line: the first line to return (1-based).
            max_lines: how many lines to return at most.
        """
        target = resolve_inside(root, path)
        if not target.is_file():
            raise ValueError(f"{path!r}: no such file (use list_files)")
        if target.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path!r} is larger than {MAX_FILE_BYTES >> 20} MiB; this tool reads text files")
        lines = target.read_text(encoding="utf-8", errors="replace").splitlines()
        start = max(1, start_line)
        chunk = "\n".join(lines[start - 1 : start - 1 + max(1, max_lines)])
        more = len(lines) - (start - 1 + max(1, max_lines))
        chunk = chunk[:max_chars]
        return chunk + (f"\n[... {more} more lines]" if more > 0 else "")

    def list_files(subfolder: str = ".") -> str:
        """List the files under a subfolder of the working folder (paths relative to the folder).

        Args:
            subfolder: the subfolder to list ("." for the whole folder).
        """
        base = resolve_inside(root, subfolder)
        if not base.is_dir():
            raise ValueError(f"{subfolder!r}: no such folder")
        found = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.resolve().is_relative_to(root):  # a symlink out is not shown
                found.append(str(p.relative_to(root)))
            if len(found) >= 500:
                found.append("[... more files]")
                break
        return "\n".join(found) or "(no files)"

    return [Tool.from_function(read_file), Tool.from_function(list_files)]


# ----------------------------------------------------------------------------- rag search


def rag_tool(index: str | Path, top_k: int = 5, mode: str | None = None) -> Tool:
    """Search over an lmforge rag index (lmforge.rag, imported here so the agent needs it only when
    asked). `mode`: bm25 / dense / hybrid; default hybrid when the index has vectors, else bm25."""
    from lmforge.rag import RagIndex, search

    idx = RagIndex.load(index)
    mode = mode or ("hybrid" if idx.vectors is not None else "bm25")

    def rag_search(query: str) -> str:
        """Search the document index; returns the best passages with their source file and lines.

        Args:
            query: what to look for, in a few words.
        """
        hits = search(idx, query, top_k=top_k, mode=mode)
        return "\n\n".join(f"[{h.rank}] {h.chunk.file}:{h.chunk.lines}\n{h.chunk.text}" for h in hits) or "(no results)"

    return Tool.from_function(rag_search)


def builtin_tools(
    names: list[str], files: str | Path | None = None, index: str | Path | None = None, python_timeout: float = 10.0
) -> list[Tool]:
    """The built-in tools named (subset of BUILTIN); `files` is needed by "files", `index` by "rag"."""
    out: list[Tool] = []
    for name in names:
        if name == "calculator":
            out.append(calculator_tool())
        elif name == "python":
            out.append(python_tool(python_timeout))
        elif name == "files":
            if files is None:
                raise LmforgeError("the files tool needs a folder (--files DIR)")
            out += file_tools(files)
        elif name == "rag":
            if index is None:
                raise LmforgeError("the rag tool needs an index (--index INDEX, built by `lmforge rag index`)")
            out.append(rag_tool(index))
        else:
            raise LmforgeError(f"unknown tool {name!r} (built-in tools: {', '.join(BUILTIN)})")
    return out
