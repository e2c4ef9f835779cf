"""Host-side page allocator and per-sequence page lists (one table serves every layer).

Lessons taken on purpose (levanter's page table; MaxText removing its page manager after cross-tenant reads):
explicit INVALID entries past a sequence's pages, a clear out-of-pages error instead of silent reuse, a page is
owned by at most one sequence, and device reads are masked by length so a reused page is never read past its end.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvtuner_jax.errors import CacheError, OutOfPagesError

INVALID_PAGE = -1


class PageAllocator:
    """Free list over physical pages 0..num_pages-1. Allocation order is deterministic (lowest ids first)."""

    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise CacheError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack; pop() gives the lowest id
        self._owned = np.zeros(num_pages, bool)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} free pages, have {len(self._free)} of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        self._owned[pages] = True
        return pages

    def free(self, pages: list[int]) -> None:
        for pg in pages:
            if not (0 <= pg < self.num_pages) or not self._owned[pg]:
                raise CacheError(f"page {pg} is not allocated (double free or foreign page)")
            self._owned[pg] = False
            self._free.append(pg)
        self._free.sort(reverse=True)


@dataclasses.dataclass
class SequencePages:
    """Pages and length of one live sequence."""

    slot: int
    length: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)


def pages_needed(length: int, min_residual: int, page_size: int) -> int:
    """Pages a sequence of `length` tokens must own: those of the layer that quantizes the most (smallest R)."""
    return max(0, (length - min_residual) // page_size)


def table_rows(seqs: list[SequencePages | None], max_pages: int) -> np.ndarray:
    """[B, max_pages] int32 page table rows; INVALID_PAGE past each sequence's pages and for padding rows."""
    out = np.full((len(seqs), max_pages), INVALID_PAGE, np.int32)
    for i, s in enumerate(seqs):
        if s is None:
            continue
        if len(s.pages) > max_pages:
            raise CacheError(f"sequence in slot {s.slot} owns {len(s.pages)} pages, the table holds {max_pages}")
        out[i, : len(s.pages)] = s.pages
    return out
