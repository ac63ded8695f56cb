"""Prepare pretraining data (read, normalize, filter, dedup, mix, tokenize, pack) or check an
evaluation set for contamination by the training data.

    lmforge data prepare -o out/data                          # the built-in stdlib corpus
    lmforge data prepare corpus/*.jsonl.gz --set dedup.threshold=0.7 -o out/data
    lmforge data contamination --train out/data --eval task.jsonl --decontaminate clean.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.common import LmforgeError, atomic_path, atomic_write_json
from lmforge.recipes._common import add_deprecated_alias


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    p = sub.add_parser("prepare", help="corpus -> filtered, deduplicated, mixed token shards + stats")
    p.add_argument(
        "inputs",
        nargs="*",
        help="files, folders or globs (.txt .md .jsonl .parquet, .gz/.zst); none: the Python standard library",
    )
    p.add_argument("-o", "--out", default="out/data", help="output folder (default: %(default)s)")
    add_deprecated_alias(p, "--output", "--out")  # every other command says --out
    p.add_argument("--config", help="recipe YAML (default: lmforge/configs/data-default.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a recipe field, e.g. --set dedup.threshold=0.7 (repeatable)",
    )
    p.add_argument("--source", help="source name of the inputs (default: each file's stem)")
    p.add_argument("--text-field", help="JSONL key / parquet column of the text")
    p.add_argument("--tokenizer", help="tokenizer folder to use instead of training one")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the tokenizer trained on the corpus")
    p.add_argument("--workers", type=int, help="processes for the per-shard stages (0: all cores)")
    p.add_argument("--executor", choices=["local", "ray"], help="where the per-shard stages run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    c = sub.add_parser("contamination", help="n-gram overlap of an evaluation set with the training data")
    c.add_argument(
        "--train", nargs="+", required=True, help="a `data prepare` output folder, or training files/folders/globs"
    )
    c.add_argument("--eval", nargs="+", required=True, help="evaluation JSONL file(s)")
    c.add_argument("--field", default="text", help="JSONL key of the evaluation text (default: %(default)s)")
    c.add_argument("--train-field", default="text", help="JSONL key of the training text (default: %(default)s)")
    c.add_argument(
        "-n",
        "--ngram",
        type=int,
        default=13,
        help="n-gram length in words, a CJK character being one (default: %(default)s)",
    )
    c.add_argument("--min-overlap", type=int, help="words of overlap that count as contaminated (default: n)")
    c.add_argument("--report", help="write the per-example report here (JSON)")
    c.add_argument(
        "--decontaminate",
        metavar="OUT.jsonl",
        help="write the training documents that share no n-gram with the evaluation set",
    )


def main(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        return _prepare(args)
    return _contamination(args)


def _prepare(args: argparse.Namespace) -> int:
    from lmforge.data.config import load_config
    from lmforge.data.prepare import prepare

    values = {
        key: value
        for key, value in {
            "input.paths": list(args.inputs) or None,
            "input.source": args.source,
            "input.text_field": args.text_field,
            "tokenize.tokenizer": args.tokenizer,
            "tokenize.vocab_size": args.vocab_size,
            "workers": args.workers,
            "executor": args.executor,
        }.items()
        if value is not None
    }
    cfg = load_config(args.config, args.overrides, values)
    stats = prepare(cfg, args.out, progress=not args.no_progress)
    print((Path(args.out) / "stats.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/index.json ({stats['tokens']['train']['tokens']:,} training tokens)")
    return 0


def _train_docs(paths: list[str], field: str):
    """Training documents: a prepared folder's train_docs.jsonl, else its token shards decoded with
    its tokenizer, else text files/folders/globs."""
    from lmforge.data.readers import ReadReport, read_inputs

    report = ReadReport()
    folder = Path(paths[0])
    if len(paths) == 1 and (folder / "train_docs.jsonl").is_file():
        paths = [str(folder / "train_docs.jsonl")]
    elif len(paths) == 1 and (folder / "index.json").is_file():
        return _decoded_shards(folder), report
    return read_inputs(paths, text_field=field, report=report), report


def _decoded_shards(folder: Path):
    from lmforge.data.readers import Document
    from lmforge.data.shards import iter_shard_texts

    if not (folder / "tokenizer").is_dir():
        raise LmforgeError(f"{folder} has token shards but no tokenizer/ to decode them with")
    for i, text in enumerate(iter_shard_texts(folder, "train")):
        yield Document(id=f"{folder.name}/train#{i}", text=text, source="train")


def _contamination(args: argparse.Namespace) -> int:
    from lmforge.data.ngram import NGramIndex, check_examples, decontaminate, summarize
    from lmforge.data.readers import ReadReport, read_inputs

    eval_report = ReadReport()
    eval_docs = read_inputs(args.eval, source="eval", text_field=args.field, report=eval_report)
    examples = [(d.id, d.text) for d in eval_docs]
    if not examples:
        raise LmforgeError(f"no evaluation examples with a {args.field!r} field in {', '.join(args.eval)}")
    docs, train_report = _train_docs(args.train, args.train_field)
    if args.decontaminate:
        removed: list[str] = []
        eval_index = NGramIndex.build((t for _, t in examples), args.ngram)
        kept = _write_jsonl(args.decontaminate, decontaminate(docs, eval_index, removed))
        print(f"decontaminated: kept {kept:,} training documents, removed {len(removed):,} -> {args.decontaminate}")
        docs, _ = _train_docs(args.train, args.train_field)
    index = NGramIndex.build((d.text for d in docs), args.ngram)
    results = check_examples(index, examples, args.min_overlap)
    summary = summarize(results) | {
        "ngram": args.ngram,
        "train_ngrams": len(index),
        "eval_skipped": eval_report.skipped,
        "train_skipped": train_report.skipped,
    }
    _print_table(results, summary)
    if args.report:
        atomic_write_json(args.report, {"summary": summary, "examples": [r.to_dict() for r in results]})
    return 0


def _write_jsonl(path: str, docs) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def _print_table(results, summary: dict) -> None:
    flagged = [r for r in results if r.contaminated]
    print(
        f"{summary['contaminated']} of {summary['examples']} evaluation examples contaminated "
        f"({summary['contaminated_fraction']:.1%}; {summary['ngram']}-grams, "
        f"{summary['too_short']} too short to check)"
    )
    if flagged:
        print(f"{'example':<40} {'longest overlap (words)':>24} {'matched n-grams':>16}")
        for r in flagged[:50]:
            print(f"{r.id[:40]:<40} {r.longest_overlap:>24} {r.matched:>10}/{r.ngrams:<5}")
        if len(flagged) > 50:
            print(f"... and {len(flagged) - 50} more (see --report)")
