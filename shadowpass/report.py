"""What the pass found: one record per attention site, as text and JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from .detect import Site


@dataclass
class SiteReport:
    graph: int
    site: str
    phase: str
    pattern: str
    gqa_group: int
    rope: str
    pre_rope_keys: bool
    kv_cache: str
    action: str
    reason: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @classmethod
    def of(cls, site: Site, graph: int) -> "SiteReport":
        rope = site.rope
        return cls(graph=graph, site=site.name, phase=site.phase, pattern=site.attention,
                   gqa_group=site.gqa_group,
                   rope=(f"{rope.form} (rotary_dim={rope.rotary_dim})" if rope and rope.rotary_dim
                         else (rope.form if rope else "?")),
                   pre_rope_keys=rope is not None,
                   kv_cache=site.k.cache if site.k else "?",
                   action="rewritten" if site.rewritable else "left dense",
                   reason=site.reason, notes=list(site.notes))


@dataclass
class Report:
    sites: List[SiteReport] = field(default_factory=list)
    graphs: int = 0
    errors: List[str] = field(default_factory=list)

    def add_graph(self, sites: List[Site], index: Optional[int] = None) -> int:
        """Add a graph's sites, numbered index (default: the graphs added so far, from 0)."""
        index = self.graphs if index is None else index
        self.graphs += 1
        self.sites += [SiteReport.of(s, index) for s in sites]
        return index

    @property
    def rewritten(self) -> List[SiteReport]:
        return [s for s in self.sites if s.action == "rewritten"]

    def to_json(self) -> str:
        return json.dumps({"graphs": self.graphs, "errors": self.errors,
                           "sites": [asdict(s) for s in self.sites]}, indent=2)

    def __str__(self) -> str:
        cols = ["graph", "site", "phase", "pattern", "gqa_group", "rope", "pre_rope_keys",
                "kv_cache", "action"]
        rows = [[str(getattr(s, c)) for c in cols] + [s.reason or ""] for s in self.sites]
        head = cols + ["reason"]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [f"shadowpass: {len(self.rewritten)} of {len(self.sites)} attention sites "
                 f"rewritten in {self.graphs} graph(s)", fmt(head)] + [fmt(r) for r in rows]
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)

    __repr__ = __str__
