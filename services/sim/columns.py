"""A set of equal-length numpy columns that grows by appending and shrinks by a mask: the simulator's
queues (prefill work, decode inbox, running decodes) are each one of these."""
from __future__ import annotations

import numpy as np


class Columns:
    def __init__(self, **dtypes: type) -> None:
        self._dtypes = dtypes
        for name, dtype in dtypes.items():
            setattr(self, name, np.zeros(0, dtype=dtype))

    def __len__(self) -> int:
        return len(getattr(self, next(iter(self._dtypes))))

    def append(self, **values) -> None:
        """Append rows: every column by name, each an array (or a scalar for all the new rows)."""
        sizes = [np.size(v) for v in values.values() if np.ndim(v) > 0]
        n = max(sizes) if sizes else 1
        if n == 0 or 0 in sizes:
            return
        if set(values) != set(self._dtypes):
            raise ValueError(f"append needs exactly {sorted(self._dtypes)}, got {sorted(values)}")
        for name, dtype in self._dtypes.items():
            new = np.broadcast_to(np.asarray(values[name], dtype=dtype), (n,))
            setattr(self, name, np.concatenate((getattr(self, name), new)))

    def keep(self, mask: np.ndarray) -> None:
        for name in self._dtypes:
            setattr(self, name, getattr(self, name)[mask])

    def reorder(self, order: np.ndarray) -> None:
        self.keep(order)
