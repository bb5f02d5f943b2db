"""Summarize sweep results: counts per status, and the architectures of each non-OK status.

    python tools/hf_sweep/summarize.py /tmp/sw.jsonl [/tmp/sw_router.jsonl ...] [-v]

An architecture swept with ``--router`` is listed as ``name[router]``. With ``-v``, each listed
architecture comes with its detail line.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from typing import Any

ORDER = ("OK", "WRONG", "CRASH", "REFUSED", "BUILD_FAIL", "SKIP")


def load(paths: list[str]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def name(record: dict[str, Any]) -> str:
    return record["arch"] + ("[router]" if record.get("router") else "")


def summarize(records: list[dict[str, Any]], verbose: bool = False) -> str:
    counts = Counter(r["status"] for r in records)
    statuses = sorted(counts, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s))
    lines = [f"{len(records)} results: " + ", ".join(f"{s} {counts[s]}" for s in statuses)]
    by_status: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_status[r["status"]].append(r)
    for status in statuses:
        if status == "OK":
            continue
        group = sorted(by_status[status], key=name)
        lines.append(f"\n{status} ({len(group)}):")
        if verbose:
            lines += [f"  {name(r):28} {r.get('detail', '')}" for r in group]
        else:
            lines.append("  " + ", ".join(name(r) for r in group))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="JSONL files written by sweep.py --out")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each detail line")
    args = parser.parse_args()
    print(summarize(load(args.files), args.verbose))


if __name__ == "__main__":
    main()
