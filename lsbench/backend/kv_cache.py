"""The KV cache the early-exit adapter decodes against: transformers cache layers whose
entries past a committed length are dropped by a length change (the rollback after
verification), and what they occupy."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in over-allocated buffers: appending copies
    only the new tokens (DynamicLayer re-concatenates the whole cache every step) and a
    rollback is a view. Capacity doubles when full."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._k = self._v = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if self._k is None or end > self._k.shape[-2]:
            self._k = self._grow(self._k, key_states, end)
            self._v = self._grow(self._v, value_states, end)
        self._k[..., self.length:end, :] = key_states
        self._v[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def _grow(self, old: torch.Tensor | None, new: torch.Tensor, needed: int) -> torch.Tensor:
        shape = (*new.shape[:-2], max(2 * needed, 256), new.shape[-1])
        buffer = new.new_empty(shape)
        if old is not None:
            buffer[..., : self.length, :] = old[..., : self.length, :]
        return buffer

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(self.length + tokens_to_remove, 0)
        self.keys, self.values = self._k[..., : self.length, :], self._v[..., : self.length, :]

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None
        self.length = 0


def cache_bytes(*caches) -> int:
    """Bytes the committed tokens occupy: keys and values of every layer at the length it
    holds (a cropped layer's view, not its buffer), over all the caches given."""
    total = 0
    for cache in caches:
        for layer in getattr(cache, "layers", None) or []:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def cache_capacity_bytes(*caches) -> int:
    """Bytes of the storage the caches' layers hold, over-allocated capacity included (a
    cropped layer keeps its storage): what the cache really occupies."""
    storages: dict[int, int] = {}
    for cache in caches:
        for layer in getattr(cache, "layers", None) or []:
            for name in ("_k", "_v", "keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.numel():
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def crop_cache(cache: Cache, length: int) -> None:
    """Drop every layer's entries past `length` (the rollback after verification)."""
    for i, layer in enumerate(cache.layers):
        extra = cache.get_seq_length(i) - length
        if extra > 0:
            layer.crop(-extra)
