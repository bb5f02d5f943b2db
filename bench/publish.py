"""Copy a finished run's files into bench/results as ``<card>-<yyyymmdd>.*``, ready to commit.

    python bench/publish.py OUTDIR [--dest bench/results] [--auto]

For runs whose output came back from another machine (bench/run_gpu.sh OUTDIR there);
``bench/run.py --publish`` does the same at the end of a local run. ``--auto`` also records
the run's fastest impls for its compute capability in ``tofu_kernels/auto_impl.json``, which
``impl="auto"`` follows on such GPUs: commit it with the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from report import auto_choice, publish

# this checkout's table (linear_tofu.AUTO_TABLE is the imported package's, maybe another checkout)
AUTO_TABLE = Path(__file__).resolve().parent.parent / "tofu_kernels" / "auto_impl.json"


def record_auto(rows: list[dict], source: str, table: Path = AUTO_TABLE) -> dict | None:
    """Write the run's picks (:func:`report.auto_choice`) into ``table`` under its exact compute
    capability ("9.0"), keeping the other capabilities' entries; the entries, or None."""
    choice = auto_choice(rows)
    if choice is None:
        return None
    entries = json.loads(table.read_text()) if table.exists() else {}
    key = str(choice.pop("capability"))  # a regime this run did not measure keeps its pick
    entries[key] = {**entries.get(key, {}), **choice, "source": source}
    table.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="folder holding results.json, results.md, *.png")
    default = Path(__file__).resolve().parent / "results"
    parser.add_argument("--dest", type=Path, default=default)
    parser.add_argument("--auto", action="store_true", help="update tofu_kernels/auto_impl.json")
    args = parser.parse_args(argv)
    published = publish(args.src, args.dest)
    for path in published:
        print(path)
    if args.auto:
        rows = json.loads((args.src / "results.json").read_text())
        source = next(p for p in published if p.suffix == ".json").resolve()
        root = AUTO_TABLE.parent.parent
        entries = record_auto(
            rows, str(source.relative_to(root) if source.is_relative_to(root) else source)
        )
        print(
            f"{AUTO_TABLE}: {entries}"
            if entries
            else "--auto: nothing to record (a CPU run, a run without its GPU's capability, "
            "or no ok tofu_kernels/chunked rows)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
