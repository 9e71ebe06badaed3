"""Rollout Routing Replay (R3, arXiv 2510.11370) for MoE students.

The rollout engine and the trainer compute the router's top-k in different numerics (bf16 vs fp32,
other kernels), so near-ties send the same token to different experts, the trainer's log-probs drift
from the rollout's and the IS band of the objective masks those tokens. R3 records, at rollout time,
the experts every MoE layer chose for every token, and makes the trainer's forward use those experts.

    with record_routes(model) as rec:              # rollout: any number of forwards (generate)
        out = model.generate(...)
    routes = rec.routes(rows=B)                    # (B, T', L, k) int16, forwards concatenated on T
    with replay_routes(model, routes):             # trainer: one forward over (B, T)
        logits = model(...).logits

Both work by forward hooks on the router modules (no copy of the modeling code). A replay hook lets
the router run as usual (its logits carry the gradient), then swaps its chosen experts for the
recorded ones and recomputes the gate weights *from the current logits at the recorded experts*,
with the architecture's own weight formula (MiMo-V2-Flash: sigmoid scores, normalised over the k
chosen, times the routed scaling factor; Qwen3-MoE: softmax probabilities, renormalised over the
k chosen when ``norm_topk_prob``). So the router still gets a gradient through the replayed
experts' gate weights, as in the R3 paper; only the discrete choice is taken from the rollout.

Positions holding ``NOT_RECORDED`` (-1) in every slot are routed afresh (padding, and the last
sampled token, which generate never feeds back through the model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F

NOT_RECORDED = -1


def _sigmoid_gate_weights(router: torch.nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """MiMo-V2-Flash / DeepSeek-V3 style: sigmoid scores at the chosen experts (the correction bias
    only affects the choice, not the weights), normalised, scaled."""
    w = logits.float().sigmoid().gather(1, idx)
    if router.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * cast(float, router.routed_scaling_factor)


def _softmax_gate_weights(router: torch.nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Qwen3-MoE style: softmax probabilities at the chosen experts, renormalised if configured."""
    w = F.softmax(logits, dtype=torch.float, dim=-1).gather(1, idx)
    if router.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(logits.dtype)


GateWeights = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# The one list of supported students: model_type -> (its router's class name, the gate weight
# formula). Every router here returns (logits, weights, indices). The recipe check
# (mopd.config: rollout.routing_replay) reads the model types from here.
ROUTERS: dict[str, tuple[str, GateWeights]] = {
    "mimo_v2_flash": ("MiMoV2FlashTopkRouter", _sigmoid_gate_weights),
    "qwen3_moe": ("Qwen3MoeTopKRouter", _softmax_gate_weights),
}
# Router class name -> gate weight formula: how the hooks find a model's router modules.
GATE_WEIGHTS: dict[str, GateWeights] = dict(ROUTERS.values())


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The supported router modules of ``model`` in forward order (one per MoE layer)."""
    return [m for m in model.modules() if type(m).__name__ in GATE_WEIGHTS]


def _routers_or_fail(model: torch.nn.Module) -> list[torch.nn.Module]:
    routers = moe_routers(model)
    if not routers:
        raise ValueError(
            f"routing replay: {type(model).__name__} has no supported MoE router; "
            f"supported: {', '.join(sorted(GATE_WEIGHTS))}"
        )
    return routers


class RouteRecorder:
    """The experts each router chose, per forward call: ``calls[l]`` lists (N_s, k) int64 tensors
    (on the model's device until ``routes`` collects them)."""

    def __init__(self, n_layers: int) -> None:
        self.calls: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def routes(self, rows: int) -> torch.Tensor:
        """(rows, T', L, k) int16: the forwards' tokens laid end to end along T.

        Every forward processed ``rows`` sequences (e.g. generate's prefill over (rows, P), then
        one (rows, 1) step per sampled token), so T' is the sum of their lengths."""
        if not self.calls or not self.calls[0]:
            raise ValueError("routing replay: no routes were recorded (no forward ran in the context)")
        per_layer = []
        for layer_calls in self.calls:
            steps = []
            for idx in layer_calls:
                if idx.shape[0] % rows:
                    raise ValueError(f"routing replay: {idx.shape[0]} routed tokens do not split into {rows} rows")
                steps.append(idx.reshape(rows, -1, idx.shape[-1]))
            per_layer.append(torch.cat(steps, dim=1))
        return torch.stack(per_layer, dim=2).to("cpu", torch.int16)


@contextmanager
def record_routes(model: torch.nn.Module) -> Iterator[RouteRecorder]:
    """Record the experts every supported router chooses during the forwards run in the context."""
    routers = _routers_or_fail(model)
    rec = RouteRecorder(len(routers))

    def hook_for(layer: int):
        def hook(module, inputs, output):
            # Stays on the device: a copy to the host here would sync once per layer and step.
            rec.calls[layer].append(output[2].detach())

        return hook

    handles = [r.register_forward_hook(hook_for(i)) for i, r in enumerate(routers)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_routes(model: torch.nn.Module, routes: torch.Tensor | None) -> Iterator[None]:
    """Make every forward in the context route token (b, t) of MoE layer l to ``routes[b, t, l]``.

    routes: (B, T, L, k) integer, matching the forward's (B, T); rows of -1 are routed afresh.
    ``None`` replays nothing (a no-op context). The hooks run before any other forward hook on the
    routers, so others (e.g. the trainer's balance-loss capture) see the replayed experts.
    """
    if routes is None:
        yield
        return
    routers = _routers_or_fail(model)
    if routes.dim() != 4 or routes.shape[2] != len(routers):
        raise ValueError(
            f"routing replay: routes of shape {tuple(routes.shape)} for a model with {len(routers)} MoE layers "
            "(expected (B, T, L, k))"
        )

    def hook_for(layer: int):
        def hook(module, inputs, output):
            logits, weights, fresh = output
            given = routes[:, :, layer].reshape(-1, routes.shape[-1]).to(fresh.device, torch.int64)
            if given.shape != fresh.shape:
                raise ValueError(
                    f"routing replay: layer {layer} routed {tuple(fresh.shape)} (tokens, k) but the routes "
                    f"give {tuple(given.shape)}; replay needs one forward over the recorded (B, T)"
                )
            idx = torch.where(given >= 0, given, fresh)
            gate = GATE_WEIGHTS[type(module).__name__](module, logits, idx)
            return logits, gate.to(weights.dtype), idx

        return hook

    handles = [r.register_forward_hook(hook_for(i), prepend=True) for i, r in enumerate(routers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def align_routes(routes: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Fit recorded routes (B, T', L, k) to a batch's (B, T) columns: cut or fill with -1 on the
    right, and -1 at padding (those positions are then routed afresh)."""
    B, T = attention_mask.shape
    out = torch.full((B, T, *routes.shape[2:]), NOT_RECORDED, dtype=torch.int16)
    n = min(T, routes.shape[1])
    out[:, :n] = routes[:, :n]
    out[~attention_mask.bool()] = NOT_RECORDED
    return out
