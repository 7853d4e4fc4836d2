"""Warm models: what a long-running process (hot folder, farm worker) keeps loaded.

Models, ControlNets and LoRA files are kept by identity (their loading options, or a
file's path, size and modification time) and bounded by memory: least recently used
first out. Jobs that alternate between two models that both fit load each once.
"""

from __future__ import annotations

import gc
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def module_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes held by the modules' parameters and buffers (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            pointer = tensor.data_ptr()
            if pointer in seen:
                continue
            seen.add(pointer)
            total += tensor.numel() * tensor.element_size()
    return total


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def default_budget() -> int:
    """Half the GPU's memory where there is one, else half the machine's RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


@dataclass
class _Entry:
    value: Any
    size: int
    kind: str


class ModelCache:
    """A least-recently-used store of loaded things, bounded by ``max_bytes``.

    Before a load, older entries make room for one more of the largest of its kind
    seen so far, so a GPU never holds the old model and the new one past the budget;
    the entry just loaded is never evicted, even if alone it exceeds the budget.
    ``loads`` and ``hits`` count by kind (the benchmark reads them).
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = default_budget() if max_bytes is None else max(0, int(max_bytes))
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._largest: dict[str, int] = {}
        self.loads: dict[str, int] = {}
        self.hits: dict[str, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def get(self, kind: str, key: Hashable, load: Callable[[], T], size: Callable[[T], int]) -> T:
        """The value stored under ``(kind, key)``, loading (and sizing) it on a miss."""
        full_key = (kind, key)
        entry = self._entries.get(full_key)
        if entry is not None:
            self._entries.move_to_end(full_key)
            self.hits[kind] = self.hits.get(kind, 0) + 1
            return entry.value
        self._make_room(self._largest.get(kind, 0))
        value = load()
        nbytes = size(value)
        self._largest[kind] = max(self._largest.get(kind, 0), nbytes)
        self._entries[full_key] = _Entry(value, nbytes, kind)
        self.loads[kind] = self.loads.get(kind, 0) + 1
        self._make_room(0, keep=full_key)
        return value

    def _make_room(self, incoming: int, keep: Hashable | None = None) -> None:
        evicted = False
        while self._entries and self.used_bytes + incoming > self.max_bytes:
            oldest = next(iter(self._entries))
            if oldest == keep:
                if len(self._entries) == 1:
                    break
                self._entries.move_to_end(oldest)
                continue
            del self._entries[oldest]
            evicted = True
        if evicted:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def clear(self) -> None:
        self._entries.clear()
        gc.collect()
