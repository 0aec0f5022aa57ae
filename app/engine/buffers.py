"""Step buffers: each step's batch gathered into tensors the engine allocates once, not every step.

A step concatenates its groups' rows (x_t, t, the noise z and the per-row coefficients). `gather` writes
them with `torch.cat(out=...)` into a buffer kept from step to step, grown (doubled) only when a step
is wider than every one before. x_t and t are padded with zero rows up to the forward's batch bucket
and x_t is kept in the forward's memory format, so the fast path neither pads nor re-lays them out.
What `gather` returns is a view that the next step overwrites: read it within the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class StepBuffers:
    def __init__(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        self.device, self.memory_format = device, memory_format
        self._buffers: dict[str, Tensor] = {}
        self.allocations = 0  # buffers made so far: once per name, unless a step grows one

    def gather(self, name: str, parts: Sequence[Tensor], rows: int | None = None) -> Tensor:
        """cat(parts) in buffer `name`, with zero rows appended up to `rows` (default: none)."""
        n = sum(p.shape[0] for p in parts)
        rows = n if rows is None else rows
        if rows < n:
            raise ValueError(f"cannot gather {n} rows into {rows}")
        like = parts[0]
        if any(p.dtype != like.dtype for p in parts):
            raise TypeError(
                f"buffer {name!r}: parts of several dtypes {sorted({str(p.dtype) for p in parts})}"
            )
        buf = self._buffers.get(name)
        fits = buf is not None and buf.shape[1:] == like.shape[1:] and buf.dtype == like.dtype
        if not fits or buf.shape[0] < rows:
            # a wider step doubles the buffer, so batches that widen job by job reallocate rarely
            capacity = max(rows, 2 * buf.shape[0]) if fits else rows
            layout = self.memory_format if like.ndim == 4 else torch.contiguous_format
            buf = torch.empty(
                (capacity, *like.shape[1:]), dtype=like.dtype, device=self.device, memory_format=layout
            )
            self._buffers[name] = buf
            self.allocations += 1
        view = buf[:rows]
        torch.cat(list(parts), out=view[:n])
        if rows > n:  # padding rows: zeros, whatever a wider step left there
            view[n:].zero_()
        return view
