"""The pruned KV cache: per layer, the keys, values and interaction keys of the tokens still alive.

A batch contains rows of different lengths, and after DCP drops tokens each row keeps a different
number of them. Padding every row to the longest one would make memory and attention work follow
the fullest row of the batch. So each layer stores its tokens in fixed-size pages, as paged KV
caches do:

    key, value  (capacity, H, page_size, d_head)   model dtype
    k_int       (capacity, page_size, r)           model dtype, DCP models only
    valid       (capacity, page_size)              bool, False at free slots and dropped tokens
    position    (capacity, page_size)              int64, the token's true position in its row
    page_row    (capacity,)                        int64, the row that owns the page, -1 when free

Pages [0, used_pages) belong to rows and the rest of the capacity is free, so attention runs on the
view [:used_pages] and its work is sum over rows of ceil(live / page_size) pages. A row's pages
need not be contiguous, and the order of its tokens does not matter because attention is a sum.

Life cycle of one decode step in one layer:
1. `drop`: the new token's interaction query scores every live k_int of its row,
   s = q_int . k_int / sqrt(r) + beta, and tokens with s <= 0 become invalid (free slots).
2. `append`: the new token goes into a free slot of its row, or into a newly allocated page.
3. `attend`: the new token's query attends to the live tokens of its row (a segmented softmax
   over the row's pages).
4. `compact`: rows whose pages are filled below `min_fill` move their live tokens to the front of
   their pages and free the rest. Freed pages are replaced by the last used pages, so the used pages
   stay contiguous, and the storage shrinks when less than `shrink_below` of it is used.

Memory: after each decode step a row owns at most live / (min_fill * page_size) + 1 pages, because
compaction enforces it. Freeing pages shrinks the storage whenever fewer than shrink_below of its
pages are used, and growth adds a factor `growth`, so the storage stays within about 1 / shrink_below
of the used pages.

Dense models use the same cache without `drop`, as an append-only cache, so dense and pruned decoding
run the same code.

NOTE: attention here is two batched matrix products over (page, head) blocks plus a segmented
softmax in plain PyTorch. On CPU it takes about twice as long as one SDPA call over a contiguous
cache of the same tokens (torch 2.13, one thread), and there is no fused paged kernel for CUDA.
"""

import math
from dataclasses import dataclass

import torch

# Marks "no free slot" in the free-slot search. It is larger than any flat slot index.
_NO_SLOT = torch.iinfo(torch.int64).max


@dataclass
class LayerCacheStats:
    """Occupancy of one layer's cache at one moment.

    live: (B,) live tokens per row. padded_length: max live count (what a padded batch tensor would
    need per row). mean_live: mean live count per row. used_pages, capacity_pages: pages owned by rows
    and pages allocated. allocated_bytes: bytes of tensor storage held by the layer.
    """

    live: list[int]
    padded_length: int
    mean_live: float
    used_pages: int
    capacity_pages: int
    allocated_bytes: int


