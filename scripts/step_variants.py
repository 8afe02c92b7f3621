"""Variants of the decode step's kernels side by side in the whole model (``shadowpass bench``).

    python scripts/step_variants.py fetch=64 fetch=32 fetch=64 fetch=32 \
        -- --contexts 122880 --host-fraction 0.75 --lanes 2 2 2 2

Runs the benchmark's shadowkv side at the largest batch only, with one variant set before each
timed run (give as many ``--lanes`` values as variants; equal values share one compile). A
variant is comma-separated settings over the defaults:

- ``fetch=N``: persistent programs of the value fetch (``chunk_gather.FETCH_PROGRAMS``,
  default 64). With batch lanes one lane's fetch runs beside the other lane's GEMMs and
  attention; its programs hold SMs those kernels could use, and in isolation 33 programs
  fetch as fast as 1M (scripts/fetch_programs.py). Measured (H100, 2026-12-06, 122K batch 10,
  2 lanes, results/h100/step_variants/call2_*): fetch=64 37.59 ms, fetch=32 38.73 ms (the
  fetch kernel itself 30.5 -> 36.1 ms a step): no gain.
- ``parts=N``: batch slices of each site's fetch and attention in a batch lane
  (``kernels.LANE_PARTS``, default 1). Each slice is one fetch and one attention launch of a
  few sequences; with lanes, the other lane's work hides the fetch anyway. Measured (H100,
  2026-12-06, 122K, 2 lanes, results/h100/lanes_parts/): at batch 10 parts=4 37.87 ms,
  parts=1 34.34, parts=2 35.67; at batch 11 parts=1 34.52 and 36.39, parts=4 41.73 ms. Until
  then lanes took ``PIPELINE_PARTS`` (4) slices; now 1.
- (removed) ``rows=N``, rows a fetch program loads at once (default 16): 64 gave 38.72 ms
  against 34.34 for 16 in the same run.
- (removed) ``combine=split|kernel``: the attention's partials merged by the last split
  program, or by a second kernel. H100, 2026-12-06, 122K batch 10, 2 lanes,
  results/h100/combine_in_split/: 45.89 vs 48.20 ms a step; the second kernel is gone.

The same settings vary by 1-3 ms between runs (40.42 vs 37.59 ms for fetch=64 in two calls):
repeat a variant, as above, before reading a difference of that size.

Each row's method names its variant. Run on the GPU machine.
"""
import sys

from shadowpass import bench, kernels
from shadowpass.templates import chunk_gather

SETTINGS = {
    "fetch": lambda v: setattr(chunk_gather, "FETCH_PROGRAMS", int(v)),
    "parts": lambda v: setattr(kernels, "LANE_PARTS", int(v)),
}
DEFAULT = "fetch=64,parts=1"


def apply(variant: str):
    for item in f"{DEFAULT},{variant}".split(","):
        name, value = item.split("=")
        SETTINGS[name](value)


def main():
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    variants = sys.argv[1:cut]
    for v in variants:  # a typo fails here, not after the prefill
        apply(v)
    run = bench.shadow_run

    def with_variant(*a, **kw):
        variant = variants.pop(0) if variants else ""
        apply(variant)
        print(f"variant: {variant or 'defaults'}", flush=True)
        row = run(*a, **kw)
        row.method += f" [{variant or 'defaults'}]"
        return row

    bench.shadow_run = with_variant
    return bench.main(["--methods", "shadowkv", "--batches", *sys.argv[cut + 1:]])


if __name__ == "__main__":
    sys.exit(main())
