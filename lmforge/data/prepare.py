"""`prepare`: the whole data recipe, stage by stage, into an output folder:

work/            per-unit intermediates (resume state)
dedup/clusters.jsonl   what was merged: kept id, kind (exact|near), member ids
rejected.jsonl   every filtered-out document with the rule that rejected it (and its language)
tokenizer/       the tokenizer the shards were made with
train-00000.bin ... val-00000.bin, index.json   token shards for `ShardLoader`
train_docs.jsonl the deduplicated training documents (input of the contamination check)
stats.json, stats.md   documents and bytes through every stage, rejections, clusters, tokens
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_path, atomic_write_json, atomic_write_text, get_logger
from lmforge.data.config import DataConfig
from lmforge.data.dedup import MinHasher, near_duplicates
from lmforge.data.mix import MixItem, check_sources, mix, resolve_weights
from lmforge.data.report import merge_unit_stats, render_markdown
from lmforge.data.shards import ShardWriter, is_validation, tokenize_texts, write_index
from lmforge.data.stdlib import BUILTIN_WEIGHTS
from lmforge.data.units import WorkUnit, default_workers, iter_unit_docs, plan_units, run_units, unit_stats

log = get_logger("lmforge.data")


@dataclass
class Corpus:
    """Metadata of every document that passed the filters, in global order (units in order)."""

    unit: np.ndarray  # [n] unit index
    local: np.ndarray  # [n] line in the unit's docs.jsonl
    ids: list[str]
    sources: list[str]
    hashes: list[str]
    nbytes: np.ndarray  # [n] UTF-8 bytes of the text


def load_corpus(units: list[WorkUnit], work: Path) -> Corpus:
    unit, local, ids, sources, hashes, nbytes = [], [], [], [], [], []
    for u in units:
        for i, rec in enumerate(iter_unit_docs(u, work)):
            unit.append(u.index)
            local.append(i)
            ids.append(rec["id"])
            sources.append(rec["source"])
            hashes.append(rec["hash"])
            nbytes.append(rec["bytes"])
    return Corpus(
        np.array(unit, dtype=np.int64),
        np.array(local, dtype=np.int64),
        ids,
        sources,
        hashes,
        np.array(nbytes, dtype=np.int64),
    )


def texts_of(units: list[WorkUnit], work: Path, corpus: Corpus, indices: list[int]) -> dict[int, str]:
    """Texts of a few documents, reading each unit file once."""
    wanted: dict[int, dict[int, int]] = {}
    for g in indices:
        wanted.setdefault(int(corpus.unit[g]), {})[int(corpus.local[g])] = g
    out = {}
    for u in units:
        if u.index in wanted:
            lines = wanted[u.index]
            for i, rec in enumerate(iter_unit_docs(u, work)):
                if i in lines:
                    out[lines[i]] = rec["text"]
    return out


def global_dedup(units: list[WorkUnit], work: Path, corpus: Corpus, cfg: DataConfig) -> tuple[np.ndarray, dict]:
    """-> (cluster: index of each document's kept representative, stats); writes dedup/clusters.jsonl."""
    n = len(corpus.ids)
    cluster = np.arange(n, dtype=np.int64)
    if cfg.dedup.exact:
        first: dict[str, int] = {}
        for i, h in enumerate(corpus.hashes):
            cluster[i] = first.setdefault(h, i)
    exact_removed = int((cluster != np.arange(n)).sum())
    unique = np.flatnonzero(cluster == np.arange(n))
    stats = {
        "exact_duplicates": exact_removed,
        "near_duplicates": 0,
        "candidate_pairs": 0,
        "verified_pairs": 0,
        "lsh_threshold": round(cfg.dedup.lsh_threshold, 4),
        "threshold": cfg.dedup.threshold,
    }
    if cfg.dedup.near and len(unique) > 1:
        sigs = np.concatenate([np.load(work / f"{u.stem}.sig.npy") for u in units])[unique]
        hasher = MinHasher.from_config(cfg.dedup)

        def shingle_sets(local_idx: list[int]) -> dict[int, np.ndarray]:
            texts = texts_of(units, work, corpus, [int(unique[k]) for k in local_idx])
            return {k: hasher.shingle_set(texts[int(unique[k])]) for k in local_idx}

        near = near_duplicates(sigs, cfg.dedup, shingle_sets)
        rep = unique[near.cluster]
        cluster = rep[np.searchsorted(unique, cluster)]
        stats.update(
            near_duplicates=int((~near.keep).sum()), candidate_pairs=near.candidates, verified_pairs=near.verified
        )
    stats["clusters"] = _write_clusters(work.parent / "dedup" / "clusters.jsonl", cluster, corpus)
    keep = cluster == np.arange(n)
    stats["documents_kept"] = int(keep.sum())
    stats["bytes_kept"] = int(corpus.nbytes[keep].sum())
    return cluster, stats


def _write_clusters(path: Path, cluster: np.ndarray, corpus: Corpus) -> int:
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cluster.tolist()):
        if i != c:
            members.setdefault(c, []).append(i)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for c in sorted(members):
            kinds = {"exact" if corpus.hashes[m] == corpus.hashes[c] else "near" for m in members[c]}
            f.write(
                json.dumps(
                    {
                        "kept": corpus.ids[c],
                        "kind": "+".join(sorted(kinds)),
                        "members": [corpus.ids[m] for m in members[c]],
                    }
                )
                + "\n"
            )
    return len(members)


