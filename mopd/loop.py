"""The MOPD update loop, read as phases:

    sample prompts -> rollout -> score with teachers -> (verify) -> train -> sync weights

Each phase is timed and written against a small Protocol, so tests can plug in in-process fakes.
Only the pool classes touch Ray object refs; this module never calls ``ray.get``. The pools are
built and handed in by ``mopd.app.run.run_training`` (what ``mopd train`` runs).

With ``placement.layout: colocated`` the rollout shares the trainer's devices: it sleeps (frees
its device memory) before the train phase and wakes after it, before the weight sync; both are
timed (``timing/rollout_sleep``, ``timing/rollout_wake``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from mopd import checkpoint as ckpt
from mopd.config import ConfigError, MOPDConfig, to_dict
from mopd.data import PromptMixer
from mopd.metrics import MetricsWriter, PhaseTimer
from mopd.objective import get_objective, grpo_advantages
from mopd.seeds import rng_state_from_json, rng_state_to_json, step_seed
from mopd.types import PromptRow, RolloutBatch, TeacherScores, TrainBatch

log = logging.getLogger(__name__)


class ConfigMismatchError(ConfigError):
    """Resuming with a run setup that differs from what the checkpoint recorded (checked before
    any actor starts, by ``mopd.app.run.preflight``, and again in ``MOPDLoop.restore``)."""


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with NaN/inf losses or log-probs."""


class Rollout(Protocol):
    def generate(self, rows: list[PromptRow], n: int, seed: int, greedy: bool = False) -> RolloutBatch: ...
    def sync_from(self, trainer: Any, version: int) -> None: ...  # the trainer's weights, stamped version
    # placement.layout=colocated only: free the shared devices for the trainer / take them back.
    def sleep(self) -> None: ...
    def wake(self) -> None: ...


class Teachers(Protocol):
    def score(self, batch: RolloutBatch, topk: int = 0) -> tuple[TeacherScores, dict[str, float]]: ...


class Trainer(Protocol):
    def train_step(self, batch: TrainBatch) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def save_checkpoint(self, path: str, client_state: dict[str, Any]) -> None: ...
    def load_checkpoint(self, path: str) -> dict[str, Any]: ...
    def save_hf(self, path: str) -> None: ...


def teacher_fingerprint(cfg: MOPDConfig) -> dict[str, str]:
    """What identifies the teacher set: each domain's model path or inline config, and its adapter
    (an adapter teacher) or its server and served model (a remote teacher)."""
    out = {}
    for name, t in sorted(cfg.teachers.items()):
        ident = str(Path(t.path).resolve()) if t.path else "config:" + json.dumps(t.config, sort_keys=True)
        label = t.path or "inline config"
        if t.adapter is not None:
            ident += f" adapter:{Path(t.adapter).resolve()}"
            label = f"adapter {t.adapter} over {label}"
        if t.backend == "remote":
            ident += f" remote:{t.remote.url} {t.remote.model or t.path}"
            label = f"{t.remote.model or t.path} at {t.remote.url}"
        out[name] = hashlib.sha256(ident.encode()).hexdigest()[:16] + f" ({label})"
    return out


