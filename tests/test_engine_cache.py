"""The warm model cache: kept by identity, bounded by memory, least recently used out."""

from __future__ import annotations

import torch

from psd_collage.engine.cache import ModelCache, module_bytes


def _loader(cache: ModelCache, log: list[str], name: str, size: int):
    def load() -> tuple[str, int]:
        log.append(f"{name} (holding {cache.used_bytes})")
        return name, size

    return lambda: cache.get("model", name, load, lambda value: value[1])


def test_alternating_between_two_models_that_fit_loads_each_once():
    cache, log = ModelCache(max_bytes=100), []
    a, b = _loader(cache, log, "a", 40), _loader(cache, log, "b", 40)
    for _ in range(5):
        assert a() == ("a", 40) and b() == ("b", 40)
    assert log == ["a (holding 0)", "b (holding 40)"]
    assert cache.loads == {"model": 2} and cache.hits == {"model": 8}


def test_a_budget_for_one_frees_the_old_model_before_loading_the_next():
    cache, log = ModelCache(max_bytes=60), []
    a, b = _loader(cache, log, "a", 40), _loader(cache, log, "b", 40)
    a(), b(), a()
    # "b" was loaded with nothing held: the old model never sits beside the new one.
    assert log == ["a (holding 0)", "b (holding 0)", "a (holding 0)"]
    assert cache.used_bytes == 40


def test_least_recently_used_goes_first_and_one_oversized_entry_is_still_kept():
    cache, log = ModelCache(max_bytes=100), []
    a, b, c = (_loader(cache, log, n, 30) for n in "abc")
    a(), b(), a(), c()  # 90 bytes held; a is newer than b
    huge = _loader(cache, log, "huge", 500)
    huge()
    assert cache.used_bytes == 500  # alone, over budget: kept, everything else went
    log.clear()
    a()
    assert log == ["a (holding 0)"]


def test_kinds_are_kept_apart():
    cache = ModelCache(max_bytes=100)
    one = cache.get("model", "x", lambda: 1, lambda _: 10)
    two = cache.get("controlnet", "x", lambda: 2, lambda _: 10)
    assert (one, two) == (1, 2) and cache.loads == {"model": 1, "controlnet": 1}


def test_module_bytes_counts_parameters_and_buffers_and_shared_tensors_once():
    linear = torch.nn.Linear(10, 10)  # 110 float32 parameters
    norm = torch.nn.BatchNorm1d(10)  # 20 parameters + 21 buffer values (one int64)
    assert module_bytes([linear]) == 110 * 4
    assert module_bytes([linear, linear]) == 110 * 4
    assert module_bytes([norm]) == (20 + 20) * 4 + 8
