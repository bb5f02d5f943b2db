"""Copy a finished run's files into bench/results as ``<card>-<yyyymmdd>.*``, ready to commit.

    python bench/publish.py OUTDIR [--dest bench/results]

For runs whose output came back from another machine (bench/run_gpu.sh OUTDIR there);
``bench/run.py --publish`` does the same at the end of a local run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from report import publish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="folder holding results.json, results.md, *.png")
    default = Path(__file__).resolve().parent / "results"
    parser.add_argument("--dest", type=Path, default=default)
    args = parser.parse_args(argv)
    for path in publish(args.src, args.dest):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
