"""rollout.kv_cache: the in-place key/value cache the HF rollout hands to ``generate``.

OMP_NUM_THREADS=1 pytest tests/test_kv_cache.py
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from mopd.config import BUILTIN_TOKENIZER, ModelConfig
from mopd.models import load_model, tiny_mimo_config
from rollout.kv_cache import PreallocatedLayer, preallocated_cache


def kv(batch: int, cols: int, gen: torch.Generator, heads: int = 2, dim: int = 4, vdim: int = 3):
    return torch.randn(batch, heads, cols, dim, generator=gen), torch.randn(batch, heads, cols, vdim, generator=gen)


def same_as_dynamic(pre: PreallocatedLayer, ref: DynamicLayer, k: torch.Tensor, v: torch.Tensor) -> None:
    got, want = pre.update(k, v), ref.update(k, v)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # data movement only: the stored columns are the same numbers
    assert pre.get_seq_length() == ref.get_seq_length()


def test_appends_in_place_within_capacity_and_holds_what_dynamic_layer_holds():
    gen = torch.Generator().manual_seed(0)
    pre, ref = PreallocatedLayer(capacity=12), DynamicLayer()
    same_as_dynamic(pre, ref, *kv(3, 5, gen))  # prefill
    first = pre.keys.data_ptr()
    for _ in range(7):  # decode steps up to the capacity
        same_as_dynamic(pre, ref, *kv(3, 1, gen))
        assert pre.keys.data_ptr() == first, "a step within the capacity must not move the cache"
    assert pre.get_seq_length() == 12


def test_grows_past_capacity_and_keeps_the_columns():
    gen = torch.Generator().manual_seed(1)
    pre, ref = PreallocatedLayer(capacity=4), DynamicLayer()
    same_as_dynamic(pre, ref, *kv(2, 3, gen))
    for _ in range(6):
        same_as_dynamic(pre, ref, *kv(2, 1, gen))
    same_as_dynamic(pre, ref, *kv(2, 5, gen))  # a chunk larger than what is left


def test_crop_select_and_reset_are_followed():
    gen = torch.Generator().manual_seed(2)
    pre, ref = PreallocatedLayer(capacity=16), DynamicLayer()
    same_as_dynamic(pre, ref, *kv(4, 6, gen))
    pre.crop(-2), ref.crop(-2)
    same_as_dynamic(pre, ref, *kv(4, 1, gen))  # written after the cropped view, not after the old end
    idx = torch.tensor([2, 0])
    pre.batch_select_indices(idx), ref.batch_select_indices(idx)
    same_as_dynamic(pre, ref, *kv(2, 1, gen))  # keys replaced by a tensor of its own: rebuffered
    pre.reset(), ref.reset()
    same_as_dynamic(pre, ref, *kv(5, 3, gen))  # another batch after a reset


def test_only_full_attention_layers_are_replaced():
    model = load_model(ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER), seed=0)
    cache = preallocated_cache(model, capacity=40)
    assert cache is not None
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[0] is PreallocatedLayer and kinds[3] is PreallocatedLayer
    assert kinds[1] is not PreallocatedLayer and kinds[2] is not PreallocatedLayer  # sliding windows


@torch.no_grad()
def test_generate_with_it_gives_what_generate_gives_with_its_own_cache():
    """Greedy decoding of a tiny hybrid (sliding + full attention) MoE student past its sliding
    window, with and without the preallocated cache: same tokens, scores equal to float tolerance."""
    model = load_model(ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER), seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked distributions: no argmax near-ties
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    kw = dict(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=48, min_new_tokens=48,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    ref = model.generate(**kw)
    cache = preallocated_cache(model, ids.shape[1] + 48)
    got = model.generate(**kw, past_key_values=cache)
    assert cache is not None and isinstance(cache.layers[0], PreallocatedLayer) and cache.get_seq_length() > 48
    assert torch.equal(got.sequences, ref.sequences)
    for g, r in zip(got.scores, ref.scores, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
