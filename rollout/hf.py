"""Student rollout with Hugging Face ``generate`` (the CPU-friendly backend; on a GPU when
``rollout.resources.num_gpus > 0``, see ``mopd.dist.devices``).

A plain class; ``rollout.pool.RolloutPool`` turns it into a Ray actor, tests use it in-process:

    actor = HFRolloutActor(cfg)
    batch = actor.generate(rows, n=4, seed=0)      # RolloutBatch, policy_version 0
    actor.load_weights(trainer_state_dict, version=1)          # rollout.weight_sync=driver
    actor.join_weight_sync(host, port, generation, rank, world, "gloo")   # rollout.weight_sync=direct
    actor.receive_weights(version=2)                           # trainer rank 0 sends at the same time
    actor.sleep(); actor.wake()                                # placement.layout=colocated (rollout/turns.py)

Rows of a domain with an environment (``environments.<domain>``) are rolled out over several turns
by rollout/multiturn.py, each turn one batched ``model.generate`` over the trajectories still
going; the other rows as one turn. Both parts come back as one batch in the order of the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from mopd.chat import stop_token_ids, student_tokenizer
from mopd.config import EnvironmentConfig, MOPDConfig
from mopd.dist.devices import worker_device
from mopd.dist.runtime import set_torch_threads
from mopd.dist.weight_sync import receive_into
from mopd.models import load_model, sequence_logprobs
from mopd.routing import align_routes, record_routes
from mopd.seeds import seed_for
from mopd.types import PromptRow, RolloutBatch
from rollout.batching import cut_at_stop, decode_responses, encode_prompts, left_pad, merge_batches, pack_samples
from rollout.kv_cache import preallocated_cache
from rollout.sync_member import SyncGroupMember
from rollout.turns import TakesTurns

if TYPE_CHECKING:
    from mopd.dist.env_pool import EnvPool
    from rollout.multiturn import Renderer


class HFRolloutActor(TakesTurns, SyncGroupMember):
    """Samples from the student with ``model.generate``; records the log-prob of each sampled token
    under the distribution it was drawn from (temperature and top-p applied). The model lives on
    the worker's device; inputs and results cross the actor boundary on the CPU. Asleep, a model on
    a GPU waits on the CPU; a CPU model stays where it is."""

    def __init__(self, cfg: MOPDConfig, replica: int = 0) -> None:
        set_torch_threads(cfg.rollout.resources.num_cpus)
        self.cfg = cfg
        self.replica = replica
        self.tokenizer = student_tokenizer(cfg)
        self.device = worker_device(cfg.rollout.resources, "rollout.resources")
        # Same call as the trainer's: version 0 here equals the trainer's initial weights.
        self.model = load_model(cfg.student, seed=cfg.run.seed).eval().to(self.device)
        # Every id that ends a response (EOS, end-of-turn, rollout.stop_token_ids): generate stops
        # on any of them and pack_samples cuts after it.
        self.stop_ids = stop_token_ids(cfg, self.tokenizer, self.model.config.get_text_config().vocab_size)
        self._clean_generation_config()
        self._version = 0
        self._env_pools: dict[str, EnvPool] = {}  # per multi-turn domain, started on first use
        self._renderer: Renderer | None = None

    @staticmethod
    def backend_env(num_gpus: float) -> Mapping[str, str]:
        """None of its own: torch's thread count comes with every actor (``mopd.dist.runtime``)."""
        return {}

    def _clean_generation_config(self) -> None:
        """Drop defaults a checkpoint may ship in generation_config.json (top_k, repetition penalty,
        ...): anything but temperature / top-p would make mu_theta differ from pi_theta at T. Its EOS
        ids are kept, with the tokenizer's and the recipe's, in ``stop_ids``."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        self.model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=list(self.stop_ids), pad_token_id=tok.pad_token_id
        )

    def _sampling_config(self, n: int, greedy: bool, max_new_tokens: int | None = None):
        from transformers import GenerationConfig

        r = self.cfg.rollout
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else r.temperature,
            top_p=1.0 if greedy else r.top_p,
            top_k=0,  # generate's global default is 50; 0 turns the top-k filter off
            max_new_tokens=r.max_new_tokens if max_new_tokens is None else max_new_tokens,
            num_return_sequences=n,
            eos_token_id=list(self.stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            output_scores=True,  # the processed scores: the distribution actually sampled from
            return_dict_in_generate=True,
        )

    @torch.no_grad()
    def generate(self, rows: list[PromptRow], n: int, seed: int, greedy: bool = False) -> RolloutBatch:
        """n samples of each prompt; trajectory i*n + k is sample k of rows[i] (group id i).

        ``greedy`` (evaluation): argmax decoding; rollout_logprobs are then temperature-1 log-probs.
        With ``rollout.routing_replay`` the batch carries the experts every MoE layer chose for every
        token (prefill and each sampling step; -1 where nothing was routed).

        Rows of a multi-turn domain are rolled out through their environment (module docstring);
        their trajectories carry ``episodes`` and interleaved masks."""
        self._check_awake("generate")
        envs = self.cfg.environments
        if not any(r.domain in envs for r in rows):
            return self._one_turn(rows, n, seed, greedy)
        if self.cfg.rollout.routing_replay:
            raise ValueError("rollout.routing_replay does not record the routes of multi-turn rollouts yet")
        parts = [[i for i, r in enumerate(rows) if r.domain not in envs]]
        parts += [
            [i for i, r in enumerate(rows) if r.domain == d] for d in sorted({r.domain for r in rows} & set(envs))
        ]
        batches, order = [], []
        for k, idx in enumerate(p for p in parts if p):
            part = [rows[i] for i in idx]
            domain = part[0].domain
            if domain in envs:
                batches.append(self._multi_turn(part, n, seed_for(seed, k), greedy, domain, envs[domain]))
            else:
                batches.append(self._one_turn(part, n, seed_for(seed, k), greedy))
            order += [i * n + s for i in idx for s in range(n)]  # where each of its trajectories belongs
        merged = merge_batches(batches, self.tokenizer.pad_token_id)
        where = {pos: j for j, pos in enumerate(order)}  # final position i*n + s -> merged row
        batch = merged.select([where[p] for p in range(len(rows) * n)])
        return replace(batch, group_ids=torch.arange(len(rows)).repeat_interleave(n))

    def _one_turn(self, rows: list[PromptRow], n: int, seed: int, greedy: bool) -> RolloutBatch:
        """n one-turn samples of each row (``generate``, the path of every domain without an environment)."""
        prompts = encode_prompts(self.tokenizer, rows)
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        routes = record_routes(self.model) if self.cfg.rollout.routing_replay else nullcontext()
        with torch.random.fork_rng(devices=[]), routes as rec:
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.long().to(self.device),
                generation_config=self._sampling_config(n, greedy),
                # Appends in place instead of DynamicCache's torch.cat of the whole cache per step.
                past_key_values=preallocated_cache(self.model, ids.shape[1] + self.cfg.rollout.max_new_tokens),
            )
        new_tokens = out.sequences[:, ids.shape[1] :]  # (B*n, R'), on the device like the scores
        logp = sampled_logprobs(out.scores, new_tokens).cpu()  # (B*n, R')
        new_tokens = new_tokens.cpu()
        samples = [(t.tolist(), lp.tolist()) for t, lp in zip(new_tokens, logp, strict=True)]
        batch = pack_samples(self.tokenizer, prompts, rows, samples, n, self._version, self.stop_ids)
        if rec is None:
            return batch
        # Same columns as the batch: generate's prompt is left-padded to the same P.
        return replace(batch, routed_experts=align_routes(rec.routes(rows=len(batch)), batch.attention_mask))

    def _multi_turn(
        self, rows: list[PromptRow], n: int, seed: int, greedy: bool, domain: str, env: EnvironmentConfig
    ) -> RolloutBatch:
        """n trajectories of each row of ``domain`` through its environment (rollout/multiturn.py)."""
        from mopd.envs import get_parser
        from rollout.multiturn import TurnLimits, make_renderer, pack_episodes, run_episodes

        if self._renderer is None:
            self._renderer = make_renderer(self.tokenizer, self.stop_ids)
        limits = TurnLimits(env.max_turns, env.max_tokens, self.cfg.rollout.max_new_tokens)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trajs = run_episodes(
                rows,
                n,
                pool=self._env_pool(domain, env),
                parser=get_parser(env.parser),
                renderer=self._renderer,
                generate_turn=lambda contexts, max_new: self._generate_turn(contexts, max_new, greedy),
                limits=limits,
                decode=lambda ids: decode_responses(self.tokenizer, [ids])[0],
            )
        return pack_episodes(trajs, self.tokenizer.pad_token_id, self._version)

    def _generate_turn(
        self, contexts: list[list[int]], max_new: list[int], greedy: bool
    ) -> list[tuple[list[int], list[float], bool]]:
        """One student turn for each context (left-padded into one ``generate``): its ids cut after
        the first stop token and to ``max_new[i]``, their log-probs, whether a stop token ended it."""
        ids, mask = left_pad(contexts, self.tokenizer.pad_token_id)
        longest = max(max_new)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.long().to(self.device),
            generation_config=self._sampling_config(1, greedy, longest),
            past_key_values=preallocated_cache(self.model, ids.shape[1] + longest),
        )
        new_tokens = out.sequences[:, ids.shape[1] :]
        logp = sampled_logprobs(out.scores, new_tokens).cpu()
        turns = []
        for tokens, lps, m in zip(new_tokens.cpu().tolist(), logp.tolist(), max_new, strict=True):
            tokens, lps, stopped = cut_at_stop(tokens, lps, self.stop_ids)
            turns.append((tokens[:m], lps[:m], stopped and len(tokens) <= m))
        return turns

    def _env_pool(self, domain: str, env: EnvironmentConfig) -> EnvPool:
        """The environment pool of ``domain`` (``environments.<domain>.workers`` Ray actors, or
        in-process with 0), started on first use and kept until ``shutdown``."""
        if domain not in self._env_pools:
            from mopd.dist.env_pool import EnvPool

            self._env_pools[domain] = EnvPool(
                env.name,
                workers=max(1, env.workers),
                local=env.workers == 0,
                max_concurrent=env.max_concurrent,
                timeout_s=env.timeout_s,
                max_result_chars=env.max_result_chars,
                env_kwargs=dict(env.kwargs),
                plugins=self.cfg.run.plugins,
            )
        return self._env_pools[domain]

    def env_metrics(self) -> dict[str, float]:
        """Fault counters of the environment pools (``faults/env_restarts``, ``faults/env_wedged``)."""
        out: dict[str, float] = {}
        for pool in self._env_pools.values():
            for k, v in pool.metrics().items():
                out[k] = out.get(k, 0.0) + v
        return out

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Trainer weights (its ``model.state_dict()`` names, on any device: CPU tensors are copied to
        the model's); strict, so a mismatch fails loudly."""
        self._check_awake("load_weights")
        self.model.load_state_dict(state_dict, strict=True)
        self._version = int(version)

    def _receive(self, version: int) -> None:
        """Straight into the parameters, strict on names and shapes (rollout.weight_sync=direct)."""
        self._check_awake("receive_weights")
        assert self._link is not None
        receive_into(self._link, version, self.model.state_dict(keep_vars=True))

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) f32 teacher-forced log-probs at temperature 1 under the current weights, on CPU."""
        self._check_awake("logprobs")
        dev = self.device
        return sequence_logprobs(self.model, input_ids.to(dev), attention_mask.bool().to(dev)).cpu()

    def _release(self) -> None:
        if self.device.type != "cpu":
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the freed blocks back for the trainer to use

    def _restore(self) -> None:
        if self.device.type != "cpu":
            self.model.to(self.device)

    def version(self) -> int:
        return self._version

    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def shutdown(self) -> None:
        for pool in self._env_pools.values():
            pool.shutdown()
        self._env_pools = {}
        self.model = None
        self.leave_weight_sync()


def sampled_logprobs(scores: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """(B, R) f32 log-prob of ``tokens[:, t]`` under the processed scores of step t.

    scores: R tensors (B, V), as ``generate(output_scores=True)`` returns them (logits after the
    temperature / top-p warpers; filtered tokens are -inf). One step at a time, so no (B, R, V)
    tensor is ever built. Tokens generate pads with after EOS may be -inf; callers cut them off.
    The result is on the device of ``tokens``."""
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, s in enumerate(scores):
        out[:, t] = torch.log_softmax(s.float(), -1).gather(-1, tokens[:, t : t + 1]).squeeze(-1)
    return out


if TYPE_CHECKING:  # mypy holds the class to the contract RolloutPool calls (rollout/backend.py)
    from rollout.backend import RolloutBackend, RolloutWorker

    _backend: RolloutBackend = HFRolloutActor  # the constructor, as the pool calls it

    def _conforms(actor: HFRolloutActor) -> RolloutWorker:  # an error here names the method that differs
        return actor
