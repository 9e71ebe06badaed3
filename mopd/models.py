"""Models and tokenizers: load from a directory or build from an inline config; the shared
teacher-forced log-prob computation every backend uses.

Heavy imports (transformers) happen inside functions so that ``import mopd`` stays light.
"""

from __future__ import annotations

import string
from typing import Any

import torch

from mopd.config import BUILTIN_TOKENIZER, ModelConfig

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Printable ASCII (letters, digits, punctuation, space) plus newline; one token per character.
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
CHAR_VOCAB_SIZE = 128  # 3 specials + 96 chars, padded to a multiple of 64

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_char_tokenizer():
    """A character-level tokenizer in Hugging Face format (round-trips exactly; saves and reloads
    with ``AutoTokenizer``). Every encoding starts with BOS; EOS ends a response."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD, padding_side="left"
    )


def load_tokenizer(spec: ModelConfig):
    """The tokenizer of a model entry, with left padding (prompts are left-padded)."""
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.path
    if source == BUILTIN_TOKENIZER:
        return build_char_tokenizer()
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def peft_lora_config(s: Any) -> Any:
    """PEFT's ``LoraConfig`` of ``student.lora`` (``mopd.config.LoraSettings``); ``[all-linear]``
    is PEFT's "all-linear"."""
    from peft import LoraConfig

    targets: Any = "all-linear" if list(s.target_modules) == ["all-linear"] else list(s.target_modules)
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets, bias="none")


def model_config(spec: ModelConfig) -> Any:
    """A model entry's ``transformers`` config (its inline ``config``, or ``path``'s config.json);
    reads no weights."""
    from transformers import AutoConfig

    if spec.config is not None:
        extra = dict(spec.config)
        return AutoConfig.for_model(extra.pop("model_type"), **extra)
    if spec.path is not None:
        return AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    raise ValueError("a model needs 'path' (a Hugging Face model directory) or 'config' (an inline model config)")


def tiny_mimo_config(vocab_size: int = CHAR_VOCAB_SIZE, **overrides: Any) -> dict[str, Any]:
    """A small ``MiMoV2FlashForCausalLM`` config (MoE with a dense first layer, hybrid
    sliding-window/global attention) that trains on two CPU cores."""
    cfg = dict(
        model_type="mimo_v2_flash",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        sliding_window=32,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


def _attn_impl(model_type: str, requested: str | None) -> str | None:
    if requested:
        return requested
    # MiMoV2Flash supports only eager attention (attention sinks, asymmetric V head dim).
    return "eager" if model_type == "mimo_v2_flash" else None


def load_model(spec: ModelConfig, seed: int = 0, dtype: str | None = None):
    """A causal LM from ``spec.path`` or built from ``spec.config`` (random init seeded by ``seed``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = DTYPES[dtype or spec.dtype]
    if spec.path is not None:
        config = AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
        impl = _attn_impl(config.model_type, spec.attn_implementation)
        kw = {"attn_implementation": impl} if impl else {}
        # Safetensors only: a pickled pytorch_model.bin could run code when loaded.
        return AutoModelForCausalLM.from_pretrained(
            spec.path, dtype=torch_dtype, trust_remote_code=spec.trust_remote_code, use_safetensors=True, **kw
        )
    if spec.config is None:
        raise ValueError("a model needs 'path' (a Hugging Face model directory) or 'config' (an inline model config)")
    cfg = dict(spec.config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    impl = _attn_impl(model_type, spec.attn_implementation)
    if impl:
        config._attn_implementation = impl
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    return model.to(torch_dtype)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> Any:
    """The model's output on padded rows (``attention_mask``; positions from it), or on rows packed
    end to end (``attention_mask`` None, ``position_ids`` restarting per row: mopd.batching)."""
    if attention_mask is None:
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
        **kwargs,
    )


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) f32 log-prob of ``input_ids[:, t]`` given columns < t; column 0 gets 0.

    ``logits`` is (B, T, V) as returned by the model (row t predicts token t + 1): the shift by one
    position happens here and only here."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, K) ids and log-probs of the k most likely next tokens at each position, aligned like
    ``token_logprobs`` (position t holds the distribution of token t); column 0 is filled with 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    vals, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    pad_v = torch.zeros_like(vals[:, :1])
    pad_i = torch.zeros_like(ids[:, :1])
    return torch.cat([pad_i, ids], 1), torch.cat([pad_v, vals], 1)


@torch.no_grad()
def sequence_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 32
) -> torch.Tensor:
    """Teacher-forced (B, T) f32 log-probs of every token, in chunks of ``batch_size`` rows."""
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        ids, am = input_ids[i : i + batch_size], attention_mask[i : i + batch_size]
        out.append(token_logprobs(forward_logits(model, ids, am).logits, ids))
    return torch.cat(out) if out else torch.zeros(input_ids.shape, dtype=torch.float32)
