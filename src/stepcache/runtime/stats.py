"""What a cache did: computed and reused calls per component type, and the MACs it saved.

Plain frozen values, so stats outlive the cache that produced them (``handle.stats`` after the
``with`` block, :func:`stepcache.summary` after the pipeline call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CacheStats", "TypeStats"]


@dataclass(frozen=True)
class TypeStats:
    """Measured calls of one component type (all layers, all branches, all generations)."""

    components: int
    computed: int
    reused: int
    macs_saved: float | None

    @property
    def compute_fraction(self) -> float:
        calls = self.computed + self.reused
        return self.computed / calls if calls else 1.0


@dataclass(frozen=True)
class CacheStats:
    """What the cache did: per type, computed vs reused calls and estimated MACs saved."""

    by_type: dict[str, TypeStats]
    generations: int

    @property
    def computed(self) -> int:
        return sum(s.computed for s in self.by_type.values())

    @property
    def reused(self) -> int:
        return sum(s.reused for s in self.by_type.values())

    @property
    def compute_fraction(self) -> float:
        """Executed scheduled-component calls / all scheduled-component calls (as the schedule's)."""
        calls = self.computed + self.reused
        return self.computed / calls if calls else 1.0

    @property
    def macs_saved(self) -> float | None:
        vals = [s.macs_saved for s in self.by_type.values()]
        return None if any(v is None for v in vals) else float(sum(vals))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return {
            "generations": self.generations,
            "computed": self.computed,
            "reused": self.reused,
            "compute_fraction": self.compute_fraction,
            "macs_saved": self.macs_saved,
            "by_type": {
                k: {
                    "components": s.components,
                    "computed": s.computed,
                    "reused": s.reused,
                    "compute_fraction": s.compute_fraction,
                    "macs_saved": s.macs_saved,
                }
                for k, s in self.by_type.items()
            },
        }

    def __str__(self) -> str:
        lines = [f"{'type':<11}{'layers':>7}{'computed':>10}{'reused':>9}{'fraction':>10}{'GMACs saved':>13}"]
        for kind, s in self.by_type.items():
            saved = "?" if s.macs_saved is None else f"{s.macs_saved / 1e9:.3f}"
            lines.append(
                f"{kind:<11}{s.components:>7}{s.computed:>10}{s.reused:>9}{s.compute_fraction:>10.3f}{saved:>13}"
            )
        return "\n".join(lines)
