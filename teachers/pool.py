"""The teacher pool: the teacher workers of every domain, each row of a rollout batch scored by the
teacher of its domain.

    pool = TeacherPool(cfg.teachers, seed=cfg.run.seed, student_tokenizer_signature=sig)
    scores, metrics = pool.score(batch, topk=0)   # scores aligned with batch rows

Workers run per worker group (``mopd.config.teacher_groups``: a full teacher, or the adapter
teachers of one base, which one worker serves with the base in memory once) as Ray actors
(``cfg.replicas`` per group, resources from ``cfg.resources``; with the run's placement group,
mopd/dist/placement.py, on the bundles ``placement.plan.teachers[group]``) or, with
``local=True``, one in-process worker per group (tests, debugging), all in one ``ActorGroup``
(mopd/dist/actors.py). An actor that dies is restarted by Ray (up to ``max_restarts`` times) and its rows
are scored again: a teacher's weights come from its path or seeded config, so the fresh actor scores
exactly as the old one did. Routing, splitting across
replicas and reassembly are pure functions below (``plan_shards``, ``assemble_scores``), tested
without Ray. Ray is imported only when actors are created.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mopd.chat import left_pad, prompt_ids, teacher_prompt_tokenizer
from mopd.config import ObjectiveConfig, RayConfig, TeacherConfig, TeacherGroup, teacher_groups
from mopd.dist.actors import ActorGroup
from mopd.dist.placement import RunPlacement
from mopd.dist.runtime import split_evenly
from mopd.types import RolloutBatch, TeacherScores
from mopd.vocab import check_vocabularies
from teachers.backend import worker_class


class TeacherScoreError(RuntimeError):
    """A teacher returned scores that do not line up with the rows it was sent."""


@dataclass(frozen=True)
class Shard:
    """The rows of a batch (indices, in batch order) sent to one replica of one domain's teacher."""

    domain: str
    replica: int
    rows: list[int]


# --------------------------------------------------------------------------- pure routing


def group_rows(domains: Sequence[str], teachers: Sequence[str]) -> dict[str, list[int]]:
    """Row indices per domain, in batch order; a domain without a teacher raises ValueError."""
    known = set(teachers)
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        if d not in known:
            raise ValueError(f"no teacher for domain '{d}'; configured teachers: {', '.join(sorted(known))}")
        groups.setdefault(d, []).append(i)
    return groups


def plan_shards(domains: Sequence[str], replicas: Mapping[str, int]) -> list[Shard]:
    """One shard per (domain, replica) that gets rows: each domain's rows split evenly across its
    replicas. ``replicas`` maps every configured domain to its number of workers."""
    shards = []
    for domain, rows in group_rows(domains, list(replicas)).items():
        for r, (start, end) in enumerate(split_evenly(len(rows), replicas[domain])):
            shards.append(Shard(domain, r, rows[start:end]))
    return shards


def check_shard_result(shard: Shard, result: TeacherScores, num_cols: int, topk: int) -> None:
    """Raise TeacherScoreError unless ``result`` has one (num_cols,) row per row of ``shard``."""
    who = f"teacher '{shard.domain}' (replica {shard.replica})"
    rows, cols = result.logprobs.shape
    if rows != len(shard.rows):
        raise TeacherScoreError(f"{who} returned scores for {rows} rows but was sent {len(shard.rows)}")
    if cols != num_cols:
        raise TeacherScoreError(f"{who} returned {cols} columns, expected {num_cols}")
    if (topk > 0) != (result.topk_ids is not None):
        raise TeacherScoreError(f"{who}: top-k scores {'missing' if topk > 0 else 'not requested'} (topk={topk})")


