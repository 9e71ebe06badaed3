"""A key/value cache for ``model.generate`` whose full-attention layers append in place.

transformers' ``DynamicCache`` grows each layer with ``torch.cat``: every decode step copies the
whole cache so far, so a response of R tokens copies O(R^2) key/value columns. What that costs
depends on the response length against the model's arithmetic: on CPU this cache made the rollout
of the 10.7M benchmark student 1.00x (128 tokens) to 1.17x (512 tokens) as fast, and SmolLM2-135M
no faster (docs/benchmarks.md, ``benchmarks/rollout_engines.py --backends hf,hf-dynamic``).

``PreallocatedLayer`` keeps the keys and values in a buffer sized once for the prompt plus
``max_new_tokens`` and hands attention a view of its filled part: a step writes only its own column.
Sliding-window layers keep transformers' own class (they trim themselves). Nothing else changes:
same masks, same attention calls, same tokens. Memory: from the first step the cache holds what
``DynamicCache`` reaches only when a row runs to ``max_new_tokens`` (the size a rollout has to fit
anyway), and it never needs the second copy that each ``torch.cat`` makes for a moment.

    cache = preallocated_cache(model, capacity=prompt_len + max_new_tokens)   # None: not for this model
    model.generate(..., past_key_values=cache)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` backed by a (B, H, capacity, D) buffer; ``keys`` / ``values`` are views of
    its first ``seq_len`` columns. Past the capacity the buffer doubles (one copy). Anything that
    replaces ``keys`` with a tensor of its own (``batch_select_indices``, ``reorder_cache``, ...) is
    noticed at the next update, which moves that tensor into a fresh buffer; ``crop`` shortens the
    view and the next update writes after it; after ``reset`` the next prefill writes over the
    buffers it keeps."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor, filled: int, end: int) -> bool:
        """Whether the buffers can take columns ``filled:end`` of these states: ``keys`` / ``values``
        are still their leading views, and batch, heads, dtype, device and room all match."""
        if self._buffers is None:
            return False
        kb, vb = self._buffers
        k, v = self.keys, self.values
        if filled and not (
            k is not None
            and v is not None
            and (k.data_ptr(), v.data_ptr(), k.stride(), v.stride())
            == (kb.data_ptr(), vb.data_ptr(), kb.stride(), vb.stride())
        ):
            return False
        return (
            kb.shape[:2] == key_states.shape[:2]
            and vb.shape[-1] == value_states.shape[-1]
            and kb.dtype == key_states.dtype
            and kb.device == key_states.device
            and end <= kb.shape[-2]
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = self.keys, self.values
        assert k is not None and v is not None
        filled = k.shape[-2] if k.numel() else 0
        end = filled + key_states.shape[-2]
        if not self._fits(key_states, value_states, filled, end):
            # New buffers of at least `end` columns, holding the `filled` columns there are.
            cap = max(end, self.capacity, 2 * filled)
            B, H, _, D = key_states.shape
            kb = key_states.new_empty(B, H, cap, D)
            vb = value_states.new_empty(B, H, cap, value_states.shape[-1])
            if filled:
                kb[:, :, :filled].copy_(k)
                vb[:, :, :filled].copy_(v)
            self._buffers = (kb, vb)
        kb, vb = self._buffers  # type: ignore[misc]
        kb[:, :, filled:end].copy_(key_states)
        vb[:, :, filled:end].copy_(value_states)
        self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
        return self.keys, self.values


def preallocated_cache(model, capacity: int) -> DynamicCache | None:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are ``PreallocatedLayer``s of
    ``capacity`` columns (prompt + new tokens); other layer kinds stay transformers' own. None for
    a model ``generate`` gives no ``DynamicCache`` (state-space or encoder-decoder models): pass it
    on as ``past_key_values`` and ``generate`` builds its own cache, as without it."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if model.config.is_encoder_decoder or (supports is not None and not supports()):
        return None
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
