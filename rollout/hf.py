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
from mopd.types import PromptRow, RolloutBatch
from rollout.batching import cut_at_stop, decode_responses, encode_prompts, left_pad, pack_samples
from rollout.kv_cache import preallocated_cache
from rollout.multiturn import EnvironmentRollouts
from rollout.sync_member import SyncGroupMember
from rollout.turns import TakesTurns

if TYPE_CHECKING:
    from mopd.dist.env_pool import EnvPool
    from rollout.multiturn import Renderer


class HFRolloutActor(EnvironmentRollouts, TakesTurns, SyncGroupMember):
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
        return self._generate_mixed(rows, n, seed, greedy, one_turn=self._one_turn, multi_turn=self._multi_turn)

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
        """n trajectories of each row of ``domain`` through its environment (rollout/multiturn.py).
        With ``rollout.routing_replay`` each turn's routes go to ``run_episodes`` beside it."""
        from rollout.multiturn import TurnLimits, pack_episodes, run_episodes

        limits = TurnLimits(env.max_turns, env.max_tokens, self.cfg.rollout.max_new_tokens)
        routes: list[torch.Tensor] | None = [] if self.cfg.rollout.routing_replay else None  # the last turn's
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trajs = run_episodes(
                rows,
                n,
                pool=self._env_pool(domain, env),
                parser=self._tool_parser(env),
                renderer=self._tool_renderer(),
                generate_turn=lambda contexts, max_new: self._generate_turn(contexts, max_new, greedy, routes),
                limits=limits,
                decode=lambda ids: decode_responses(self.tokenizer, [ids])[0],
                routes=None if routes is None else lambda: routes,
            )
        return pack_episodes(trajs, self.tokenizer.pad_token_id, self._version)

    def _generate_turn(
        self, contexts: list[list[int]], max_new: list[int], greedy: bool, routes: list[torch.Tensor] | None = None
    ) -> list[tuple[list[int], list[float], bool]]:
        """One student turn for each context (left-padded into one ``generate``): its ids cut after
        the first stop token and to ``max_new[i]``, their log-probs, whether a stop token ended it.
        A ``routes`` list is refilled with the experts the turn chose, per context (``turn_routes``)."""
        ids, mask = left_pad(contexts, self.tokenizer.pad_token_id)
        longest = max(max_new)
        recording = record_routes(self.model) if routes is not None else nullcontext()
        with recording as rec:
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
        if rec is not None and routes is not None:
            kept = [len(tokens) for tokens, _, _ in turns]
            routes[:] = turn_routes(rec.routes(rows=len(contexts)), [len(c) for c in contexts], kept)
        return turns

    def takes_adapter(self) -> bool:
        return False  # merged weights: generate runs the plain model

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
        self._shutdown_envs()
        self.model = None
        self.leave_weight_sync()


def turn_routes(routes: torch.Tensor, context_lens: Sequence[int], kept: Sequence[int]) -> list[torch.Tensor]:
    """Per context of one turn, the routes of its positions: the context's, then its ``kept``
    sampled tokens' ((n_i, L, k), n_i <= context_lens[i] + kept[i]; a token is routed when it is
    fed back to sample the next one, so the turn's last may have none).

    routes: (b, W + S - 1, L, k) as ``RouteRecorder.routes`` gives them for a ``generate`` over the
    contexts left-padded to W = max(context_lens) that took S steps (the prefill, then one step per
    token): context i sits in columns W - c_i .. W - 1, its s-th sampled token in column W + s."""
    W = max(context_lens)
    return [routes[i, W - c : W + n].clone() for i, (c, n) in enumerate(zip(context_lens, kept, strict=True))]


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
