"""The KV cache the early-exit adapter decodes against: per layer a preallocated
`[batch, kv_heads, capacity, head_dim]` buffer written at explicit positions, with each row's
committed length per layer kept as a device tensor (and mirrored on the host, where the loops
already know it, for counting and bookkeeping without a sync).

Rows are left-padded: row b's logical position p lives in slot pad[b] + p (the prefill's
input carries the padding, written from slot 0 and masked out). A forward over T
new tokens writes row b's keys and values at slots length[b] .. length[b] + T - 1 of every
layer it runs; rolling back a rejected tail is a length change (the next forward overwrites
the stale slots), so shapes never change. The attention mask is built from the lengths
(`attention_mask`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lsbench.errors import LsbenchError

CAPACITY_QUANTUM = 256  # capacities round up to this: jobs of similar length share one shape


def capacity_for(longest_prompt: int, max_new_tokens: int, k: int = 0) -> int:
    """Slots a job needs: its longest prompt, every new token, and a round's k drafts plus the
    pending token, rounded up to `CAPACITY_QUANTUM`."""
    needed = longest_prompt + max_new_tokens + k + 1
    return -(-needed // CAPACITY_QUANTUM) * CAPACITY_QUANTUM


class StaticKVCache:
    """Fixed-capacity keys and values for `num_layers` layers and `batch` rows. Duck-types the
    part of transformers' `Cache` that decoder layers call (`update(keys, values, layer_idx)`);
    layer buffers are allocated on the first write, on that layer's device and dtype.

    `grow`: double the capacity instead of refusing an overflow (for callers outside the
    decoding loops, which size their cache up front and must never reallocate mid-run).
    `max_step`: forwards of at most this many tokens attend over the whole capacity through
    the compiled layers (one shape per token count; `EarlyExitModel.run_layers`); 0: eager."""

    def __init__(self, num_layers: int, batch: int = 1, capacity: int = CAPACITY_QUANTUM, *,
                 pads: Sequence[int] | None = None, device: torch.device | str = "cpu",
                 grow: bool = False, max_step: int = 0):
        self.num_layers, self.batch, self.capacity, self.grow = num_layers, batch, capacity, grow
        self.max_step = max_step
        self.pads = list(pads) if pads is not None else [0] * batch
        if len(self.pads) != batch:
            raise ValueError("one pad count per row")
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # Slots taken, per layer and row. The first forward (the prefill) carries the padding.
        self.host_lengths = [[0] * batch for _ in range(num_layers)]
        self.lengths = torch.tensor(self.host_lengths, device=device)  # the same, on the device
        self.pad_tensor = torch.tensor(self.pads, device=device)
        self._write_at: torch.Tensor | None = None  # per row: first slot of the current forward

    # -- the forward's view ------------------------------------------------------------------
    def begin(self, layer: int, tokens: int) -> torch.Tensor:
        """Starts a forward of `tokens` new tokens at `layer`'s lengths; returns the per-row
        first slot (a device tensor). Refuses to run past the capacity."""
        end = max(self.host_lengths[layer]) + tokens
        if end > self.capacity:
            if not self.grow:
                raise LsbenchError(f"KV cache overflow: {end} positions needed, capacity "
                                   f"{self.capacity}; size the cache for the job")
            self._resize(max(2 * end, self.capacity))
        self._write_at = self.lengths[layer]
        return self._write_at

    def used(self, layer: int, tokens: int) -> int:
        """Slots a forward of `tokens` at `layer` attends over: up to the longest row's end."""
        return max(self.host_lengths[layer]) + tokens

    def static(self, tokens: int) -> bool:
        """Whether a forward of `tokens` runs compiled, over the whole capacity."""
        return 0 < tokens <= self.max_step

    def buffers(self, layer: int, kv_heads: int, head_dim: int, like: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`'s key and value buffers, allocated on first use (fixed addresses, which
        CUDA graphs replay against)."""
        if self.keys[layer] is None:
            shape = (self.batch, kv_heads, self.capacity, head_dim)
            self.keys[layer], self.values[layer] = like.new_zeros(shape), like.new_zeros(shape)
            if like.device.type == "cuda" and self.max_step:
                torch._dynamo.mark_static_address(self.keys[layer])
                torch._dynamo.mark_static_address(self.values[layer])
        return self.keys[layer], self.values[layer]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new keys and values at each row's slots and returns the layer's buffers
        up to the longest row's end (the mask hides what a row must not see)."""
        self.buffers(layer_idx, key_states.shape[1], key_states.shape[-1], key_states)
        n = key_states.shape[-2]
        write_at = self._write_at.to(key_states.device)
        slots = write_at[:, None] + torch.arange(n, device=key_states.device)  # [B, T]
        index = slots[:, None, :, None].expand_as(key_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        end = self.used(layer_idx, n)
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, lo: int, hi: int, tokens: int) -> None:
        """Layers [lo, hi) have taken `tokens` more slots in every row."""
        self.lengths[lo:hi] += tokens
        for layer in range(lo, hi):
            self.host_lengths[layer] = [n + tokens for n in self.host_lengths[layer]]

    # -- rollback ------------------------------------------------------------------------------
    def set_lengths(self, committed: Sequence[int]) -> None:
        """Every layer of row b holds its first committed[b] logical positions (the rollback
        after verification: a length change, the stale slots are overwritten later)."""
        slots = [p + n for p, n in zip(self.pads, committed, strict=True)]
        if all(row == slots for row in self.host_lengths):
            return
        self.host_lengths = [list(slots) for _ in range(self.num_layers)]
        self.lengths.copy_(torch.tensor(slots).expand(self.num_layers, -1))

    def crop(self, length: int) -> None:
        """Every layer keeps at most its first `length` logical positions in every row."""
        self.host_lengths = [[min(n, p + length) for n, p in zip(row, self.pads, strict=True)]
                             for row in self.host_lengths]
        self.lengths.copy_(torch.tensor(self.host_lengths))

    def get_seq_length(self, layer_idx: int = 0, row: int = 0) -> int:
        """Logical positions `layer_idx` holds for `row` (host mirror: no sync)."""
        return self.host_lengths[layer_idx][row] - self.pads[row]

    def _resize(self, capacity: int) -> None:
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                if old is not None:
                    new = old.new_zeros((*old.shape[:2], capacity, old.shape[-1]))
                    new[:, :, : old.shape[2]] = old
                    buffers[i] = new
        self.capacity = capacity

    # -- what it occupies -------------------------------------------------------------------------
    def committed_bytes(self, row: int | None = None) -> int:
        """Bytes of the committed tokens' keys and values (one row, or all)."""
        rows = range(self.batch) if row is None else [row]
        total = 0
        for layer, buffer in enumerate(self.keys):
            if buffer is not None:
                per_slot = 2 * buffer.shape[1] * buffer.shape[-1] * buffer.element_size()
                total += per_slot * sum(max(self.get_seq_length(layer, r), 0) for r in rows)
        return total

    def capacity_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values)
                   if t is not None)


def attention_mask(cache: StaticKVCache, layer: int, tokens: int, window: int | None,
                   device: torch.device, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """[B, 1, T, S] mask of a forward of `tokens` new tokens at `layer`: query i of row b (slot
    length[b] + i) sees slots from pad[b] (no padding) up to its own (causal inside the new
    tokens) and, in a sliding-window layer, fewer than `window` positions back. Boolean for
    SDPA; additive (0 / dtype min) for eager attention, which adds it to the scores."""
    used = cache.capacity if cache.static(tokens) else cache.used(layer, tokens)
    start = cache.lengths[layer].to(device)[:, None, None]  # [B, 1, 1]
    query = start + torch.arange(tokens, device=device)[None, :, None]  # [B, T, 1] slots
    key = torch.arange(used, device=device)[None, None, :]  # [1, 1, S]
    keep = (key >= cache.pad_tensor.to(device)[:, None, None]) & (key <= query)
    keep |= key == query  # a padding query sees itself: no fully masked (NaN) softmax row
    if window is not None:
        keep &= query - key < window
    keep = keep[:, None]
    if not additive:
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(
        ~keep, torch.finfo(dtype).min)


class LayerSlot:
    """One layer's buffers as the `cache` a decoder layer updates inside a compiled forward:
    writes at each row's slots and returns the whole buffers (static shapes; the mask hides
    the unused slots). The layer index the layer passes is ignored, so one graph serves every
    layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_at: torch.Tensor):
        self.keys, self.values, self.write_at = keys, values, write_at

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.write_at[:, None] + torch.arange(key_states.shape[-2],
                                                      device=key_states.device)
        index = slots[:, None, :, None].expand_as(key_states)
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)
        return self.keys, self.values


def cache_bytes(*caches) -> int:
    """Bytes the committed tokens occupy over all the caches given: lsbench's static caches
    (committed lengths) and transformers' caches (each layer's keys and values)."""
    total = 0
    for cache in caches:
        if isinstance(cache, StaticKVCache):
            total += cache.committed_bytes()
            continue
        for layer in getattr(cache, "layers", None) or []:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def cache_capacity_bytes(*caches) -> int:
    """Bytes of the storage the caches hold, unused capacity included: what they occupy."""
    storages: dict[int, int] = {}
    for cache in caches:
        if isinstance(cache, StaticKVCache):
            tensors = [t for t in (*cache.keys, *cache.values) if t is not None]
        else:
            tensors = [getattr(layer, name, None) for layer in getattr(cache, "layers", None) or []
                       for name in ("keys", "values")]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def crop_cache(cache: StaticKVCache, length: int) -> None:
    """Batch-1 rollback: every layer keeps at most its first `length` logical positions."""
    cache.crop(length)
