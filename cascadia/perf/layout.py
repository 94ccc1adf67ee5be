"""A replica's parallel layout: tensor parallel inside a node, pipeline stages possibly
across nodes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """tp GPUs per pipeline stage, pp stages. `stage_nodes` names the node of each pipeline
    stage (None = all on one node); TP groups never span nodes."""

    tp: int = 1
    pp: int = 1
    stage_nodes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"layout tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.stage_nodes is not None and len(self.stage_nodes) != self.pp:
            raise ValueError(f"layout has pp={self.pp} stages but {len(self.stage_nodes)} node names")

    @property
    def n_gpus(self) -> int:
        return self.tp * self.pp

    def n_cross_node_hops(self) -> int:
        """Pipeline hand-offs that cross a node boundary."""
        if self.stage_nodes is None:
            return 0
        return sum(1 for a, b in zip(self.stage_nodes, self.stage_nodes[1:]) if a != b)

    def describe(self) -> str:
        return f"tp{self.tp}pp{self.pp}"

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """`tp4pp2`, `tp4`, `4x2` (tp x pp)."""
        t = text.strip().lower()
        try:
            if "x" in t:
                a, b = t.split("x")
                return cls(int(a), int(b))
            tp, pp = 1, 1
            if t.startswith("tp"):
                rest = t[2:]
                if "pp" in rest:
                    a, b = rest.split("pp")
                    tp, pp = int(a), int(b)
                else:
                    tp = int(rest)
            elif t.startswith("pp"):
                pp = int(t[2:])
            else:
                raise ValueError
            return cls(tp, pp)
        except ValueError:
            raise ValueError(f"layout {text!r}: expected tpNppM (e.g. tp4pp2) or NxM") from None
