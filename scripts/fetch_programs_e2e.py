"""Value-fetch program count in the whole model's decode step (templates/chunk_gather.FETCH_PROGRAMS).

    python scripts/fetch_programs_e2e.py 64 32 16 64 32 16 -- --contexts 122880 --lanes 2 2 2 2 2 2

Runs ``shadowpass bench`` (shadowkv side only, largest batch only), with the fetch's program
count set before each timed run to the next of the listed values; give as many ``--lanes``
values as program counts. With batch lanes the fetch of one lane runs beside the other lane's
GEMMs and attention: its persistent programs hold SMs those kernels could use, so fewer of them
may shorten the step while the fetch keeps its bandwidth (scripts/fetch_programs.py: 33 programs
fetch as fast as 1M in isolation). Run on the GPU machine.
"""
import sys

from shadowpass import bench
from shadowpass.templates import chunk_gather


def main():
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    programs = [int(p) for p in sys.argv[1:cut]]
    run = bench.shadow_run

    def with_programs(*a, **kw):
        chunk_gather.FETCH_PROGRAMS = programs.pop(0) if programs else chunk_gather.FETCH_PROGRAMS
        print(f"fetch programs: {chunk_gather.FETCH_PROGRAMS}", flush=True)
        row = run(*a, **kw)
        row.method += f" fetch {chunk_gather.FETCH_PROGRAMS}"
        return row

    bench.shadow_run = with_programs
    return bench.main(["--methods", "shadowkv", "--batches", *sys.argv[cut + 1:]])


if __name__ == "__main__":
    sys.exit(main())
