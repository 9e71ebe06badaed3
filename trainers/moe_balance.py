"""MoE load balancing for students with sigmoid top-k routers (MiMo-V2-Flash, DeepSeek-V3 style).

Transformers computes an ``aux_loss`` for softmax routers (Mixtral, Qwen3-MoE) but not for these, and
their router correction bias is never updated by training: without a balance loss nothing keeps
expert load even. ``RouterCapture`` records each router's logits and chosen experts during the
training forward; ``sigmoid_balance_loss`` turns them into the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


class RouterCapture:
    """Records what each sigmoid top-k router (MiMo-V2-Flash / DeepSeek-V3 style) returned during a
    forward: ``(router_logits (N, E) f32, topk_indices (N, K) int64)`` per MoE layer, N = B * T.

    Transformers' ``output_router_logits=True`` returns the logits of such routers but not which
    experts were chosen (the choice adds a correction bias and group limits), and their models
    compute no ``aux_loss``; a forward hook reads the exact choice.
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias") and hasattr(m, "top_k")]
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._active = False
        for m in self.routers:
            m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self._active and isinstance(output, tuple) and len(output) == 3:
            self.records.append((output[0], output[2]))

    @contextmanager
    def capture(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        self.records, self._active = [], True
        try:
            yield self.records
        finally:
            self._active = False


def sigmoid_balance_loss(routes: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor) -> torch.Tensor:
    """Load-balancing loss for sigmoid routers (DeepSeek-V3's balance loss, over the batch's tokens).

    Per layer: ``E * sum_i f_i * P_i`` with f_i the fraction of routed slots that went to expert i
    and P_i the mean normalised affinity ``s_i / sum_j s_j`` (s = sigmoid(logits)); averaged over
    layers. Padding tokens (attention_mask False) are left out. 1.0 for perfectly uniform routing;
    the gradient flows through P to the router weights.

    Args:
        routes: per MoE layer, (router_logits (N, E), topk_indices (N, K)), N = B * T.
        attention_mask: (B, T) bool.
    """
    valid = attention_mask.reshape(-1).float()
    n_tokens = valid.sum().clamp(min=1.0)
    losses = []
    for logits, idx in routes:
        n_experts, k = logits.shape[-1], idx.shape[-1]
        scores = torch.sigmoid(logits.float())
        affinity = scores / scores.sum(-1, keepdim=True)
        p = (affinity * valid[:, None]).sum(0) / n_tokens
        counts = (F.one_hot(idx.long(), n_experts).sum(1).float() * valid[:, None]).sum(0)
        f = counts / (k * n_tokens)
        losses.append(n_experts * (f * p).sum())
    return torch.stack(losses).mean()