def assemble_scores(
    shards: Sequence[Shard], results: Sequence[TeacherScores], num_rows: int, num_cols: int, topk: int = 0
) -> TeacherScores:
    """Scatter per-shard scores back to batch order: (num_rows, num_cols) log-probs and, with
    ``topk``, (num_rows, num_cols, K) top-k tensors; ``latency_s`` is the slowest shard's."""
    if len(shards) != len(results):
        raise TeacherScoreError(f"{len(results)} results for {len(shards)} shards")
    for shard, res in zip(shards, results, strict=True):
        check_shard_result(shard, res, num_cols, topk)
    out = TeacherScores(logprobs=torch.zeros(num_rows, num_cols, dtype=torch.float32))
    if topk > 0 and results:
        k = _common_k(shards, results)
        out.topk_ids = torch.zeros(num_rows, num_cols, k, dtype=torch.int64)
        out.topk_logprobs = torch.zeros(num_rows, num_cols, k, dtype=torch.float32)
    for shard, res in zip(shards, results, strict=True):
        idx = torch.as_tensor(shard.rows, dtype=torch.long)
        out.logprobs[idx] = res.logprobs
        if out.topk_ids is not None and out.topk_logprobs is not None:
            assert res.topk_ids is not None and res.topk_logprobs is not None  # check_shard_result
            out.topk_ids[idx] = res.topk_ids
            out.topk_logprobs[idx] = res.topk_logprobs
    out.latency_s = max((r.latency_s for r in results), default=0.0)
    return out


def _common_k(shards: Sequence[Shard], results: Sequence[TeacherScores]) -> int:
    ks = {_k(r) for r in results}
    if len(ks) != 1:
        got = ", ".join(f"{s.domain}: {_k(r)}" for s, r in zip(shards, results, strict=True))
        raise TeacherScoreError(f"teachers returned different top-k sizes ({got})")
    return ks.pop()


def _k(scores: TeacherScores) -> int:
    assert scores.topk_ids is not None  # check_shard_result: present when top-k was requested
    return scores.topk_ids.shape[-1]


def domain_metrics(
    shards: Sequence[Shard], results: Sequence[TeacherScores], row_domains: Sequence[str] | None = None
) -> dict[str, float]:
    """``teacher/<domain>/latency_s`` (slowest replica: they run in parallel) and
    ``teacher/<domain>/rows`` for every domain present in the batch. A shard of a worker group
    that serves several domains (adapter teachers) counts for each domain of its rows: pass
    ``row_domains``, the domain of every batch row (None: a shard's ``domain`` is its rows')."""
    metrics: dict[str, float] = {}
    for shard, res in zip(shards, results, strict=True):
        domains = [shard.domain] * len(shard.rows) if row_domains is None else [row_domains[i] for i in shard.rows]
        for domain in dict.fromkeys(domains):
            lat, rows = f"teacher/{domain}/latency_s", f"teacher/{domain}/rows"
            metrics[lat] = max(metrics.get(lat, 0.0), float(res.latency_s))
            metrics[rows] = metrics.get(rows, 0.0) + domains.count(domain)
    return metrics