class PagedLayerCache:
    """One layer's pruned KV cache for a batch of ragged rows, stored in fixed-size pages."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        interaction_rank: int | None,
        dtype: torch.dtype,
        device: torch.device | str,
        page_size: int = 16,
        min_fill: float = 0.75,
        growth: float = 1.25,
        shrink_below: float = 0.5,
    ):
        """interaction_rank: r of the DCP layer, or None for a dense layer (no k_int, no drops).

        min_fill: a row with at least one page of free slots is compacted when its live tokens fill
        less than this fraction of its pages. growth: factor by which the page storage grows when it
        is full. shrink_below: the storage shrinks when its used fraction falls below this.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if not 0.0 < min_fill <= 1.0:
            raise ValueError(f"min_fill must be in (0, 1], got {min_fill}")
        if growth <= 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        if not 0.0 <= shrink_below < 1.0 / growth:
            raise ValueError(f"shrink_below must be in [0, 1/growth) = [0, {1.0 / growth:.3f}), got {shrink_below}")

        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.interaction_rank = interaction_rank
        self.dtype = dtype
        self.device = torch.device(device)
        self.page_size = page_size
        self.min_fill = min_fill
        self.growth = growth
        self.shrink_below = shrink_below

        self.used_pages = 0
        self.live = torch.zeros(batch_size, dtype=torch.int64, device=self.device)  # (B,)
        self.row_pages = torch.zeros(batch_size, dtype=torch.int64, device=self.device)  # (B,)
        self._allocate_storage(0)

    @property
    def is_dense(self) -> bool:
        return self.interaction_rank is None

    @property
    def capacity(self) -> int:
        return self.page_row.shape[0]

    # ----------------------------------------------------------------------------------------------
    # Storage

    def _allocate_storage(self, capacity: int) -> None:
        """Allocate empty page storage for `capacity` pages."""
        shape = (capacity, self.num_heads, self.page_size, self.head_dim)
        self.key = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.value = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k_int = None
        if not self.is_dense:
            self.k_int = torch.zeros(capacity, self.page_size, self.interaction_rank, dtype=self.dtype, device=self.device)
        self.valid = torch.zeros(capacity, self.page_size, dtype=torch.bool, device=self.device)
        self.position = torch.zeros(capacity, self.page_size, dtype=torch.int64, device=self.device)
        self.page_row = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)

    def _page_tensors(self) -> list[torch.Tensor]:
        """Return the tensors indexed by page in their first dimension."""
        tensors = [self.key, self.value, self.valid, self.position, self.page_row]
        if self.k_int is not None:
            tensors.append(self.k_int)
        return tensors

    def _resize(self, capacity: int) -> None:
        """Reallocate the storage to `capacity` pages, keeping the used pages [0, used_pages)."""
        old = self._page_tensors()
        self._allocate_storage(capacity)
        for new_tensor, old_tensor in zip(self._page_tensors(), old):
            new_tensor[: self.used_pages] = old_tensor[: self.used_pages]

    def _reserve(self, pages: int) -> None:
        """Grow the storage so that `pages` more pages fit."""
        needed = self.used_pages + pages
        if needed > self.capacity:
            self._resize(max(needed, math.ceil(needed * self.growth)))

    def allocated_bytes(self) -> int:
        """Return the bytes of tensor storage held by this layer (pages and per-row counters)."""
        tensors = self._page_tensors() + [self.live, self.row_pages]
        return sum(tensor.untyped_storage().nbytes() for tensor in tensors)

    def _allocate_pages(self, rows: torch.Tensor) -> torch.Tensor:
        """Give one new empty page to each row in `rows` (n,); return the page ids (n,)."""
        count = rows.shape[0]
        self._reserve(count)
        pages = torch.arange(self.used_pages, self.used_pages + count, device=self.device)
        self.page_row[pages] = rows
        self.valid[pages] = False
        self.row_pages.index_add_(0, rows, torch.ones_like(rows))
        self.used_pages += count
        return pages

    def _free_pages(self, pages: torch.Tensor) -> None:
        """Free the used pages `pages` (n,), moving the last used pages into the holes they leave."""
        count = pages.shape[0]
        if count == 0:
            return
        new_used = self.used_pages - count

        # Holes below new_used are filled by the surviving pages at or above it; counts match.
        freed = torch.zeros(self.used_pages, dtype=torch.bool, device=self.device)
        freed[pages] = True
        holes = freed[:new_used].nonzero().squeeze(1)
        movers = (~freed[new_used:]).nonzero().squeeze(1) + new_used
        for tensor in self._page_tensors():
            tensor[holes] = tensor[movers]

        self.valid[new_used : self.used_pages] = False
        self.page_row[new_used : self.used_pages] = -1
        self.used_pages = new_used

        if self.used_pages < self.shrink_below * self.capacity:
            self._resize(math.ceil(self.used_pages * self.growth))

    # ----------------------------------------------------------------------------------------------
    # Writing

    def fill(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_int: torch.Tensor | None,
        keep: torch.Tensor,
        position: torch.Tensor,
    ) -> None:
        """Store the kept tokens of a prefilled batch, replacing anything stored before.

        key, value: (B, H, T, d_head); k_int: (B, T, r) or None for a dense layer; keep: (B, T) bool,
        True for the tokens that stay (padding must be False); position: (B, T) true positions.
        Every row must keep at least one token.
        """
        if (k_int is None) != self.is_dense:
            raise ValueError("k_int must be given exactly when the cache has an interaction rank")
        live = keep.sum(dim=1)  # (B,)
        if bool((live == 0).any()):
            raise ValueError("every row must keep at least one token; rows without real tokens are not supported")

        pages_per_row = (live + self.page_size - 1) // self.page_size  # (B,)
        total_pages = int(pages_per_row.sum())
        self.used_pages = 0
        # One spare page per row: the next tokens need no reallocation, and the storage stays within a
        # page per row of the live tokens (growth applies only when rows outgrow it).
        self._allocate_storage(total_pages + self.batch_size)

        # Token i of row b (in order of position) goes to slot i % page_size of the row's page i // page_size.
        rows, columns = keep.nonzero(as_tuple=True)  # (N,), sorted by row
        row_start = live.cumsum(0) - live
        rank = torch.arange(rows.shape[0], device=self.device) - row_start[rows]
        page_start = pages_per_row.cumsum(0) - pages_per_row
        page = page_start[rows] + rank // self.page_size
        slot = rank % self.page_size

        self.key[page, :, slot] = key[rows, :, columns].to(self.dtype)
        self.value[page, :, slot] = value[rows, :, columns].to(self.dtype)
        if k_int is not None:
            self.k_int[page, slot] = k_int[rows, columns].to(self.dtype)
        self.valid[page, slot] = True
        self.position[page, slot] = position[rows, columns]

        self.page_row[:total_pages] = torch.repeat_interleave(torch.arange(self.batch_size, device=self.device), pages_per_row)
        self.used_pages = total_pages
        self.live = live.to(torch.int64)
        self.row_pages = pages_per_row.to(torch.int64)

    def drop(self, q_int: torch.Tensor, beta: torch.Tensor, also_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Drop the live tokens whose score against the new token's interaction query is <= 0.

        q_int: (B, r) interaction queries of the new tokens; beta: scalar. also_drop: optional (B, P)
        bool indexed by [row, position], True for tokens to drop as well (the previous layer's drops
        when layers add their masks). Returns the number of tokens dropped per row (B,).
        Scores are computed in float32, as in the full-sequence keep mask.
        """
        if self.is_dense:
            raise RuntimeError("a dense layer cache has no interaction keys and drops nothing")
        used = self.used_pages
        rows = self.page_row[:used]  # (U,)

        # (U, 1, r) @ (U, r, ps): the row-vector form runs several times faster on CPU than (U, ps, r) @ (U, r, 1).
        scores = torch.matmul(q_int.float()[rows].unsqueeze(-2), self.k_int[:used].float().transpose(-1, -2)).squeeze(-2)  # (U, ps)
        scores = scores / math.sqrt(self.interaction_rank) + beta.float()
        dropped = self.valid[:used] & (scores <= 0)
        if also_drop is not None:
            dropped |= self.valid[:used] & also_drop[rows[:, None], self.position[:used]]

        self.valid[:used] &= ~dropped
        dropped_per_row = torch.zeros_like(self.live).index_add_(0, rows, dropped.sum(dim=1))
        self.live -= dropped_per_row
        return dropped_per_row

    def append(self, key: torch.Tensor, value: torch.Tensor, k_int: torch.Tensor | None, position: torch.Tensor) -> None:
        """Store one new token per row in a free slot of that row, allocating a page where none is free.

        key, value: (B, H, d_head); k_int: (B, r) or None for a dense layer; position: (B,).
        """
        used = self.used_pages
        flat_slot = torch.arange(used * self.page_size, device=self.device).view(used, self.page_size)
        free_slot = torch.where(self.valid[:used], _NO_SLOT, flat_slot).amin(dim=1)  # (U,)
        first_free = torch.full((self.batch_size,), _NO_SLOT, dtype=torch.int64, device=self.device)
        first_free.scatter_reduce_(0, self.page_row[:used], free_slot, reduce="amin")  # (B,)

        full_rows = (first_free == _NO_SLOT).nonzero().squeeze(1)
        if full_rows.numel() > 0:
            first_free[full_rows] = self._allocate_pages(full_rows) * self.page_size

        page = first_free // self.page_size
        slot = first_free % self.page_size
        self.key[page, :, slot] = key.to(self.dtype)
        self.value[page, :, slot] = value.to(self.dtype)
        if k_int is not None:
            self.k_int[page, slot] = k_int.to(self.dtype)
        self.valid[page, slot] = True
        self.position[page, slot] = position
        self.live += 1

    # ----------------------------------------------------------------------------------------------
    # Reading

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Return softmax(q K^T * scaling) V over the live tokens of each row: (B, H, d_head).

        query: (B, H, d_head). The softmax is taken in float32 across all pages of a row.
        """
        used = self.used_pages
        rows = self.page_row[:used]  # (U,)

        # Batched row-vector products over the U * H (page, head) blocks: on CPU this form runs several
        # times faster than (ps, d_head) @ (d_head, 1) per block.
        blocks = used * self.num_heads
        page_query = query[rows].reshape(blocks, 1, self.head_dim)
        page_keys = self.key[:used].view(blocks, self.page_size, self.head_dim)
        scores = torch.bmm(page_query, page_keys.transpose(1, 2)).view(used, self.num_heads, self.page_size)
        scores = scores.float() * scaling  # (U, H, ps)
        scores = scores.masked_fill(~self.valid[:used, None, :], -math.inf)

        # Segmented softmax: the max and the sum run over all pages of a row.
        row_index = rows[:, None].expand(used, self.num_heads)  # (U, H)
        row_max = torch.full((self.batch_size, self.num_heads), -math.inf, device=self.device)
        row_max.scatter_reduce_(0, row_index, scores.amax(dim=-1), reduce="amax")  # (B, H)
        weights = torch.exp(scores - row_max[rows].unsqueeze(-1))  # (U, H, ps), 0 at invalid slots
        denominator = torch.zeros(self.batch_size, self.num_heads, device=self.device)
        denominator.index_add_(0, rows, weights.sum(dim=-1))  # (B, H)

        page_weights = weights.to(self.dtype).view(blocks, 1, self.page_size)
        page_values = self.value[:used].view(blocks, self.page_size, self.head_dim)
        page_output = torch.bmm(page_weights, page_values).view(used, self.num_heads, self.head_dim)
        output = torch.zeros(self.batch_size, self.num_heads, self.head_dim, device=self.device)
        output.index_add_(0, rows, page_output.float())
        return (output / denominator.unsqueeze(-1)).to(query.dtype)

    def alive_by_position(self, max_positions: int) -> torch.Tensor:
        """Return (B, max_positions) bool, True where the row's token at that position is live."""
        used = self.used_pages
        alive = torch.zeros(self.batch_size + 1, max_positions + 1, dtype=torch.bool, device=self.device)
        # Invalid slots write into the extra row and column, which are cut off below.
        rows = torch.where(self.valid[:used], self.page_row[:used, None], self.batch_size)
        columns = torch.where(self.valid[:used], self.position[:used], max_positions)
        alive[rows, columns] = True
        return alive[: self.batch_size, :max_positions]

    # ----------------------------------------------------------------------------------------------
    # Compaction

    def compact(self) -> int:
        """Compact the rows whose pages are filled below `min_fill`; return the number of rows compacted.

        A row qualifies when it has at least one page of free slots. Its live tokens move to the first
        ceil(live / page_size) of its pages (in page order) and its other pages are freed.
        """
        capacity_slots = self.row_pages * self.page_size  # (B,)
        sparse = (capacity_slots - self.live >= self.page_size) & (self.live < self.min_fill * capacity_slots)
        compact_rows = sparse.nonzero().squeeze(1)
        if compact_rows.numel() == 0:
            return 0

        used = self.used_pages
        ps = self.page_size
        slot_row = self.page_row[:used, None].expand(used, ps).reshape(-1)  # (U*ps,)
        valid_flat = self.valid[:used].reshape(-1)

        # All slots of the compacted rows, grouped by row and in flat order inside a row. Each row
        # contributes whole pages, so every ps consecutive entries are one page.
        slots = sparse[slot_row].nonzero().squeeze(1)
        slots = slots[torch.sort(slot_row[slots], stable=True).indices]
        slot_rows = slot_row[slots]
        row_slot_count = self.row_pages * ps * sparse
        row_slot_start = row_slot_count.cumsum(0) - row_slot_count  # (B,)

        # The k-th live token of a row moves to the k-th slot of that row.
        live_slots = slots[valid_flat[slots]]
        live_rows = slot_row[live_slots]
        row_live_start = (self.live * sparse).cumsum(0) - self.live * sparse
        rank = torch.arange(live_slots.shape[0], device=self.device) - row_live_start[live_rows]
        targets = slots[row_slot_start[live_rows] + rank]
        self._move_slots(live_slots, targets, slots)

        # Pages past ceil(live / ps) of each compacted row are freed.
        page_ids = slots.view(-1, ps)[:, 0] // ps
        page_rows = slot_rows.view(-1, ps)[:, 0]
        page_rank = torch.arange(page_ids.shape[0], device=self.device) - row_slot_start[page_rows] // ps
        needed_pages = (self.live + ps - 1) // ps  # (B,)
        surplus = page_ids[page_rank >= needed_pages[page_rows]]
        self.row_pages = torch.where(sparse, needed_pages, self.row_pages)
        self._free_pages(surplus)
        return int(compact_rows.numel())

    def _move_slots(self, sources: torch.Tensor, targets: torch.Tensor, cleared: torch.Tensor) -> None:
        """Move tokens from flat slots `sources` to `targets` (n,), invalidating `cleared` first."""
        ps = self.page_size
        source_page, source_slot = sources // ps, sources % ps
        target_page, target_slot = targets // ps, targets % ps

        moved_key = self.key[source_page, :, source_slot]  # (n, H, d_head), a copy
        moved_value = self.value[source_page, :, source_slot]
        moved_position = self.position[source_page, source_slot]
        self.key[target_page, :, target_slot] = moved_key
        self.value[target_page, :, target_slot] = moved_value
        self.position[target_page, target_slot] = moved_position
        if self.k_int is not None:
            self.k_int[target_page, target_slot] = self.k_int[source_page, source_slot]

        self.valid[cleared // ps, cleared % ps] = False
        self.valid[target_page, target_slot] = True

    # ----------------------------------------------------------------------------------------------
    # Statistics

    def stats(self) -> LayerCacheStats:
        """Return the layer's occupancy (synchronises with the device)."""
        live = self.live.tolist()
        return LayerCacheStats(
            live=live,
            padded_length=max(live),
            mean_live=sum(live) / len(live),
            used_pages=self.used_pages,
            capacity_pages=self.capacity,
            allocated_bytes=self.allocated_bytes(),
        )

    def check_invariants(self) -> None:
        """Raise AssertionError when the page bookkeeping is inconsistent (for tests and debugging)."""
        used = self.used_pages
        rows = self.page_row[:used]
        assert bool((rows >= 0).all()), "a used page has no owner row"
        assert bool((self.page_row[used:] == -1).all()), "a free page has an owner row"
        assert not bool(self.valid[used:].any()), "a free page holds live tokens"
        pages = torch.zeros_like(self.row_pages).index_add_(0, rows, torch.ones_like(rows))
        assert torch.equal(pages, self.row_pages), f"row page counts {self.row_pages.tolist()} != {pages.tolist()}"
        live = torch.zeros_like(self.live).index_add_(0, rows, self.valid[:used].sum(dim=1))
        assert torch.equal(live, self.live), f"live counts {self.live.tolist()} != {live.tolist()}"


class PrunedKVCache:
    """The pruned KV cache of a whole model: one PagedLayerCache per layer and each row's next position."""

    def __init__(self, layers: list[PagedLayerCache], next_position: torch.Tensor):
        """layers: one cache per transformer layer; next_position: (B,) true position of each row's next token."""
        self.layers = layers
        self.next_position = next_position

    @classmethod
    def for_model(
        cls,
        config,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        page_size: int = 16,
        min_fill: float = 0.75,
    ) -> "PrunedKVCache":
        """Create an empty cache for a DCPGPT2Config (dense layers when config.dcp_enabled is False)."""
        rank = config.dcp_rank if config.dcp_enabled else None
        head_dim = config.n_embd // config.n_head
        layers = [
            PagedLayerCache(batch_size, config.n_head, head_dim, rank, dtype, device, page_size=page_size, min_fill=min_fill)
            for _ in range(config.n_layer)
        ]
        return cls(layers, torch.zeros(batch_size, dtype=torch.int64, device=device))

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def allocated_bytes(self) -> int:
        """Return the bytes of tensor storage held by all layers."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def layer_allocated_bytes(self) -> list[int]:
        return [layer.allocated_bytes() for layer in self.layers]

    def live_counts(self) -> torch.Tensor:
        """Return (L, B) live tokens per layer and row."""
        return torch.stack([layer.live for layer in self.layers])

    def stats(self) -> list[LayerCacheStats]:
        return [layer.stats() for layer in self.layers]
