"""Pool `shadowpass eval` results: each method's mean score gap to dense, and where it stands
against the baselines at every budget.

    python scripts/eval_gap.py [--versus quest streaming] results/h100/eval_hybrid_grid/*.json

Each file's sparse methods are compared with the dense run of the same file (same prompts, same
batch), so files from different runs can be pooled. Prints, per method label, the gap of every
cell and their mean, and the method's share of greedy outputs identical to dense's; then, for
each method, at how many (task, length, budget) points it scores at or above every --versus
method measured there, and the points where it does not.
"""
import argparse
import json
from collections import defaultdict


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files of `shadowpass eval`")
    p.add_argument("--versus", nargs="*", default=["quest", "streaming"],
                   help="baseline methods to compare every other method with, point by point")
    args = p.parse_args()
    gaps, exact = defaultdict(dict), defaultdict(list)
    score = {}  # (method, task, haystack, length, budget) -> score (the last file wins)
    for path in args.results:
        rows = [r for r in json.load(open(path))["summary"] if r["depth"] is None]
        dense = {(r["task"], r["haystack"], r["length"]): r["score"]
                 for r in rows if r["method"] == "dense"}
        for r in rows:
            cell = (r["task"], r["haystack"], r["length"])
            if r["method"] == "dense" or cell not in dense:
                continue
            gaps[r["label"]][cell] = r["score"] - dense[cell]
            exact[r["label"]].append(r["exact_agreement"])
            score[(r["method"], *cell, r["budget"])] = r["score"]
    for label, cells in sorted(gaps.items()):
        mean = sum(cells.values()) / len(cells)
        print(f"{label:28s} mean gap {mean:+6.2f} over {len(cells):2d} cells, "
              f"identical to dense {100 * sum(exact[label]) / len(exact[label]):4.1f}%")
        print("    " + ", ".join(f"{t}@{n}{'' if h == 'noise' else '/' + h} {g:+.1f}"
                               for (t, h, n), g in sorted(cells.items())))
    methods = sorted({k[0] for k in score} - set(args.versus))
    for m in methods:
        points = [k[1:] for k in score if k[0] == m]
        rivals = {pt: [score[(v, *pt)] for v in args.versus if (v, *pt) in score] for pt in points}
        compared = [pt for pt in points if rivals[pt]]
        below = [pt for pt in compared if score[(m, *pt)] < max(rivals[pt])]
        print(f"{m}: at or above {'/'.join(args.versus)} at {len(compared) - len(below)} of "
              f"{len(compared)} points" + "".join(
                  f"\n    below at {t}@{n} b{b}: {score[(m, t, h, n, b)]} vs {max(rivals[(t, h, n, b)])}"
                  for t, h, n, b in sorted(below)))


if __name__ == "__main__":
    main()