def relayout_prompts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_len: int,
    prompts: Sequence[Sequence[int] | None],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The rows with their prompt part replaced by ``prompts[i]`` (None: the row's own prompt ids),
    left-padded to the longest, the response columns (from ``prompt_len`` on) unchanged after them.
    Returns (input_ids, attention_mask, response_mask, new prompt length)."""
    own = [input_ids[i, :prompt_len][attention_mask[i, :prompt_len].bool()].tolist() for i in range(len(prompts))]
    ids, mask = left_pad([own[i] if p is None else list(p) for i, p in enumerate(prompts)], pad_id)
    ids, mask, width = ids.to(input_ids.dtype), mask.to(attention_mask.dtype), ids.shape[1]
    resp = response_mask[:, prompt_len:]
    return (
        torch.cat([ids, input_ids[:, prompt_len:]], dim=1),
        torch.cat([mask, attention_mask[:, prompt_len:]], dim=1),
        torch.cat([torch.zeros_like(mask, dtype=resp.dtype), resp], dim=1),
        width,
    )


def restore_columns(scores: TeacherScores, scored_prompt_len: int, prompt_len: int, num_cols: int) -> TeacherScores:
    """Scores of a relaid-out shard (``relayout_prompts``) back in the batch's columns: response
    column j of the batch is column ``scored_prompt_len + j - prompt_len`` of ``scores``; prompt
    columns (never read: the response mask is 0 there) are zero."""

    def back(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        out = torch.zeros((t.shape[0], num_cols, *t.shape[2:]), dtype=t.dtype)
        out[:, prompt_len:] = t[:, scored_prompt_len:]
        return out

    logprobs = back(scores.logprobs)
    assert logprobs is not None
    return TeacherScores(
        logprobs=logprobs,
        topk_ids=back(scores.topk_ids),
        topk_logprobs=back(scores.topk_logprobs),
        latency_s=scores.latency_s,
    )


# --------------------------------------------------------------------------- the pool


def _forwarded_env(cfg: TeacherConfig) -> dict[str, str]:
    """The variable ``remote.api_key_env`` names, from this process to the actor (a cluster's
    workers do not share the driver's environment): the key itself never enters the recipe."""
    var = cfg.remote.api_key_env
    return {var: os.environ[var]} if var and var in os.environ else {}


class TeacherPool:
    """Owns the teacher workers of every domain and routes rollout rows to them.

    teachers  domain -> TeacherConfig
    seed      init seed for teachers built from an inline config; an int for all, or per domain
    student_tokenizer_signature  ``tokenizer_signature`` of the student; checked at start-up
    local     one in-process worker per domain instead of Ray actors
    max_topk  largest top-k the vLLM backend must serve (its engine caps ``max_logprobs``)
    env       extra environment variables for every actor (e.g. ``ray.env`` of the recipe)
    max_restarts  times Ray restarts a dead actor (its call is then retried); ``restarts`` counts them
    placement  the run's placement group: each domain's replicas on its bundles (None: Ray places them)
    The defaults of ``max_topk`` and ``max_restarts`` are the recipe's (``objective.topk``,
    ``ray.max_restarts`` in mopd/config.py).
    """

    def __init__(
        self,
        teachers: Mapping[str, TeacherConfig],
        seed: int | Mapping[str, int],
        student_tokenizer_signature: dict[str, Any] | None = None,
        local: bool = False,
        max_topk: int = ObjectiveConfig.topk,
        env: Mapping[str, str] | None = None,
        max_restarts: int = RayConfig.max_restarts,
        placement: RunPlacement | None = None,
    ) -> None:
        if not teachers:
            raise ValueError("no teachers configured: add at least one 'teachers.<domain>' entry")
        self.local = local
        self.domains = sorted(teachers)
        # One group for every domain's workers, so that the domains score concurrently.
        self._placement = placement
        pg = None if placement is None else placement.placement_group
        self._actors = ActorGroup(
            "teacher", max_restarts=max_restarts, local=local, placement_group=pg, owns_placement_group=False
        )
        # Worker groups: a full teacher each, or adapter teachers of one base together (one base in memory).
        self.groups = teacher_groups(teachers)
        self._group_of = {d: g.name for g in self.groups for d in g.domains}
        # Groups whose workers serve several adapters: their calls say each row's domain.
        self._multi_adapter = {g.name for g in self.groups if g.adapters is not None and len(g.adapters) > 1}
        self._replicas: dict[str, list[int]] = {}  # group -> indices of its workers in the actor group
        # Domains whose teacher renders the prompt part with a template of its own (chat rows).
        self._prompt_tokenizers = {
            d: tok for d in self.domains if (tok := teacher_prompt_tokenizer(teachers[d], f"teachers.{d}")) is not None
        }
        try:
            for g in self.groups:
                s = seed if isinstance(seed, int) else seed[g.domains[0]]
                self._replicas[g.name] = self._start(g, s, max_topk, dict(env or {}))
            self._actors.ready()
            self.signatures = self._signatures()
            check_vocabularies(self.signatures, student_tokenizer_signature)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, g: TeacherGroup, seed: int, max_topk: int, env: dict[str, str]) -> list[int]:
        cfg = g.cfg
        cls = worker_class(cfg.backend)
        kwargs: dict[str, Any] = {"max_logprobs": max_topk}  # teachers/backend.py: TeacherBackend
        if g.adapters is not None:
            kwargs["adapters"] = g.adapters
        if self.local:
            return self._actors.start(cls, [(g.name, cfg, seed)], kwargs={**kwargs, "set_threads": False})
        return self._actors.start(
            cls,
            [(g.name, cfg, seed)] * cfg.replicas,
            kwargs=kwargs,
            num_cpus=cfg.resources.num_cpus,
            num_gpus=cfg.resources.num_gpus,
            env=(cls.backend_env(cfg.resources.num_gpus), env, _forwarded_env(cfg)),
            label=f"'{g.name}' replica",
            bundles=None if self._placement is None else self._placement.plan.teachers[g.name],
        )

    def _signatures(self) -> dict[str, dict[str, Any]]:
        """One vocabulary signature per domain (a group's replicas share a config: the first speaks
        for every domain of the group)."""
        sigs = self._actors.call([(idx[0], "vocab_signature", ()) for idx in self._replicas.values()])
        by_group = dict(zip(self._replicas, sigs, strict=True))
        return {d: by_group[self._group_of[d]] for d in self.domains}

    @property
    def replicas(self) -> dict[str, int]:
        """Workers per domain (those of its group)."""
        return {d: len(self._replicas[self._group_of[d]]) for d in self.domains}

    def worker(self, domain: str, replica: int = 0) -> Any:
        """One worker of ``domain``'s teacher: a Ray actor handle, or the instance with ``local``."""
        return self._actors[self._replicas[self._group_of[domain]][replica]]

    @property
    def restarts(self) -> int:
        """Teacher actor restarts seen so far (``faults/teacher_restarts``)."""
        return self._actors.restarts

    def score(self, batch: RolloutBatch, topk: int = 0) -> tuple[TeacherScores, dict[str, float]]:
        """Scores of every row of ``batch`` by its domain's teacher, in batch order, and per-domain
        metrics. Rows of the domains of one worker group go to it together (adapter teachers: one
        forward, each row through its domain's adapter). Returns (TeacherScores with (B, T)
        logprobs [and (B, T, K) top-k], metrics)."""
        group_rows(batch.domains, self.domains)  # a domain without a teacher: the error names them
        row_groups = [self._group_of[d] for d in batch.domains]
        shards = plan_shards(row_groups, {g: len(idx) for g, idx in self._replicas.items()})
        B, T, P = *batch.input_ids.shape, batch.prompt_len
        calls, scored_prompt_len = [], []
        for s in shards:
            idx = torch.as_tensor(s.rows, dtype=torch.long)
            ids, mask, resp = batch.input_ids[idx], batch.attention_mask[idx], batch.response_mask[idx]
            p_scored = P
            toks = [self._prompt_tokenizers.get(batch.domains[i]) for i in s.rows]
            own = [
                None if tok is None or batch.rows[i].messages is None else prompt_ids(tok, batch.rows[i])
                for i, tok in zip(s.rows, toks, strict=True)
            ]  # chat rows rendered with their teacher's template; text rows as sampled
            if any(o is not None for o in own):
                tok = next(t for t in toks if t is not None)
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                ids, mask, resp, p_scored = relayout_prompts(ids, mask, resp, P, own, pad)
            scored_prompt_len.append(p_scored)
            args: tuple[Any, ...] = (ids, mask, resp, topk)
            if s.domain in self._multi_adapter:
                args += ([batch.domains[i] for i in s.rows],)
            calls.append((self._replicas[s.domain][s.replica], "score", args))
        results = self._actors.call(calls)
        results = [
            r if p == P else restore_columns(r, p, P, T) for r, p in zip(results, scored_prompt_len, strict=True)
        ]
        return assemble_scores(shards, results, B, T, topk), domain_metrics(shards, results, batch.domains)

    def shutdown(self) -> None:
        """Release every worker (vLLM engines first, then the actors). Safe to call twice."""
        self._actors.shutdown()
        self._replicas = {}
