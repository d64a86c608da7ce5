#!/usr/bin/env python
"""Compare the HDF5 outputs of two runs, file by file: the same datasets in the same order with
the same dtype, shape, compression and values, and the same attributes; timings and peak memory
are left out. For refactors that must not change what a run writes:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before/src  <run the stages into before/>
    PYTHONPATH=src              <run the same stages into after/>
    python bench/compare_outputs.py before/ after/

Prints one line per file and exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

#: values that measure the run, not its result
TIMINGS = {"log", "peak_memory_mb_per_rank", "info", "seconds", "seconds_per_pattern"}


def contents(path: Path) -> tuple[dict, dict]:
    datasets = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                datasets[name] = (obj.dtype.str, obj.shape, obj.compression, obj[()])

        f.visititems(visit)
        attrs = {k: f.attrs[k] for k in f.attrs}
    return datasets, attrs


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "O":  # variable-length rows (sparse photons)
        return all(same(x, y) for x, y in zip(a.ravel(), b.ravel(), strict=True))
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    da, aa = contents(before)
    db, ab = contents(after)
    if list(da) != list(db):
        problems.append(f"datasets {list(da)} -> {list(db)}")
    for key in set(da) & set(db):
        if da[key][:3] != db[key][:3]:
            problems.append(f"{key}: dtype/shape/compression {da[key][:3]} -> {db[key][:3]}")
        elif key not in TIMINGS and not same(da[key][3], db[key][3]):
            problems.append(f"{key}: values differ")
    for key in (set(aa) | set(ab)) - TIMINGS:
        if key not in aa or key not in ab or not same(aa[key], ab[key]):
            problems.append(f"attribute {key}: {aa.get(key)!r} -> {ab.get(key)!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    failed = False
    files = sorted(p.relative_to(args.before) for p in args.before.rglob("*.h5"))
    for name in files:
        if not (args.after / name).exists():
            print(f"{name}: missing after")
            failed = True
            continue
        problems = compare(args.before / name, args.after / name)
        failed |= bool(problems)
        print(f"{name}: " + ("same" if not problems else "; ".join(problems)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
