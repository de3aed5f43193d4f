"""What a cache did: computed and reused calls per component type, the MACs it saved, and the memory
its stored outputs held.

Plain frozen values, so stats outlive the cache that produced them (``handle.stats`` after the
``with`` block, :func:`stepcache.summary` after the pipeline call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CacheStats", "TypeStats"]


@dataclass(frozen=True)
class TypeStats:
    """Measured calls of one component type (all layers, all branches, all generations), and the bytes
    its components' stored outputs hold: now (``stored_bytes``) and at most at once over the run
    (``peak_stored_bytes``). Bytes are ``Tensor.nbytes`` of each output kept (through tuples); a
    tensor two entries share is counted in both."""

    components: int
    computed: int
    reused: int
    macs_saved: float | None
    stored_bytes: int = 0
    peak_stored_bytes: int = 0
    halved: int = 0  # of the computed calls, those that ran one guidance half of the batch only

    @property
    def compute_fraction(self) -> float:
        calls = self.computed + self.reused
        return (self.computed - 0.5 * self.halved) / calls if calls else 1.0


@dataclass(frozen=True)
class CacheStats:
    """What the cache did: per type, computed vs reused calls, estimated MACs saved, bytes stored.

    ``total_peak_bytes`` is the peak of all types' stored bytes together, as measured; types may peak
    at different moments, so it can be below the sum of their peaks (which stands in when it is None).
    """

    by_type: dict[str, TypeStats]
    generations: int
    total_peak_bytes: int | None = None

    @property
    def computed(self) -> int:
        return sum(s.computed for s in self.by_type.values())

    @property
    def reused(self) -> int:
        return sum(s.reused for s in self.by_type.values())

    @property
    def halved(self) -> int:
        return sum(s.halved for s in self.by_type.values())

    @property
    def compute_fraction(self) -> float:
        """Executed scheduled-component calls / all scheduled-component calls (as the schedule's); a
        call that ran one guidance half of its batch (guidance reuse) counts half."""
        calls = self.computed + self.reused
        return (self.computed - 0.5 * self.halved) / calls if calls else 1.0

    @property
    def macs_saved(self) -> float | None:
        vals = [s.macs_saved for s in self.by_type.values()]
        return None if any(v is None for v in vals) else float(sum(vals))  # type: ignore[arg-type]

    @property
    def stored_bytes(self) -> int:
        """Bytes the stored outputs of all types hold now (0 once the cache is closed)."""
        return sum(s.stored_bytes for s in self.by_type.values())

    @property
    def peak_stored_bytes(self) -> int:
        """The most bytes the stored outputs of all types held at once over the run."""
        if self.total_peak_bytes is not None:
            return self.total_peak_bytes
        return sum(s.peak_stored_bytes for s in self.by_type.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "generations": self.generations,
            "computed": self.computed,
            "reused": self.reused,
            "halved": self.halved,
            "compute_fraction": self.compute_fraction,
            "macs_saved": self.macs_saved,
            "stored_bytes": self.stored_bytes,
            "peak_stored_bytes": self.peak_stored_bytes,
            "by_type": {
                k: {
                    "components": s.components,
                    "computed": s.computed,
                    "reused": s.reused,
                    "halved": s.halved,
                    "compute_fraction": s.compute_fraction,
                    "macs_saved": s.macs_saved,
                    "stored_bytes": s.stored_bytes,
                    "peak_stored_bytes": s.peak_stored_bytes,
                }
                for k, s in self.by_type.items()
            },
        }

    def __str__(self) -> str:
        lines = [
            f"{'type':<11}{'layers':>7}{'computed':>10}{'reused':>9}{'fraction':>10}{'GMACs saved':>13}"
            f"{'peak MiB':>10}"
        ]
        for kind, s in self.by_type.items():
            saved = "?" if s.macs_saved is None else f"{s.macs_saved / 1e9:.3f}"
            lines.append(
                f"{kind:<11}{s.components:>7}{s.computed:>10}{s.reused:>9}{s.compute_fraction:>10.3f}{saved:>13}"
                f"{s.peak_stored_bytes / 2**20:>10.2f}"
            )
        if len(self.by_type) > 1:
            lines.append(f"peak stored, all types together: {self.peak_stored_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)
