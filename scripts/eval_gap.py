"""Mean score gap to dense per method, over the task x length cells of `shadowpass eval` results.

    python scripts/eval_gap.py results/h100/eval_hybrid_grid/*.json

Each file's sparse methods are compared with the dense run of the same file (same prompts, same
batch), so files from different runs can be pooled. Prints, per method label, the gap of every
cell and their mean, and the method's share of greedy outputs identical to dense's.
"""
import json
import sys
from collections import defaultdict


def main(paths):
    gaps, exact = defaultdict(dict), defaultdict(list)
    for path in paths:
        rows = [r for r in json.load(open(path))["summary"] if r["depth"] is None]
        dense = {(r["task"], r["haystack"], r["length"]): r["score"]
                 for r in rows if r["method"] == "dense"}
        for r in rows:
            cell = (r["task"], r["haystack"], r["length"])
            if r["method"] != "dense" and cell in dense:
                gaps[r["label"]][cell] = r["score"] - dense[cell]
                exact[r["label"]].append(r["exact_agreement"])
    for label, cells in sorted(gaps.items()):
        mean = sum(cells.values()) / len(cells)
        print(f"{label:28s} mean gap {mean:+6.2f} over {len(cells):2d} cells, "
              f"identical to dense {100 * sum(exact[label]) / len(exact[label]):4.1f}%")
        print("    " + ", ".join(f"{t}@{n}{'' if h == 'noise' else '/' + h} {g:+.1f}"
                               for (t, h, n), g in sorted(cells.items())))


if __name__ == "__main__":
    main(sys.argv[1:])
