"""KVCache: in-place buffers without gradients, concatenation with them; the same contents."""

from __future__ import annotations

import torch

from quietstar.model.cache import KVCache


def chunks(sizes, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 4, generator=gen).requires_grad_(requires_grad) for n in sizes]


def test_without_gradients_one_buffer_holds_every_update_in_place():
    cache = KVCache(capacity=10)
    parts = chunks([4, 3, 3])
    with torch.no_grad():
        for part in parts:
            keys, values = cache.update(part, part * 2, layer_idx=0)
            if part is parts[0]:
                first = keys.data_ptr()
    assert keys.data_ptr() == first  # never reallocated: the capacity was enough
    assert torch.equal(keys, torch.cat(parts, 2)) and torch.equal(values, torch.cat(parts, 2) * 2)
    assert cache.get_seq_length() == 10


def test_a_cache_without_capacity_grows_and_keeps_its_contents():
    cache = KVCache()
    parts = chunks([2, 5, 1, 7])
    with torch.no_grad():
        for part in parts:
            keys, _ = cache.update(part, part, layer_idx=0)
    assert torch.equal(keys, torch.cat(parts, 2))


def test_truncate_then_update_overwrites_the_dropped_tokens():
    text, thought, token = chunks([5, 3, 1])
    cache = KVCache(capacity=9)
    with torch.no_grad():
        cache.update(text, text, 0)
        cache.update(thought, thought, 0)
        cache.truncate(5)
        keys, _ = cache.update(token, token, 0)
    assert torch.equal(keys, torch.cat([text, token], 2))


def test_with_gradients_the_cache_concatenates_and_gradients_flow():
    parts = chunks([3, 2], requires_grad=True)
    cache = KVCache(capacity=8)
    cache.update(parts[0], parts[0], 0)
    keys, values = cache.update(parts[1], parts[1], 0)
    (keys * torch.arange(5.0).view(1, 1, 5, 1)).sum().backward()
    assert torch.equal(parts[0].grad, torch.arange(3.0).view(1, 1, 3, 1).expand_as(parts[0]))
    assert torch.equal(parts[1].grad, torch.arange(3.0, 5.0).view(1, 1, 2, 1).expand_as(parts[1]))