class MOPDLoop:
    """One MOPD run over already-constructed components."""

    def __init__(
        self,
        cfg: MOPDConfig,
        rollout: Rollout,
        teachers: Teachers,
        trainer: Trainer,
        mixer: PromptMixer,
        writer: MetricsWriter,
        eval_rows: Sequence[PromptRow] = (),
    ) -> None:
        self.cfg, self.rollout, self.teachers, self.trainer = cfg, rollout, teachers, trainer
        self.mixer, self.writer, self.eval_rows = mixer, writer, list(eval_rows)
        self.step = 0
        self.policy_version = 0
        self.nonfinite_streak = 0
        self.ckpt_root = ckpt.checkpoint_root(cfg)
        # Colocated: the rollout shares the trainer's devices and sleeps while the trainer steps.
        self.colocated = cfg.placement.layout == "colocated"
        # rollout.overlap: the next step's batch, generating in a background thread meanwhile.
        self._next: Future | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ rollout, maybe ahead
    def _next_rows(self) -> list[PromptRow]:
        """The next step's prompts; always drawn on the driver thread, in step order."""
        return self.mixer.next_batch(self.cfg.rollout.prompts_per_step)

    def _generate(self, step: int, rows: list[PromptRow]) -> RolloutBatch:
        """The batch of step ``step`` (1-based) from ``rows``, with that step's seed."""
        return self.rollout.generate(rows, self.cfg.rollout.n, seed=step_seed(self.cfg.run.seed, step))

    def _start_next(self) -> None:
        """With ``rollout.overlap``, start generating step+1's batch with the current weights,
        unless this step ends with an eval or a checkpoint (both want the pipeline empty, so that
        a resumed run generates exactly what the uninterrupted one did) or is the last."""
        step, total = self.step + 1, self.cfg.run.total_steps
        if not self.cfg.rollout.overlap or step >= total or self._due_at(step, self.cfg.checkpoint.every):
            return
        if self.eval_rows and self._due_at(step, self.cfg.eval.every):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mopd-rollout")
        self._next = self._pool.submit(self._generate, step + 1, self._next_rows())

    def _finish_next(self) -> None:
        """Wait for the batch generating ahead (before the rollout weights change or are used)."""
        if self._next is not None:
            self._next.result()

    def close(self) -> None:
        """Wait for a generation still running ahead (its error, if any, is not raised) and stop the thread."""
        if self._next is not None:
            try:
                self._next.result()
            except BaseException:
                pass
            self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ one step
    def train_one_step(self) -> dict[str, float]:
        cfg, timer = self.cfg, PhaseTimer(total="step")
        with timer("rollout"):
            if self._next is not None:
                batch, self._next = self._next.result(), None
            else:
                batch = self._generate(self.step + 1, self._next_rows())
        self._start_next()
        with timer("teachers"):
            topk = get_objective(cfg.objective.kind).teacher_topk(cfg.objective)
            scores, teacher_metrics = self.teachers.score(batch, topk=topk)
        with timer("verify"):
            adv_orm, verify_metrics = self._outcome_advantages(batch)
        train_batch = TrainBatch(batch, scores.logprobs, adv_orm, scores.topk_ids, scores.topk_logprobs)
        if self.colocated:
            with timer("rollout_sleep"):
                self.rollout.sleep()
        with timer("train"):
            if self._finite_inputs(train_batch):
                metrics = self.trainer.train_step(train_batch)
                if metrics.get("train/skipped", 0.0) > 0:
                    log.warning("step %d: non-finite loss or gradient; the trainer skipped the update", self.step + 1)
            else:
                metrics = {"train/skipped": 1.0, "train/nonfinite_logprobs": 1.0}
        if self.colocated:
            with timer("rollout_wake"):  # before the weight sync, which writes into the engine
                self.rollout.wake()
        skipped = metrics.get("train/skipped", 0.0) > 0
        self._track_nonfinite(skipped)
        if self._next is not None:
            with timer("rollout_wait"):  # the part of the next step's rollout that this step did not hide
                self._finish_next()
        if not skipped:
            self.policy_version += 1
            with timer("sync"):
                self.rollout.sync_from(self.trainer, self.policy_version)
        self.step += 1
        out = {**metrics, **teacher_metrics, **verify_metrics, **rollout_metrics(batch), **timer.metrics()}
        out.update(self._fault_metrics(batch))
        out["policy_version"] = float(self.policy_version)
        out["rollout/policy_version"] = float(batch.policy_version)
        return out

    def _fault_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """``faults/<kind>_restarts``: actor restarts so far in this process (once there was one);
        with a multi-turn domain in the batch, the tool environments' (``faults/env_restarts``,
        ``faults/env_wedged``, as the rollout replicas report them)."""
        out = {}
        for kind, part in (("rollout", self.rollout), ("teacher", self.teachers)):
            n = getattr(part, "restarts", 0)
            if n:
                out[f"faults/{kind}_restarts"] = float(n)
        env_metrics = getattr(self.rollout, "env_metrics", None)
        if batch.episodes is not None and env_metrics is not None:
            out.update({k: v for k, v in env_metrics().items() if v})
        return out

    def _outcome_advantages(self, batch: RolloutBatch) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Outcome rewards (``outcome_rewards``) -> GRPO advantages (only when the objective uses
        them: alpha > 0)."""
        o = self.cfg.objective
        if not get_objective(o.kind).uses_outcome_reward(o):
            return None, {}
        rewards = torch.tensor(outcome_rewards(batch), dtype=torch.float32)
        metrics = {
            f"verify/{d}/reward": float(rewards[[i for i, x in enumerate(batch.domains) if x == d]].mean())
            for d in sorted(set(batch.domains))
        }
        return grpo_advantages(rewards, batch.group_ids), metrics

    def _finite_inputs(self, tb: TrainBatch) -> bool:
        """Whether the teachers' and the rollout's log-probs are finite on every response token (a
        NaN/inf there would poison the update; the trainer checks its own loss likewise)."""
        mask = tb.rollout.response_mask
        parts = {"teacher": tb.teacher_logprobs[mask], "rollout": tb.rollout.rollout_logprobs[mask]}
        if tb.teacher_topk_logprobs is not None:
            parts["teacher top-k"] = tb.teacher_topk_logprobs[mask]
        bad = [name for name, x in parts.items() if not bool(torch.isfinite(x).all())]
        if bad:
            log.warning("step %d: non-finite %s log-probs; update skipped", self.step + 1, " and ".join(bad))
        return not bad

    def _track_nonfinite(self, skipped: bool) -> None:
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        limit = self.cfg.objective.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            raise NonFiniteError(
                f"{self.nonfinite_streak} consecutive steps had NaN/inf losses or log-probs "
                f"(objective.max_nonfinite_steps={limit}); lower trainer.lr or check the teachers, "
                f"then continue with --resume from the last checkpoint"
            )

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        from tqdm import tqdm

        total = self.cfg.run.total_steps
        bar = tqdm(total=total, initial=self.step, desc="mopd", unit="step", dynamic_ncols=True)
        if self.step == 0 and self.eval_rows:
            self.writer.write(0, self._evaluate())
        try:
            while self.step < total:
                metrics = self.train_one_step()
                if self._due(self.cfg.eval.every) and self.eval_rows:
                    metrics.update(self._evaluate())
                self.writer.write(self.step, metrics)
                bar.set_postfix(
                    loss=f"{metrics.get('train/loss', float('nan')):.4f}",
                    kl=f"{metrics.get('train/reverse_kl', float('nan')):.3f}",
                )
                bar.update(1)
                if self._due(self.cfg.checkpoint.every) or self.step == total:
                    self.save()
        finally:
            self.close()
            bar.close()

    def _due(self, every: int) -> bool:
        """Whether a periodic action (every ``every`` steps, 0 = never) is due; always at the end."""
        return self._due_at(self.step, every)

    def _due_at(self, step: int, every: int) -> bool:
        return every > 0 and (step % every == 0 or step == self.cfg.run.total_steps)

    def _evaluate(self) -> dict[str, float]:
        timer = PhaseTimer()
        with timer("eval"):
            out = evaluate(self.rollout, self.eval_rows, seed=self.cfg.run.seed)
        return {**out, **timer.metrics()}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        tmp = ckpt.begin(self.ckpt_root, self.step)
        self.trainer.save_checkpoint(str(tmp / "trainer"), {"step": self.step})
        self.trainer.save_hf(str(tmp / "hf"))
        state = {
            "step": self.step,
            "policy_version": self.policy_version,
            "nonfinite_streak": self.nonfinite_streak,
            "data": self.mixer.state_dict(),
            "rng": {"python": rng_state_to_json(random.getstate()), "torch": torch.get_rng_state().tolist()},
            "teachers": teacher_fingerprint(self.cfg),
            "recipe": to_dict(self.cfg),
        }
        path = ckpt.commit(tmp, state, keep=self.cfg.checkpoint.keep)
        log.info("checkpoint saved: %s", path)
        return path

    def restore(self, path: Path, force_teachers: bool = False) -> None:
        state = ckpt.read_state(path)
        check_teacher_set(state.get("teachers", {}), teacher_fingerprint(self.cfg), force_teachers)
        self.trainer.load_checkpoint(str(path / "trainer"))
        self.step = int(state["step"])
        self.policy_version = int(state["policy_version"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.mixer.load_state_dict(state["data"])
        random.setstate(rng_state_from_json(state["rng"]["python"]))
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        # The rollout engines started from the initial weights: give them the restored ones.
        self.rollout.sync_from(self.trainer, self.policy_version)
        log.info("resumed from %s at step %d (policy version %d)", path, self.step, self.policy_version)


def check_teacher_set(saved: dict[str, str], current: dict[str, str], force: bool) -> None:
    """Raise ConfigMismatchError when the recipe's teachers (fingerprints by domain) differ from the
    checkpoint's, unless ``force`` (--force-teachers): then only warn."""
    if saved == current:
        return
    diff = sorted(set(saved) ^ set(current)) + sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    msg = (
        f"the teacher set differs from the checkpoint's (domains: {', '.join(diff)}); "
        f"checkpoint: {saved}; recipe: {current}. Resume with the same teachers, or pass "
        f"--force-teachers to continue anyway"
    )
    if not force:
        raise ConfigMismatchError(msg)
    log.warning("%s (forced)", msg)


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Per-domain response length, token share and share of responses truncated (no stop token
    before ``rollout.max_new_tokens``: a student that runs past its turn shows here first).
    Lengths count the tokens the student sampled (a multi-turn trajectory's tool results are not
    its response); multi-turn domains add their environment metrics (``episode_metrics``)."""
    lengths = batch.response_mask.sum(-1).float()
    total = float(lengths.sum()) or 1.0
    out = {"rollout/response_len": float(lengths.mean()), "rollout/tokens": float(lengths.sum())}
    truncated = None if batch.truncated is None else batch.truncated.float()
    if truncated is not None:
        out["rollout/truncated_frac"] = float(truncated.mean())
    for d in sorted(set(batch.domains)):
        idx = torch.tensor([i for i, x in enumerate(batch.domains) if x == d])
        out[f"rollout/{d}/response_len"] = float(lengths[idx].mean())
        out[f"teacher/{d}/token_share"] = float(lengths[idx].sum()) / total
        if truncated is not None:
            out[f"rollout/{d}/truncated_frac"] = float(truncated[idx].mean())
    if batch.episodes is not None:
        out.update(episode_metrics(batch))
    return out


def episode_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Per multi-turn domain: means over its trajectories of ``rollout/<d>/turns`` (student turns:
    runs of sampled tokens, also those a limit cut before their environment step), ``tool_calls``,
    ``tool_errors``, ``tool_timeouts``, ``tool_latency_s`` (per step), ``tool_truncated`` (share of
    results cut), ``env_reward`` (over those rewarded), ``context_tokens`` (tool results and template
    glue), and the share stopped by each limit, ``stop_<max_turns|max_tokens|max_new_tokens>``."""
    from mopd.envs.base import LIMIT_STOPS, summarize

    assert batch.episodes is not None
    context = (batch.attention_mask & ~batch.response_mask)[:, batch.prompt_len :].sum(-1).float()
    sampled = batch.response_mask.int()
    turns = (sampled[:, 1:] > sampled[:, :-1]).sum(-1).float() + sampled[:, 0]  # starts of sampled runs
    out: dict[str, float] = {}
    for d in sorted(set(batch.domains)):
        pairs = [(i, e) for i, (x, e) in enumerate(zip(batch.domains, batch.episodes, strict=True)) if x == d]
        idx = [i for i, e in pairs if e is not None]
        stats = [e for _, e in pairs if e is not None]
        if not stats:  # a one-turn domain
            continue
        out.update(summarize(stats, d))
        out[f"rollout/{d}/turns"] = float(turns[idx].mean())
        out[f"rollout/{d}/context_tokens"] = float(context[idx].mean())
        for why in LIMIT_STOPS:
            out[f"rollout/{d}/stop_{why}"] = sum(s.stop == why for s in stats) / len(stats)
    return out


