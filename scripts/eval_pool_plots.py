"""Budget curves (and depth heatmaps) of several `shadowpass eval` runs pooled into one figure
per task: the later file wins where two runs measured the same method, budget, task and length.

    python scripts/eval_pool_plots.py OUT_DIR results1.json results2.json ...
"""
import json
import sys
from pathlib import Path

from shadowpass.eval import plots


def main(out_dir, paths):
    rows = {}
    for path in paths:
        for r in json.load(open(path))["summary"]:
            key = (r["task"], r["haystack"], r["method"], r["budget"], r["rank"], r["length"],
                   r["depth"])
            rows[key] = r
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    summary = list(rows.values())
    for png in plots.accuracy_vs_budget(summary, Path(out_dir)) + plots.heatmaps(summary,
                                                                                  Path(out_dir)):
        print(png)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
