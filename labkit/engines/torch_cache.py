"""KV-cache decoding modes for the PyTorch backend, and what each costs per generated token.

Three ways to produce token t+1 (`MODES`, all exact: same tokens as `generate`):

    none     recompute the whole prefix every step (TorchStepper cache="none"):
             step t runs every decoder layer over t tokens, so per-token cost grows O(t)
    dynamic  Hugging Face's DynamicCache (TorchStepper cache="dynamic"): keeps K/V and
             appends with torch.cat, which re-allocates and copies the whole cache each step
    static   PreallocatedCache below: K/V buffers of a fixed capacity allocated once,
             the new position written in place; attention reads a view of the filled prefix

In every cached mode cross-attention K/V are computed once per source (the cross
half of the EncoderDecoderCache) and reused at every step. `position_costs` times
every step of a forced-length decode, so the notebook can plot time per step
against position for each mode, greedy vs beam, batch 1 vs 8.

    stepper = StaticStepper(model, capacity=129)
    decode(stepper, ids, mask, DecodeConfig(forced_length=128))

Left out: paged / block caches (serving many requests of different lengths),
quantized caches, and torch.compile of the fixed-shape variant.
"""

from __future__ import annotations

import torch

from labkit.core.decode import TorchStepper

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # transformers < 5 has no layer classes; labkit needs 5.x anyway
    Cache, CacheLayerMixin = object, object

# --------------------------------------------------------------------------- the preallocated cache


class PreallocatedLayer(CacheLayerMixin):
    """One layer's self-attention K/V in buffers of `capacity` positions, filled in place.

    update() copies the new positions into the buffer and returns views of the
    filled prefix [0, length): nothing is re-allocated while decoding, and
    attention only reads positions that exist.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.k_buf = self.v_buf = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        # empty, not zeros: positions >= length are never read
        self.k_buf = key_states.new_empty(b, h, self.capacity, d)
        self.v_buf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded at position {end}; "
                             "create the stepper with capacity >= tokens to generate + 1")
        self.k_buf[:, :, start:end] = key_states
        self.v_buf[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # as a dynamic cache: the mask covers the filled prefix only

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reorder of the filled prefix, back into the same buffers (a new pair if the row count changes)."""
        if not self.length:
            return
        n = self.length
        keys, values = self.k_buf[:, :, :n].index_select(0, beam_idx), self.v_buf[:, :, :n].index_select(0, beam_idx)
        if keys.shape[0] != self.k_buf.shape[0]:
            self.lazy_initialization(keys, values)
        self.k_buf[:, :, :n], self.v_buf[:, :, :n] = keys, values
        self.keys, self.values = self.k_buf[:, :, :n], self.v_buf[:, :, :n]

    def reset(self) -> None:
        self.length = 0


class PreallocatedCache(Cache):
    """A self-attention cache of `n_layers` PreallocatedLayers; pair it with a DynamicCache for cross K/V."""

    def __init__(self, n_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])


# --------------------------------------------------------------------------- steppers


class StaticStepper(TorchStepper):
    """TorchStepper whose self-attention cache is preallocated (capacity positions) and written in place.

    capacity defaults to the model's position limit, which no decode can exceed;
    pass forced_length + 1 (the start token takes a position) to allocate less.
    """

    def __init__(self, model, capacity: int | None = None):
        super().__init__(model, cache="dynamic")
        self.cache_mode = "static"
        self.capacity = capacity or model.config.max_position_embeddings

    def _new_cache(self):
        from transformers import DynamicCache, EncoderDecoderCache

        n = len(self.model.model.decoder.layers)
        return EncoderDecoderCache(PreallocatedCache(n, self.capacity), DynamicCache())


def make_stepper(model, mode: str, capacity: int | None = None):
    """The stepper for one cache mode: make_stepper(model, "static", capacity=129)."""
    if mode == "static":
        return StaticStepper(model, capacity)
    if mode in ("none", "dynamic"):
        return TorchStepper(model, cache=mode)
    raise ValueError(f"unknown cache mode {mode!r}; known: {MODES}")


MODES = ("none", "dynamic", "static")
