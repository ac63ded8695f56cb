"""MinHash near-dedup: lmforge vs datasketch, side by side on the standard-library corpus.

Both get the same shingles (word 5-grams, words = runs of non-whitespace bytes) and num_perm=128.
Timed end to end from the document texts:
  datasketch: shingle byte strings (b" ".join of 5 words) + `MinHash.bulk` (its fastest path),
              then `MinHashLSH(threshold=0.8)`
  lmforge:    `MinHasher.signatures` (vectorised shingle hashes + all permutations as one matrix op),
              then LSH bands x rows + exact-Jaccard verification of the candidates.
Ground truth: exact Jaccard of every pair of documents (sparse doc x shingle product), pairs >= 0.8.
Then the whole `prepare` pipeline (default recipe, 2 workers) for its MB/s.

    python bench/dedup.py [--runs 3] [--no-tests] [--no-pipeline]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from lmforge.data.dedup import DedupConfig, MinHasher, exact_jaccard, lsh_candidates, near_duplicates
from lmforge.data.readers import ReadReport
from lmforge.data.stdlib import read_stdlib, stdlib_files

THRESHOLD, NUM_PERM = 0.8, 128


def corpus(include_tests: bool) -> list[str]:
    docs = read_stdlib(stdlib_files(include_tests), ReadReport(), sources=("code",))
    return [d.text for d in docs if d.text.split()]


def datasketch_signatures(texts: list[str], hasher: MinHasher) -> list:
    from datasketch import MinHash

    return MinHash.bulk([hasher.shingle_strings(t) for t in texts], num_perm=NUM_PERM)


def datasketch_pairs(sigs: list) -> set[tuple[int, int]]:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    pairs = set()
    for i, m in enumerate(sigs):
        pairs.update((j, i) for j in lsh.query(m))
        lsh.insert(i, m)
    return pairs


def lmforge_pairs(texts: list[str], sigs: np.ndarray, hasher: MinHasher, cfg: DedupConfig) -> set[tuple[int, int]]:
    found = set()
    sets: dict[int, np.ndarray] = {}
    for i, j in lsh_candidates(sigs, cfg.bands, cfg.rows).tolist():
        for d in (i, j):
            if d not in sets:
                sets[d] = hasher.shingle_set(texts[d])
        if exact_jaccard(sets[i], sets[j]) >= cfg.threshold:
            found.add((i, j))
    return found


def true_pairs(texts: list[str], hasher: MinHasher) -> set[tuple[int, int]]:
    """Every pair with exact Jaccard >= THRESHOLD: |A n B| for all pairs from one sparse product."""
    from scipy import sparse

    sets = [hasher.shingle_set(t) for t in texts]
    _, col = np.unique(np.concatenate(sets), return_inverse=True)
    row = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    x = sparse.csr_matrix((np.ones(len(col), dtype=np.float32), (row, col)))
    inter = sparse.triu(x @ x.T, k=1).tocoo()
    sizes = np.array([len(s) for s in sets])
    jac = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    keep = jac >= THRESHOLD
    return set(zip(inter.row[keep].tolist(), inter.col[keep].tolist()))


def precision_recall(found: set, truth: set) -> tuple[float, float]:
    hit = len(found & truth)
    return hit / max(len(found), 1), hit / max(len(truth), 1)


# CPU time of the last timed() call per label: steadier than wall time on a busy machine
CPU_SECONDS: dict[str, float] = {}


def timed(fn, runs: int, label: str = ""):
    times, cpu, out = [], [], None
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU_SECONDS[label] = statistics.median(cpu)
    return statistics.median(times), out


def pipeline_mb_per_s(workers: int) -> dict:
    """Stats of a default `prepare`, plus the CPU seconds it used (worker processes and the
    tokenizer's threads included)."""
    import resource

    from lmforge.data.config import load_config
    from lmforge.data.prepare import prepare

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    c0 = cpu()
    with tempfile.TemporaryDirectory() as out:
        stats = prepare(load_config(values={"workers": workers}), out, progress=False)
    stats["cpu_seconds"] = cpu() - c0
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-tests", action="store_true", help="leave the stdlib test suites out of the corpus")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the whole-pipeline run")
    args = ap.parse_args()

    texts = corpus(not args.no_tests)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    cfg = DedupConfig(num_perm=NUM_PERM, threshold=THRESHOLD)
    hasher = MinHasher.from_config(cfg)
    print(f"corpus: {len(texts)} stdlib .py files, {mb:.1f} MB; word 5-gram shingles, num_perm={NUM_PERM}")

    t_ds, ds_sigs = timed(lambda: datasketch_signatures(texts, hasher), args.runs, "datasketch")
    t_lm, lm_sigs = timed(lambda: hasher.signatures(texts), args.runs, "lmforge")
    print(f"\nMinHash signatures (median of {args.runs}, shingling included, 1 process):")
    print(f"  datasketch MinHash.bulk : {t_ds:7.2f} s  {len(texts) / t_ds:8.0f} docs/s  {mb / t_ds:7.1f} MB/s")
    print(f"  lmforge MinHasher       : {t_lm:7.2f} s  {len(texts) / t_lm:8.0f} docs/s  {mb / t_lm:7.1f} MB/s")
    cpu_ds, cpu_lm = CPU_SECONDS["datasketch"], CPU_SECONDS["lmforge"]
    print(
        f"  ratio lmforge/datasketch: {t_ds / t_lm:.1f}x wall, {cpu_ds / cpu_lm:.1f}x CPU time "
        f"({cpu_ds:.2f} s vs {cpu_lm:.2f} s)"
    )

    t_ds_lsh, ds_found = timed(lambda: datasketch_pairs(ds_sigs), 1)
    t_lm_lsh, lm_found = timed(lambda: lmforge_pairs(texts, lm_sigs, hasher, cfg), 1)
    truth = true_pairs(texts, hasher)
    print(
        f"\nNear-duplicate pairs at Jaccard >= {THRESHOLD} (truth: exact Jaccard of all "
        f"{len(texts) * (len(texts) - 1) // 2:,} pairs -> {len(truth)} pairs):"
    )
    for name, found, t in (
        ("datasketch MinHashLSH(0.8)", ds_found, t_ds_lsh),
        (f"lmforge LSH {cfg.bands}x{cfg.rows} + verify", lm_found, t_lm_lsh),
    ):
        p, r = precision_recall(found, truth)
        print(f"  {name:<28}: {len(found):5d} pairs  precision {p:.3f}  recall {r:.3f}  ({t:.2f} s)")
    total_ds, total_lm = t_ds + t_ds_lsh, t_lm + t_lm_lsh
    print(
        f"  end to end (signatures + LSH): datasketch {total_ds:.2f} s, lmforge {total_lm:.2f} s, "
        f"ratio {total_ds / total_lm:.1f}x"
    )
    check = near_duplicates(lm_sigs, cfg, lambda idx: {k: hasher.shingle_set(texts[k]) for k in idx})
    assert check.verified == len(lm_found)

    if not args.no_pipeline:
        stats = pipeline_mb_per_s(workers=2)
        print(
            f"\nWhole pipeline (`lmforge data prepare`, default recipe, 2 workers): "
            f"{stats['read']['bytes'] / 1e6:.1f} MB "
            f"in {stats['seconds']:.1f} s = {stats['mb_per_s']:.2f} MB/s "
            f"({stats['tokens']['train']['tokens']:,} training tokens); {stats['cpu_seconds']:.1f} CPU s "
            f"= {stats['read']['bytes'] / 1e6 / stats['cpu_seconds']:.2f} MB per CPU second"
        )
        print("  seconds per stage: " + ", ".join(f"{k} {v}" for k, v in stats["stage_seconds"].items()))


if __name__ == "__main__":
    main()