def get_tokenizer(cfg: DataConfig, units: list[WorkUnit], work: Path, corpus: Corpus, train_mask: np.ndarray):
    """The given tokenizer, else one trained on the training documents (reused on a re-run when
    neither the tokenizer settings nor the training documents changed)."""
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    if cfg.tokenize.tokenizer:
        return Tokenizer.load(cfg.tokenize.tokenizer)
    # a seeded sample of about train_bytes spread over the whole corpus (a prefix would see only
    # the first sources/files); chosen by a hash of the id, like the validation split
    share = cfg.tokenize.train_bytes / max(int(corpus.nbytes[train_mask].sum()), 1)
    chosen = [g for g in np.flatnonzero(train_mask).tolist() if is_validation(corpus.ids[g], share, seed=1)]
    key = json.dumps([cfg.tokenize.vocab_size, [corpus.hashes[g] for g in chosen]])
    stamp, saved = work / "tokenizer.stamp", work.parent / "tokenizer"
    digest = hashlib.sha256(key.encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest and (saved / "tokenizer.json").is_file():
        return Tokenizer.load(saved)
    wanted = set(chosen)

    def sample():
        g = 0
        for u in units:
            for rec in iter_unit_docs(u, work):
                if g in wanted:
                    yield rec["text"]
                g += 1

    log.info(
        "training a %d-token BPE tokenizer on %d documents (%d bytes)",
        cfg.tokenize.vocab_size,
        len(chosen),
        int(corpus.nbytes[chosen].sum()),
    )
    tokenizer = train_tokenizer(sample(), vocab_size=cfg.tokenize.vocab_size)
    tokenizer.save(saved)
    atomic_write_text(stamp, digest)
    return tokenizer


def tokenize_units(
    units: list[WorkUnit], work: Path, keep: np.ndarray, corpus: Corpus, tokenizer, cfg: DataConfig, progress: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Tokens of every kept document, per unit: (flat ids, offsets [docs in unit + 1]), written to
    work/ and memory-mapped back, so memory stays flat; a unit tokenized by the same tokenizer and
    the same dedup result before is reused (resume)."""
    from tqdm import tqdm

    tok_id = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:16]
    flats, offsets = [], []
    for u in tqdm(units, desc="tokenize", unit="unit", disable=not progress):
        kept_local = set(corpus.local[(corpus.unit == u.index) & keep].tolist())
        stamp = f"{tok_id}:{hashlib.sha256(str(sorted(kept_local)).encode()).hexdigest()[:16]}"
        flat_path, off_path, done = (
            work / f"{u.stem}.tok.npy",
            work / f"{u.stem}.tok_offsets.npy",
            work / f"{u.stem}.tok.done",
        )
        if not (done.is_file() and done.read_text() == stamp):
            texts = (rec["text"] if i in kept_local else "" for i, rec in enumerate(iter_unit_docs(u, work)))
            arrays = list(tokenize_texts(tokenizer, texts, cfg.tokenize.batch_size))
            for path, arr in (
                (off_path, np.cumsum([0] + [len(a) for a in arrays])),
                (flat_path, np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint32)),
            ):
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, arr)
            atomic_write_text(done, stamp)
        flats.append(np.load(flat_path, mmap_mode="r"))
        offsets.append(np.load(off_path))
    return flats, offsets


def _pack_split(
    out: Path, split: str, order: list[int], corpus: Corpus, flats, offsets, tokenizer, cfg: DataConfig
) -> dict:
    writer = ShardWriter(out, split, tokenizer.vocab_size, tokenizer.eos_id, cfg.pack.shard_tokens)
    for g in order:
        u, i = int(corpus.unit[g]), int(corpus.local[g])
        writer.add(flats[u][offsets[u][i] : offsets[u][i + 1]])
    return writer.close()


def _write_train_docs(out: Path, units: list[WorkUnit], work: Path, train_keep: np.ndarray) -> None:
    g = 0
    with atomic_path(out / "train_docs.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for u in units:
            for rec in iter_unit_docs(u, work):
                if train_keep[g]:
                    f.write(
                        json.dumps({"id": rec["id"], "source": rec["source"], "text": rec["text"]}, ensure_ascii=False)
                        + "\n"
                    )
                g += 1


def prepare(cfg: DataConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Run every stage; -> the stats (also written as stats.json and stats.md)."""
    t0 = time.perf_counter()
    timing: dict[str, float] = {}

    def lap(stage: str) -> None:
        timing[stage] = round(time.perf_counter() - t0 - sum(timing.values()), 2)

    out, work = Path(out_dir), Path(out_dir) / "work"
    weights = resolve_weights(cfg.mix.weights, BUILTIN_WEIGHTS if cfg.input.paths is None else None)
    units = plan_units(cfg)
    workers = cfg.workers or default_workers()
    resumed = run_units(units, cfg, work, workers, progress)
    lap("read_normalize_filter_minhash")
    unit_stat = merge_unit_stats([unit_stats(u, work) for u in units])
    _log_filter_scope(cfg, unit_stat)
    corpus = load_corpus(units, work)
    if not corpus.ids:
        _merge_rejected(units, work, out)  # the message points to it: it must exist
        raise LmforgeError(
            f"every document was filtered out: nothing to deduplicate or pack (rules: "
            f"{json.dumps(unit_stat['rejected'])}; each document in {out / 'rejected.jsonl'})"
        )
    if weights:
        check_sources(weights, corpus.sources)  # fail before the tokenizer, not after it
    cluster, dedup_stats = global_dedup(units, work, corpus, cfg)
    keep = cluster == np.arange(len(cluster))
    val = np.array([is_validation(i, cfg.pack.val_fraction, cfg.pack.seed) for i in corpus.ids], dtype=bool)
    lap("dedup")
    tokenizer = get_tokenizer(cfg, units, work, corpus, keep & ~val)
    tokenizer.save(out / "tokenizer")
    lap("tokenizer")
    flats, offsets = tokenize_units(units, work, keep, corpus, tokenizer, cfg, progress)
    lap("tokenize")
    ntok = np.array([int(offsets[u][i + 1] - offsets[u][i]) for u, i in zip(corpus.unit, corpus.local)], dtype=np.int64)
    train_idx = np.flatnonzero(keep & ~val)
    items = [MixItem(int(g), corpus.sources[g], int(ntok[g]) + 1) for g in train_idx]
    log.info("mix: %s", f"weights {weights}" if weights else "the natural proportions of the sources")
    train_order, mix_report = mix(items, weights, cfg.mix.seed, cfg.mix.total_tokens)
    splits = {
        "train": _pack_split(out, "train", train_order, corpus, flats, offsets, tokenizer, cfg),
        "val": _pack_split(out, "val", np.flatnonzero(keep & val).tolist(), corpus, flats, offsets, tokenizer, cfg),
    }
    write_index(out, splits, tokenizer.vocab_size, tokenizer.eos_id)
    _write_train_docs(out, units, work, keep & ~val)
    _merge_rejected(units, work, out)
    lap("mix_pack_write")
    seconds = time.perf_counter() - t0
    stats = unit_stat
    stats["filter_scope"]["applies_to"] = cfg.filters.sources if cfg.filters.sources is not None else "prose"
    stats.update(
        dedup=dedup_stats,
        mix=mix_report,
        mix_weights=weights or "natural",
        workers=workers,
        work_units=len(units),
        resumed_units=resumed,
        tokens={
            s: {"tokens": v["tokens"], "documents": v["documents"], "shards": len(v["shards"])}
            for s, v in splits.items()
        },
        vocab_size=tokenizer.vocab_size,
        seconds=round(seconds, 2),
        stage_seconds=timing,
        mb_per_s=round(stats["read"]["bytes"] / 1e6 / max(seconds, 1e-9), 2),
    )
    atomic_write_json(out / "stats.json", stats)
    atomic_write_text(out / "stats.md", render_markdown(stats))
    return stats


def _log_filter_scope(cfg: DataConfig, stats: dict) -> None:
    """How many documents the language filter and quality rules saw: a scope that matches nothing
    (e.g. `filters.sources` naming a source the input lacks) must not pass silently."""
    scope = stats["filter_scope"]
    seen, total = scope["checked"], scope["checked"] + scope["not_checked"]
    which = f"sources {', '.join(cfg.filters.sources)}" if cfg.filters.sources is not None else "prose documents"
    log.info(
        "filters (%s): checked %d of %d documents, rejected %d", which, seen, total, sum(stats["rejected"].values())
    )
    if total and not seen and cfg.filters.sources is not None:  # by default: all input is code, rightly unfiltered
        log.warning(
            "the filters checked no document: filters.sources %s matches none of the sources %s",
            cfg.filters.sources,
            ", ".join(sorted(stats["by_source"])) or "(none kept)",
        )


def _merge_rejected(units: list[WorkUnit], work: Path, out: Path) -> None:
    with atomic_path(out / "rejected.jsonl") as tmp, open(tmp, "wb") as f:
        for u in units:
            with open(work / f"{u.stem}.rejected.jsonl", "rb") as src:
                shutil.copyfileobj(src, f)
