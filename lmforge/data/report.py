"""The stats report of `prepare`: per-unit stats merged, and a readable Markdown table."""

from __future__ import annotations

from lmforge.common import human_bytes
from lmforge.data.readers import ReadReport


def _add(into: dict, other: dict) -> None:
    for k, v in other.items():
        if isinstance(v, dict):
            _add(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


def merge_unit_stats(units: list[dict]) -> dict:
    read = ReadReport()
    merged: dict = {
        "normalized": {},
        "filtered": {},
        "rejected": {},
        "by_source": {},
        "by_language": {},
        "filter_scope": {"checked": 0, "not_checked": 0},
    }
    for s in units:
        r = s["read"]
        read.merge(ReadReport(r["files"], r["documents"], r["bytes"], dict(r["skipped"]), list(r["problems"])))
        for key in merged:
            _add(merged[key], s.get(key, {}))
    merged["rejected"] = dict(sorted(merged["rejected"].items(), key=lambda kv: -kv[1]))
    merged["read"] = read.to_dict()
    return merged


def stage_rows(stats: dict) -> list[tuple[str, int, int | None]]:
    """(stage, documents out, bytes out) for the table; None where a stage counts tokens instead."""
    d = stats.get("dedup", {})
    rows = [
        ("read", stats["read"]["documents"], stats["read"]["bytes"]),
        ("normalize", stats["normalized"].get("documents", 0), stats["normalized"].get("bytes", 0)),
        ("quality filters", stats["filtered"].get("documents", 0), stats["filtered"].get("bytes", 0)),
    ]
    if d:
        rows.append(("exact + near dedup", d["documents_kept"], d["bytes_kept"]))
    return rows


def render_markdown(stats: dict) -> str:
    lines = ["# Data preparation report", "", "| stage | documents | bytes |", "|---|---:|---:|"]
    for name, docs, nbytes in stage_rows(stats):
        lines.append(f"| {name} | {docs:,} | {human_bytes(nbytes) if nbytes is not None else '-'} |")
    for split, t in stats.get("tokens", {}).items():
        lines.append(f"| pack: {split} | {t['documents']:,} | {t['tokens']:,} tokens in {t['shards']} shard(s) |")
    scope = stats.get("filter_scope")
    if scope:
        which = scope.get("applies_to", "prose")
        which = "every prose (non-code) document" if which == "prose" else "sources: " + (", ".join(which) or "none")
        lines += [
            "",
            f"Language ID and quality filters applied to {which}: {scope['checked']:,} of "
            f"{scope['checked'] + scope['not_checked']:,} documents checked.",
        ]
    for key, title in (("by_source", "source"), ("by_language", "language")):
        if stats.get(key):
            lines += [
                "",
                f"## {title.capitalize()}s (after the filters)",
                "",
                f"| {title} | documents | bytes |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| {k} | {v['documents']:,} | {human_bytes(v['bytes'])} |"
                for k, v in sorted(stats[key].items(), key=lambda kv: (-kv[1]["documents"], kv[0]))
            ]
    skipped = stats["read"]["skipped"]
    if skipped:
        lines += ["", "## Skipped input", "", "| reason | count |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in skipped.items()]
        lines += ["", "First problems:", ""] + [f"- `{p}`" for p in stats["read"]["problems"][:10]]
    if stats["rejected"]:
        lines += ["", "## Rejected by rule (each document in rejected.jsonl)", "", "| rule | documents |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in stats["rejected"].items()]
    d = stats.get("dedup")
    if d:
        lines += [
            "",
            "## Dedup",
            "",
            f"- exact duplicates removed: {d['exact_duplicates']:,}",
            f"- near duplicates removed: {d['near_duplicates']:,} (Jaccard >= {d['threshold']}, "
            f"LSH threshold ~{d['lsh_threshold']}; {d['candidate_pairs']:,} candidate pairs, "
            f"{d['verified_pairs']:,} verified)",
            f"- clusters written to dedup/clusters.jsonl: {d['clusters']:,}",
        ]
    if stats.get("mix"):
        weights = stats.get("mix_weights")
        how = " by the natural proportions" if weights == "natural" else " by weight" if weights else ""
        lines += [
            "",
            f"## Mix (training split{how})",
            "",
            "| source | weight | epochs | tokens | share |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s} | {m['weight']:.3f} | {m['epochs']:.2f} | {m['tokens']:,} | {m['share']:.3f} |"
            for s, m in stats["mix"].items()
        ]
    if stats.get("stage_seconds"):
        lines += ["", "## Time", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in stats["stage_seconds"].items()]
    if "seconds" in stats:
        lines += [
            "",
            f"{stats['seconds']} s on {stats['workers']} worker(s): {stats['mb_per_s']} MB/s of input "
            f"({stats['resumed_units']} of {stats['work_units']} work units resumed).",
        ]
    return "\n".join(lines) + "\n"
