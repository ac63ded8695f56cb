"""The per-shard half of `prepare`: read -> normalize -> filter -> exact hash + MinHash signature,
one work unit (a group of input files) at a time, on a local process pool or on Ray.

Each unit writes its kept documents, signatures and rejections under `work/`, then a `done.json`
marker last; a re-run skips units whose marker carries the same settings (resume after a crash).
Units are independent, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_path, atomic_write_json, get_logger
from lmforge.data.config import DataConfig
from lmforge.data.dedup import MinHasher, exact_hash
from lmforge.data.filters import apply_filters
from lmforge.data.normalize import normalize_text
from lmforge.data.readers import Document, ReadReport, expand_inputs, read_files
from lmforge.data.stdlib import read_stdlib, stdlib_files

log = get_logger("lmforge.data")


@dataclass
class WorkUnit:
    index: int
    paths: list[str]
    stdlib: bool = False  # the paths are stdlib modules (code + prose documents per file)

    @property
    def stem(self) -> str:
        return f"unit-{self.index:05d}"


def plan_units(cfg: DataConfig) -> list[WorkUnit]:
    """Consecutive input files grouped into units of about `input.shard_bytes` bytes."""
    stdlib = cfg.input.paths is None
    files = stdlib_files(cfg.input.stdlib_include_tests) if stdlib else expand_inputs(cfg.input.paths)
    if not files:
        raise LmforgeError(f"no input files found in {cfg.input.paths}")
    units, group, size = [], [], 0
    for f in files:
        group.append(str(f))
        size += f.stat().st_size
        if size >= cfg.input.shard_bytes:
            units.append(WorkUnit(len(units), group, stdlib))
            group, size = [], 0
    if group:
        units.append(WorkUnit(len(units), group, stdlib))
    return units


def fingerprint(cfg: DataConfig, unit: WorkUnit) -> str:
    """What a unit's output depends on: its files and the settings of the per-unit stages."""
    d = cfg.to_dict()
    key = {k: d[k] for k in ("input", "normalize", "filters", "dedup")} | {"paths": unit.paths}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _documents(unit: WorkUnit, cfg: DataConfig, report: ReadReport) -> Iterator[Document]:
    paths = [Path(p) for p in unit.paths]
    if unit.stdlib:
        return read_stdlib(paths, report)
    return read_files(paths, cfg.input.source, report, cfg.input.text_field)


def _bump(stage: dict, docs: int, nbytes: int) -> None:
    stage["documents"] = stage.get("documents", 0) + docs
    stage["bytes"] = stage.get("bytes", 0) + nbytes


def process_unit(unit: WorkUnit, cfg: DataConfig, work_dir: str) -> dict:
    """Run the per-document stages on one unit; returns (and writes) its stats."""
    work = Path(work_dir)
    report = ReadReport()
    hasher = MinHasher.from_config(cfg.dedup) if cfg.dedup.near else None
    stats: dict = {
        "normalized": {},
        "filtered": {},
        "rejected": {},
        "by_source": {},
        "by_language": {},
        "filter_scope": {"checked": 0, "not_checked": 0},
    }
    sigs: list = []  # shingle hashes of the kept documents; signatures in one batch at the end
    with (
        atomic_path(work / f"{unit.stem}.docs.jsonl") as docs_tmp,
        atomic_path(work / f"{unit.stem}.rejected.jsonl") as rej_tmp,
        open(docs_tmp, "w", encoding="utf-8") as docs_f,
        open(rej_tmp, "w", encoding="utf-8") as rej_f,
    ):
        for doc in _documents(unit, cfg, report):
            text = normalize_text(doc.text, cfg.normalize)
            _bump(stats["normalized"], 1, len(text.encode("utf-8")))
            rule, lang = ("empty_after_normalize", "unknown") if not text.strip() else (None, None)
            if rule is None:
                scope = "checked" if cfg.filters.applies_to(doc.source, doc.kind) else "not_checked"
                stats["filter_scope"][scope] += 1
                text, rule, lang = apply_filters(text, doc.source, cfg.filters, doc.kind)
            if rule is not None:
                stats["rejected"][rule] = stats["rejected"].get(rule, 0) + 1
                rej_f.write(
                    json.dumps({"id": doc.id, "source": doc.source, "rule": rule, "lang": lang}, ensure_ascii=False)
                    + "\n"
                )
                continue
            nbytes = len(text.encode("utf-8"))
            _bump(stats["filtered"], 1, nbytes)
            _bump(stats["by_source"].setdefault(doc.source, {}), 1, nbytes)
            _bump(stats["by_language"].setdefault(lang, {}), 1, nbytes)
            record = {
                "id": doc.id,
                "source": doc.source,
                "kind": doc.kind,
                "lang": lang,
                "bytes": nbytes,
                "hash": exact_hash(text),
                "text": text,
            }
            docs_f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if hasher is not None:
                sigs.append(hasher.shingle_hashes(text))
    num_perm = cfg.dedup.num_perm
    with atomic_path(work / f"{unit.stem}.sig.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, hasher.signatures_of_hashes(sigs) if hasher else np.zeros((0, num_perm), dtype=np.uint32))
    stats["read"] = report.to_dict()
    atomic_write_json(work / f"{unit.stem}.done.json", {"fingerprint": fingerprint(cfg, unit), "stats": stats})
    return stats


def _is_done(unit: WorkUnit, cfg: DataConfig, work: Path) -> bool:
    marker = work / f"{unit.stem}.done.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["fingerprint"] == fingerprint(cfg, unit)
    except (ValueError, KeyError):
        return False


def _call(args: tuple) -> dict:  # module-level so a process pool can pickle it
    return process_unit(*args)


def run_units(units: list[WorkUnit], cfg: DataConfig, work: Path, workers: int, progress: bool = True) -> int:
    """Process the units not already done; -> how many were skipped as finished."""
    from tqdm import tqdm

    work.mkdir(parents=True, exist_ok=True)
    todo = [u for u in units if not _is_done(u, cfg, work)]
    if len(todo) < len(units):
        log.info("resume: %d of %d work units already done", len(units) - len(todo), len(units))
    jobs = [(u, cfg, str(work)) for u in todo]
    bar = tqdm(total=len(jobs), desc="read/normalize/filter/minhash", unit="unit", disable=not progress)
    if cfg.executor == "ray":
        _run_ray(jobs, workers, bar)
    elif cfg.executor != "local":
        raise LmforgeError(f"executor {cfg.executor!r} is not 'local' or 'ray'")
    elif workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _call(job)
            bar.update()
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        # fork where there is one: spawn would re-run a caller's script without a __main__ guard. The
        # children only read, filter and hash (no tokenizer/torch threads whose state fork could corrupt).
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
            for _ in pool.map(_call, jobs):
                bar.update()
    bar.close()
    return len(units) - len(todo)


def _run_ray(jobs: list[tuple], workers: int, bar) -> None:
    try:
        import ray
    except ImportError:
        raise LmforgeError("--executor ray needs Ray: pip install 'lmforge[ray]' (or use --executor local)") from None
    if not ray.is_initialized():
        ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(_call)
    pending = [remote.remote(job) for job in jobs]
    while pending:
        done, pending = ray.wait(pending)
        ray.get(done)
        bar.update(len(done))


def unit_stats(unit: WorkUnit, work: Path) -> dict:
    return json.loads((work / f"{unit.stem}.done.json").read_text())["stats"]


def iter_unit_docs(unit: WorkUnit, work: Path) -> Iterator[dict]:
    with open(work / f"{unit.stem}.docs.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
