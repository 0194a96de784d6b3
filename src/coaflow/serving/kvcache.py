"""Keys and values that outlive a batch: the transformers engine's cache.

A row (one generated sequence) keeps the keys and values of every token it has read, from its
prefill to its last decode step, whatever joins or leaves the batch meanwhile: a step costs one
token per row, never a re-encoding of the contexts (the engine before this re-prefilled every
unfinished row whenever a request arrived).

``Slots`` holds the rows of the running batch, per layer one tensor ``[rows, kv_heads, columns,
head_dim]``; row ``r`` keeps its tokens in columns ``0..len_r-1``, so a decode step writes each
row's new key at its own column (one indexed write per layer) and attention reads the first
``max(len) + 1`` columns under a mask. A row joins or leaves by copying its own columns.
``RowKV`` holds one row outside the batch: a prompt being prefilled, a row set aside for a fairer
share, an entry of the prefix store. ``PrefixStore`` keeps finished contexts, so a request that
starts with one (an agent's next turn, a shared system prompt and tool list) encodes only what
is new. The model sees these through ``update`` (transformers' cache interface: keys and values
of the new tokens in, the row's whole keys and values out) with explicit positions and a 4-D
mask, so no transformers cache class is involved.
"""

from __future__ import annotations

from collections import OrderedDict


class RowKV:
    """One row's keys and values, per layer ``[kv_heads, length, head_dim]``."""

    def __init__(self, keys: list, values: list, length: int):
        self.k, self.v, self.length = keys, values, length

    @classmethod
    def empty(cls, shape: tuple[int, int, int], length: int, dtype, device) -> RowKV:
        import torch

        layers, heads, dim = shape
        return cls([torch.empty(heads, length, dim, dtype=dtype, device=device)
                    for _ in range(layers)],
                   [torch.empty(heads, length, dim, dtype=dtype, device=device)
                    for _ in range(layers)], 0)

    def copy_into(self, other: RowKV, length: int) -> None:
        for a, b in zip(self.k + self.v, other.k + other.v, strict=True):
            b[:, :length] = a[:, :length]
        other.length = length

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.k + self.v)


class Prefill:
    """The cache a prompt chunk is encoded against: columns ``start..`` of ``row``."""

    def __init__(self, row: RowKV, start: int):
        self.row, self.start = row, start

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def update(self, key, value, layer_idx: int, *args, **kwargs):
        end = self.start + key.shape[2]
        self.row.k[layer_idx][:, self.start:end] = key[0]
        self.row.v[layer_idx][:, self.start:end] = value[0]
        return self.row.k[layer_idx][None, :, :end], self.row.v[layer_idx][None, :, :end]


class Slots:
    """The running batch's keys and values; grows (rows and columns) as needed, freed when
    empty."""

    GROW = 256  # columns added at a time, rounded: a reallocation copies every row

    def __init__(self, shape: tuple[int, int, int], dtype, device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.k: list = []
        self.v: list = []
        self.rows = self.cols = 0

    def ensure(self, rows: int, cols: int) -> None:
        """Room for ``rows`` rows of ``cols`` columns (keeps what is there)."""
        import torch

        if rows <= self.rows and cols <= self.cols:
            return
        new_rows = max(rows, self.rows, 1)
        if rows > self.rows:
            new_rows = max(rows, 2 * self.rows)
        new_cols = self.cols
        if cols > self.cols:  # a quarter more, at least GROW: few reallocations per long row
            new_cols = -(-max(cols, self.cols + self.cols // 4, self.GROW) // self.GROW) \
                * self.GROW
        layers, heads, dim = self.shape

        def grow(old):
            t = torch.zeros(new_rows, heads, new_cols, dim, dtype=self.dtype, device=self.device)
            if old is not None:
                t[:self.rows, :, :self.cols] = old
            return t

        self.k = [grow(self.k[i] if self.k else None) for i in range(layers)]
        self.v = [grow(self.v[i] if self.v else None) for i in range(layers)]
        self.rows, self.cols = new_rows, new_cols

    def clear(self) -> None:
        self.k, self.v, self.rows, self.cols = [], [], 0, 0

    def put(self, slot: int, row: RowKV, length: int) -> None:
        for a, b in zip(row.k + row.v, self.k + self.v, strict=True):
            b[slot, :, :length] = a[:, :length]

    def take(self, slot: int, length: int) -> RowKV:
        """A copy of the first ``length`` columns of ``slot``."""
        return RowKV([t[slot, :, :length].clone() for t in self.k],
                     [t[slot, :, :length].clone() for t in self.v], length)

    def move(self, src: int, dst: int, length: int) -> None:
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.k + self.v)


class Decode:
    """The cache of one decode step: row ``i`` of the batch is slot ``i``, its new token goes to
    column ``positions[i]``, attention reads the first ``width`` columns."""

    def __init__(self, slots: Slots, positions, width: int):
        import torch

        self.slots, self.pos, self.width = slots, positions, width
        self.n = len(positions)
        self.rows = torch.arange(self.n, device=positions.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def update(self, key, value, layer_idx: int, *args, **kwargs):
        k, v = self.slots.k[layer_idx], self.slots.v[layer_idx]
        k[self.rows, :, self.pos] = key[:, :, 0]
        v[self.rows, :, self.pos] = value[:, :, 0]
        return k[:self.n, :, :self.width], v[:self.n, :, :self.width]


class PrefixStore:
    """Finished contexts (token ids and their keys and values), least recently used first out,
    within ``budget`` bytes. ``longest`` finds the entry sharing the longest prefix with a new
    prompt; an entry that another one extends is dropped."""

    MIN_REUSE = 16  # tokens: a shorter shared prefix is not worth a lookup's copy

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: OrderedDict[int, tuple] = OrderedDict()  # id -> (ids tensor, RowKV)
        self.bytes = 0
        self._next = 0

    def longest(self, prompt: list[int]) -> tuple[RowKV | None, int]:
        import torch

        if not self.entries:
            return None, 0
        want = torch.tensor(prompt)
        best, best_len = None, 0
        for key, (ids, _) in self.entries.items():
            n = min(len(ids), len(want))
            same = (ids[:n] == want[:n]).to(torch.int8)
            shared = int(same.argmin()) if not bool(same.all()) else n
            if shared > best_len:
                best, best_len = key, shared
        if best is None or best_len < self.MIN_REUSE:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best][1], best_len

    def add(self, ids: list[int], row: RowKV) -> None:
        import torch

        if self.budget <= 0 or len(ids) < self.MIN_REUSE or row.nbytes > self.budget:
            return
        new = torch.tensor(ids)
        for key, (old, _) in list(self.entries.items()):  # a prefix of the new one: superseded
            if len(old) <= len(new) and bool((new[:len(old)] == old).all()):
                self._drop(key)
        self.entries[self._next] = (new, row)
        self._next += 1
        self.bytes += row.nbytes
        while self.bytes > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        _, row = self.entries.pop(key)
        self.bytes -= row.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