# ---------------------------------------------------------------------- evaluation


def outcome_rewards(batch: RolloutBatch) -> list[float]:
    """Each trajectory's outcome reward: a multi-turn one's from its environment (0.0 where it gave
    none: a trajectory a limit stopped, or an environment without rewards), the others' from the
    verifier their source names (``row.verifier``, mopd/verifiers/) or else their domain's, all
    of a batch at once on this process's verifier pool (``mopd.verifiers.shared_pool``)."""
    from mopd.domains import get_verifier
    from mopd.verifiers import shared_pool

    episodes = batch.episodes if batch.episodes is not None else [None] * len(batch.rows)
    rewards = [0.0 if ep is None else float(ep.reward or 0.0) for ep in episodes]
    one_turn = [i for i, ep in enumerate(episodes) if ep is None]
    if one_turn:
        rows = [batch.rows[i] for i in one_turn]
        specs = [r.verifier if r.verifier is not None else get_verifier(r.domain).verify for r in rows]
        scores = shared_pool().verify(specs, rows, [batch.responses[i] for i in one_turn])
        for i, score in zip(one_turn, scores, strict=True):
            rewards[i] = score
    return rewards


def eval_samples(
    rollout: Rollout, rows: list[PromptRow], n: int = 1, seed: int = 0, greedy: bool = True
) -> tuple[RolloutBatch, list[list[float]]]:
    """``n`` responses per row (greedy: argmax decoding, n = 1) and their outcome rewards
    (``outcome_rewards``), one list of ``n`` per row in the order of ``rows``: what the in-run
    eval (``evaluate``) and ``mopd eval`` (mopd/app/evaluate.py) score."""
    batch = rollout.generate(rows, n, seed=seed, greedy=greedy)
    rewards = outcome_rewards(batch)  # sample k of rows[i] at i * n + k (RolloutPool.generate)
    return batch, [rewards[i * n : (i + 1) * n] for i in range(len(rows))]


def evaluate(rollout: Rollout, rows: list[PromptRow], seed: int = 0) -> dict[str, float]:
    """Greedy accuracy per domain (``outcome_rewards``: the verifier's, or a multi-turn domain's
    environment reward): ``eval/<domain>/accuracy``; a multi-turn domain adds its greedy episodes'
    stats (``episode_metrics``) as ``eval/<domain>/<key>``."""
    batch, rewards = eval_samples(rollout, rows, 1, seed, greedy=True)
    by_domain: dict[str, list[float]] = {}
    for row, (reward,) in zip(rows, rewards, strict=True):
        by_domain.setdefault(row.domain, []).append(reward)
    out = {f"eval/{d}/accuracy": sum(v) / len(v) for d, v in sorted(by_domain.items())}
    if batch.episodes is not None:
        out.update({"eval/" + k.removeprefix("rollout/"): v for k, v in episode_metrics(batch).items()})
    return out
