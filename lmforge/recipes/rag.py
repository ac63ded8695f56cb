"""Retrieval-augmented answers: index documents, search them, answer questions citing the passages.

    lmforge rag index docs/ notes.md -o runs/rag/index [--embedder runs/rag/encoder]   # re-run: changed files only
    lmforge rag search runs/rag/index "how is the cache cleared?" --top-k 5 --json
    lmforge rag ask runs/rag/index "how is the cache cleared?" --model runs/pipeline-tiny/final
    lmforge rag ask runs/rag/index "..." --endpoint http://localhost:8000       # any OpenAI-compatible server
    lmforge rag train-encoder --out runs/rag/encoder          # bi-encoder on the stdlib (docstring <-> code)
    lmforge rag benchmark --out runs/rag/bench --embedder runs/rag/encoder    # BM25 / dense / hybrid table

Needs the `rag` extra (bm25s, faiss-cpu, jieba): pip install 'lmforge[rag]'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_json, atomic_write_text, get_logger

log = get_logger("lmforge.rag")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=int, default=5, help="passages retrieved (default: %(default)s)")
    p.add_argument(
        "--mode", choices=["bm25", "dense", "hybrid"], help="retrieval (default: hybrid when the index has vectors)"
    )
    p.add_argument("--rerank", metavar="MODEL", help="rerank the candidates by this model's log p(query | passage)")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the results as JSON lines to this file (no value: to stdout, instead of the text view)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    p = sub.add_parser("index", help="files/folders -> a searchable index (incremental: changed files only)")
    p.add_argument("inputs", nargs="+", help="files, folders or globs (.txt .md .jsonl .parquet, source files)")
    p.add_argument("-o", "--out", required=True, help="the index folder")
    p.add_argument("--embedder", help="embedding model folder (HF encoder or `rag train-encoder`): adds dense search")
    p.add_argument("--chunk-chars", type=int, default=800, help="characters per chunk (default: %(default)s)")
    p.add_argument("--overlap", type=int, default=150, help="characters shared by neighbouring chunks")
    p.add_argument("--chinese", choices=["bigram", "jieba"], default="bigram", help="Chinese BM25 terms")
    p.add_argument("--text-field", default="text", help="JSONL key / parquet column of the text")

    s = sub.add_parser("search", help="the ranked passages for a query (score, file, line span)")
    s.add_argument("index", help="an index folder (`lmforge rag index`)")
    s.add_argument("query")
    _add_output(s)

    a = sub.add_parser("ask", help="answer a question from retrieved passages, citing them as [n]")
    a.add_argument("index", help="an index folder (`lmforge rag index`)")
    a.add_argument("question")
    who = a.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="a local model folder (lmforge checkpoint or HF folder)")
    who.add_argument("--endpoint", help="an OpenAI-compatible server URL (chat completions)")
    a.add_argument("--max-new-tokens", type=int, default=128, help="the most tokens of the answer")
    _add_output(a)
    a.set_defaults(top_k=3)

    t = sub.add_parser("train-encoder", help="train a bi-encoder on the stdlib (docstring/question <-> code)")
    t.add_argument("-o", "--out", required=True, help="the encoder folder")
    t.add_argument("--steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    t.add_argument("--max-files", type=int, help="train on this many stdlib modules only (a quick run)")
    t.add_argument(
        "--text",
        choices=["trigrams", "terms", "raw"],
        default="trigrams",
        help="what the encoder reads: hashed words + letter trigrams (DSSM), BPE over the BM25 terms, or raw text",
    )

    b = sub.add_parser("benchmark", help="retrieval table (BM25 / dense / hybrid) on the built-in stdlib QA set")
    b.add_argument("-o", "--out", required=True, help="folder for qa.jsonl, the index and report.json")
    b.add_argument("--embedder", help="embedding model folder: adds the dense and hybrid rows")
    b.add_argument("--reader", help="a model fine-tuned on `rag reader-data`: adds RAG vs no-RAG answer scores")

    r = sub.add_parser("reader-data", help="SFT examples (passage + question -> cited answer) from the stdlib")
    r.add_argument("-o", "--out", required=True, help="the JSONL file to write (chat messages)")
    r.add_argument("--max-files", type=int, help="read this many stdlib modules only (a quick run)")
    r.add_argument(
        "--closed-book",
        type=float,
        default=0.15,
        help="share of examples asked without a passage (the same model's no-RAG baseline; default: %(default)s)",
    )
    r.add_argument(
        "--counterfactual",
        type=float,
        default=0.3,
        help="share of passage examples whose sentence is swapped for another function's, then the answer "
        "(the reader must copy, not recall; default: %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    return {
        "index": cmd_index,
        "search": cmd_search,
        "ask": cmd_ask,
        "train-encoder": cmd_train_encoder,
        "benchmark": cmd_benchmark,
        "reader-data": cmd_reader_data,
    }[args.action](args)


def _settings(args: argparse.Namespace, embedder_dir: str | None):
    from lmforge.rag.dense import fingerprint
    from lmforge.rag.index import IndexSettings

    folder = str(Path(embedder_dir).resolve()) if embedder_dir else None
    return IndexSettings(
        max_chars=getattr(args, "chunk_chars", 800),
        overlap=getattr(args, "overlap", 150),
        chinese=getattr(args, "chinese", "bigram"),
        text_field=getattr(args, "text_field", "text"),
        embedder=folder,
        embedder_fingerprint=fingerprint(folder) if folder else None,
    )


def cmd_index(args: argparse.Namespace) -> int:
    from lmforge.rag.embedders import load_embedder
    from lmforge.rag.index import build_index

    embedder = load_embedder(args.embedder) if args.embedder else None
    stats = build_index(args.inputs, args.out, _settings(args, args.embedder), embedder)
    print(
        f"{args.out}: {stats['chunks']} chunks from {stats['files']} files "
        f"({stats['reindexed']} indexed, {stats['reused']} unchanged, {stats['removed']} removed) in {stats['seconds']} s"
    )
    return 0


def _retrieve(args: argparse.Namespace, query: str):
    from lmforge.rag.index import RagIndex
    from lmforge.rag.retrieve import search

    index = RagIndex.load(args.index)
    mode = args.mode or ("hybrid" if index.vectors is not None else "bm25")
    reranker = None
    if args.rerank:
        from lmforge.eval.lm import load_lm

        reranker = load_lm(args.rerank)
    return search(index, query, args.top_k, mode, reranker=reranker)


def _emit(args: argparse.Namespace, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.json == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(args.json, text)


def cmd_search(args: argparse.Namespace) -> int:
    hits = _retrieve(args, args.query)
    if args.json:
        _emit(args, [h.to_dict() for h in hits])
    if args.json != "-":
        for h in hits:
            c = h.chunk
            first = c.text.strip().splitlines()[0][:100] if c.text.strip() else ""
            print(f"{h.rank:>2}. {h.score:.4f}  {c.id}  ({c.title})\n    {first}")
        if not hits:
            print("no passage shares a term with the query")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from lmforge.eval.lm import EndpointLM, LocalLM
    from lmforge.rag.answer import answer_batch

    hits = _retrieve(args, args.question)
    lm = EndpointLM(args.endpoint, chat=True) if args.endpoint else LocalLM.load(args.model)
    ans = answer_batch(lm, [args.question], [hits], args.max_new_tokens)[0]
    if args.json:
        _emit(args, [ans.to_dict()])
    if args.json != "-":
        print(ans.text or "(empty answer)")
        if ans.invalid_citations:
            print(f"(cites passages that were not given: {ans.invalid_citations})")
        print("\nSources:")
        for n, h in enumerate(hits, start=1):
            mark = "*" if n in ans.citations else " "
            print(f"{mark}[{n}] {h.chunk.file}:{h.chunk.start_line}-{h.chunk.end_line}  ({h.chunk.title})")
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    import tempfile

    from lmforge.rag.biencoder import BiEncoderConfig, train_biencoder
    from lmforge.rag.training import DevSet, split_modules, training_triples

    if args.steps < 1:
        raise LmforgeError(f"--steps must be >= 1, got {args.steps}")
    if args.max_files is not None and args.max_files < 2:
        raise LmforgeError(f"--max-files must be >= 2, got {args.max_files}")
    split = split_modules()
    train, dev = split.train, split.dev
    if args.max_files is not None:  # an even sample of the modules, and a dev split in proportion
        train = train[:: max(1, len(train) // args.max_files)][: args.max_files]
        dev = dev[:: max(1, len(dev) // max(2, args.max_files // 5))][: max(2, args.max_files // 5)]
    triples = training_triples(train, split.base)
    log.info("%d training examples from %d modules; dev: %d modules", len(triples), len(train), len(dev))
    with tempfile.TemporaryDirectory() as tmp:
        devset = DevSet(dev, split.base, Path(tmp) / "dev")

        def on_eval(encoder, step: int) -> float:
            devset.attach(encoder)
            m = devset.score(["dense"])["dense"]
            log.info(
                "dev (%d questions) at step %d: dense recall@5 %.3f MRR %.3f",
                len(devset.examples),
                step,
                m["recall@5"],
                m["mrr"],
            )
            return m["mrr"]

        if not devset.examples:
            log.warning("the dev modules hold no question: the last step's weights and RRF fusion are kept")
        cfg = BiEncoderConfig(steps=args.steps, text=args.text)
        check = on_eval if devset.examples else None
        encoder = train_biencoder(triples, None, cfg, check, eval_every=max(50, args.steps // 6))
        devset.attach(encoder)
        fusion = devset.tune_fusion()
    fusion["split"] = {"train_modules": len(train), "dev_modules": len(dev), "test_modules": len(split.test)}
    encoder.save(args.out, extra={"fusion.json": fusion})
    alpha = f" alpha {fusion['alpha']}" if fusion["alpha"] is not None else ""
    dev_note = f" (dev recall@5 {fusion['dev']['recall@5']:.3f})" if fusion["dev"] else " (no dev question)"
    print(
        f"{args.out}: bi-encoder trained on {len(triples)} examples, {args.steps} steps; hybrid fusion "
        f"{fusion['fusion']}{alpha}{dev_note}"
    )
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from lmforge.rag.bench import retrieval_table

    out = Path(args.out)
    report = retrieval_table(out, args.embedder, _settings(args, args.embedder), args.reader)
    atomic_write_json(out / "report.json", report)
    print(
        f"{'retriever':<10} {'recall@1':>9} {'recall@5':>9} {'recall@10':>9} {'MRR':>7}  ({report['questions']} questions)"
    )
    for name, m in report["retrieval"].items():
        print(f"{name:<10} {m['recall@1']:>9.3f} {m['recall@5']:>9.3f} {m['recall@10']:>9.3f} {m['mrr']:>7.3f}")
    if report.get("fusion"):
        f = report["fusion"]
        print(
            f"hybrid fusion: {f['fusion']}" + (f" alpha {f['alpha']} (the encoder's fusion.json)" if f["alpha"] else "")
        )
    for name, m in report.get("chinese", {}).items():
        print(f"Chinese BM25, {name:<7} recall@1 {m['recall@1']:.3f}  recall@5 {m['recall@5']:.3f}  MRR {m['mrr']:.3f}")
    for name, m in report.get("answers", {}).items():
        print(f"answers, {name:<7} ROUGE-L {m['rouge_l']:.3f}  F1 {m['f1']:.3f}  cites {m['citation_rate']:.2f}")
    print(f"report: {out / 'report.json'}")
    return 0


def cmd_reader_data(args: argparse.Namespace) -> int:
    from lmforge.rag.reader import reader_examples

    for flag in ("closed_book", "counterfactual"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            raise LmforgeError(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(args, flag)}")
    rows = reader_examples(max_files=args.max_files, closed_book=args.closed_book, counterfactual=args.counterfactual)
    if not rows:
        raise LmforgeError("no reader example found (no documented public function in the modules read)")
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} examples (train with `lmforge sft --data {args.out}`)")
    return 0
