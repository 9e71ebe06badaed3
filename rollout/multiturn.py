"""Multi-turn rollouts over tool environments, token in / token out, whatever the engine.

A domain with an environment (``environments.<domain>`` in the recipe) rolls each prompt out as
one trajectory of several student turns. The backend supplies one function, ``generate_turn``;
this module does the rest:

    renderer = make_renderer(tokenizer, stop_ids)            # tool messages -> appended ids
    trajs = run_episodes(rows, n, pool=pool, parser=get_parser("hermes"), renderer=renderer,
                         generate_turn=backend_turn, limits=TurnLimits(4, 512, 64), decode=decode)
    batch = pack_episodes(trajs, pad_id, policy_version)     # RolloutBatch with interleaved masks

``generate_turn(contexts, max_new) -> [(tokens, logprobs, stopped)]``: one student turn for each
context (prompt + everything so far, as ids), at most ``max_new[i]`` tokens, cut after the first
stop token (EOS / end-of-turn; ``stopped`` says one ended it), with the log-prob of each sampled
token under the distribution it was drawn from.

One trajectory is one row: ``[prompt][turn 1][tool result 1][turn 2] ... [turn k]``. Only the
sampled tokens are ``response_mask`` (each turn's stop token included) and carry rollout
log-probs; tool results and the template's glue are context: the teacher prefills them and nobody
trains on them. Ids are only ever appended: a turn's tokens are kept as sampled (never decoded and
encoded again) and a tool result is rendered on its own (``ChatRenderer``), so a template that
rewrites history (e.g. drops earlier ``<think>`` blocks) cannot change the ids of earlier turns.

Turns are taken in rounds: every trajectory still going samples its next turn in one batched
``generate_turn``, its calls go to the environment pool at once (tools of different trajectories
run concurrently), and the round ends when the results are in. Rounds keep the batches the same
from run to run, so seeded sampling stays reproducible (``--resume`` is bitwise).

A trajectory stops (``Trajectory.stop``, also ``TrajectoryStats.stop``) when the environment ends
the episode (``done``: a final answer, ``finish``), or at a limit: ``max_turns`` (a turn that still
calls a tool after the last allowed turn), ``max_tokens`` (the trajectory's token budget after the
prompt), ``max_new_tokens`` (one turn ran past ``rollout.max_new_tokens`` without a stop token).
Every stop but ``done`` marks the trajectory truncated. A call that does not parse is answered by
an error message as its tool result (mopd/envs/base.py ``apply_step``), never an exception.

Routing replay (``rollout.routing_replay``, an MoE student) keeps ``GenerateTurn`` as it is: the
backend also passes ``routes``, a function called right after each ``generate_turn`` that returns,
per context of that call, the experts its engine chose at each position of the context followed
by the turn's tokens ((n_i, L, k) int16, -1 where it computed nothing). Each trajectory keeps, per
position, the routes of the first turn that computed it (``Trajectory.add_routes``): the prompt's
from turn 1, a tool result's from the turn that prefilled it, a sampled token's from the turn
that sampled it (fed back when the next one was sampled). ``pack_episodes`` lays them out like
the batch's columns, as ``mopd.routing.align_routes`` does for one turn.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mopd.envs.base import Message
from mopd.envs.parsers import ToolCallParser
from mopd.routing import NOT_RECORDED
from mopd.seeds import seed_for
from mopd.types import PromptRow, RolloutBatch
from rollout.batching import merge_batches, pack_rollout

if TYPE_CHECKING:
    from mopd.config import EnvironmentConfig, MOPDConfig
    from mopd.dist.env_pool import EnvPool
    from mopd.envs.base import TrajectoryStats

# generate_turn(contexts, max_new) -> per context (sampled ids, their log-probs, ended by a stop token)
GenerateTurn = Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float], bool]]]
# routes() -> per context of the last generate_turn, (n_i, L, k) int16 routes of context + turn (module docstring)
TurnRoutes = Callable[[], Sequence[torch.Tensor]]


class TemplateError(ValueError):
    """A chat template that cannot append a tool result to a conversation without changing what
    it rendered before (not prefix-preserving), or cannot render a tool message at all."""


@dataclass(frozen=True)
class TurnLimits:
    """max_turns: student turns per trajectory; max_tokens: tokens after the prompt (student and
    context); max_new_tokens: tokens of one student turn."""

    max_turns: int
    max_tokens: int
    max_new_tokens: int


@dataclass
class Trajectory:
    """One multi-turn rollout. ``tokens`` / ``logprobs`` / ``sampled`` are aligned and hold
    everything after ``prompt``; ``sampled`` is False on context tokens (log-prob 0 there)."""

    row: PromptRow
    group: int  # index of the row in the call: the trajectory's group id
    tid: str  # its id in the environment pool
    tools: list[dict[str, Any]]
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    turns: int = 0
    last_text: str = ""  # the last student turn, decoded (the final answer of a finished episode)
    stop: str = ""  # "" while going; then one of mopd.envs.base.STOPS
    stats: TrajectoryStats | None = None  # the pool's stats, once closed
    # (N, L, k) int16 experts of positions 0..N-1 of prompt + tokens (routing replay; else None)
    routes: torch.Tensor | None = None

    def append(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        """Sampled ids with their log-probs, or context ids (``logprobs`` None)."""
        self.tokens += list(ids)
        self.logprobs += [float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids)
        self.sampled += [logprobs is not None] * len(ids)

    def add_routes(self, turn: torch.Tensor) -> None:
        """Merge the routes one turn computed ((n, L, k), from position 0, -1 where it computed
        nothing) after that turn's tokens were appended: positions an earlier turn computed keep
        those routes; routes past prompt + tokens (tokens the trajectory dropped) are not kept."""
        n = len(self.prompt) + len(self.tokens)
        new = torch.full((n, *turn.shape[1:]), NOT_RECORDED, dtype=torch.int16)
        new[: min(n, len(turn))] = turn[:n]
        old = self.routes
        if old is not None:
            new[: len(old)] = torch.where(old >= 0, old, new[: len(old)])
        self.routes = new


# --------------------------------------------------------------------------- renderers


class Renderer(Protocol):
    """How the conversation becomes ids: the prompt once, then each batch of environment messages
    as the ids appended after a student turn that ended with a stop token."""

    def prompt(self, row: PromptRow, messages: list[Message], tools: list[dict[str, Any]]) -> list[int]: ...

    def messages(self, messages: list[Message]) -> list[int]: ...


class TextRenderer:
    """For a tokenizer without a chat template (the builtin character tokenizer): the prompt is the
    row's text as in a one-turn rollout (``mopd.chat.prompt_ids``), a tool result is appended as
    ``=<result>;`` and any other message as its text, without special tokens. Characters the
    vocabulary lacks become ``?``."""

    def __init__(self, tokenizer: Any, alphabet: Collection[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.alphabet = set(alphabet) if alphabet is not None else None

    def prompt(self, row: PromptRow, messages: list[Message], tools: list[dict[str, Any]]) -> list[int]:
        from mopd.chat import prompt_ids

        return prompt_ids(self.tokenizer, row)

    def messages(self, messages: list[Message]) -> list[int]:
        text = "".join(
            f"={m.get('content', '')};" if m.get("role") == "tool" else str(m.get("content", "")) for m in messages
        )
        if self.alphabet is not None:
            text = "".join(c if c in self.alphabet else "?" for c in text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


class ChatRenderer:
    """For a tokenizer with a chat template. The prompt is the environment's first messages (with
    its tool schemas) through the template, with the generation prompt. Messages after a turn are
    rendered on their own: the text the template adds for them to a fixed base conversation
    (``render(base + msgs, add_generation_prompt=True)`` past ``render(base)``), preceded by
    what the template writes after an assistant turn's end-of-turn token (e.g. the newline after
    ``<|im_end|>``), tokenised without special tokens added. Raises ``TemplateError`` at once for
    a template that does not extend its rendering when a tool message is added."""

    BASE: list[Message] = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]

    def __init__(self, tokenizer: Any, stop_ids: Collection[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.before = self._render(self.BASE, generation_prompt=False)
        self.glue = self._glue([tokenizer.decode([i]) for i in stop_ids])
        self.messages([{"role": "tool", "content": "probe", "tool_call_id": "call_0", "name": "probe"}])

    def prompt(self, row: PromptRow, messages: list[Message], tools: list[dict[str, Any]]) -> list[int]:
        enc = self.tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(enc["input_ids"])

    def messages(self, messages: list[Message]) -> list[int]:
        after = self._render(self.BASE + list(messages), generation_prompt=True)
        if not after.startswith(self.before):
            raise TemplateError(
                "the student's chat template is not prefix-preserving for tool messages: rendering the "
                f"conversation with {[m.get('role') for m in messages]} messages added changes what it rendered "
                "before them, so their ids cannot be appended to a trajectory; use a template that only appends "
                "(data.chat_template: a Jinja file)"
            )
        text = self.glue + after[len(self.before) :]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        except Exception as e:  # jinja raises for roles it does not know, e.g. "tool"
            raise TemplateError(f"the student's chat template cannot render tool messages: {e}") from e

    def _glue(self, stop_texts: list[str]) -> str:
        """The text the template writes after the assistant's content and its end-of-turn token:
        the student's turn ends at that token, so it comes first in the appended ids."""
        content_end = self.before.rfind(self.BASE[-1]["content"]) + len(self.BASE[-1]["content"])
        tail = self.before[content_end:]
        ends = [tail.find(s) + len(s) for s in stop_texts if s and s in tail]
        return tail[min(ends) :] if ends else tail


def make_renderer(tokenizer: Any, stop_ids: Collection[int] = ()) -> Renderer:
    """``ChatRenderer`` for a tokenizer with a chat template, else ``TextRenderer`` (with the
    character vocabulary's alphabet for the builtin tokenizer)."""
    if getattr(tokenizer, "chat_template", None):
        return ChatRenderer(tokenizer, stop_ids)
    from mopd.models import CHARS

    vocab = tokenizer.get_vocab()
    return TextRenderer(tokenizer, CHARS if all(c in vocab for c in CHARS) and len(vocab) < 256 else None)


# --------------------------------------------------------------------------- the loop


def run_episodes(
    rows: Sequence[PromptRow],
    n: int,
    *,
    pool: EnvPool,
    parser: ToolCallParser,
    renderer: Renderer,
    generate_turn: GenerateTurn,
    limits: TurnLimits,
    decode: Callable[[list[int]], str],
    routes: TurnRoutes | None = None,
) -> list[Trajectory]:
    """n trajectories of each row (trajectory i*n + k: sample k of rows[i], group i), each run
    until its episode ends or a limit stops it (module docstring). Every trajectory is closed in
    the pool when it returns, also on an error. With ``routes`` (routing replay) every trajectory
    keeps the experts of each position (``Trajectory.routes``)."""
    opened = [(i, row, pool.open(row)) for i, row in enumerate(rows) for _ in range(n)]
    trajs: list[Trajectory] = []
    try:
        for group, row, fut in opened:
            ep = fut.result()
            trajs.append(Trajectory(row, group, ep.id, ep.tools, renderer.prompt(row, ep.messages, ep.tools)))
        going = list(trajs)
        while going:
            going = _round(going, pool, parser, renderer, generate_turn, limits, decode, routes)
    finally:
        for t in trajs:
            if not t.stop:
                pool.close(t.tid)
        for _, _, fut in opened[len(trajs) :]:  # opened, but the loop above stopped before them
            if fut.done() and fut.exception() is None:
                pool.close(fut.result().id)
    return trajs


def _round(
    going: list[Trajectory],
    pool: EnvPool,
    parser: ToolCallParser,
    renderer: Renderer,
    generate_turn: GenerateTurn,
    limits: TurnLimits,
    decode: Callable[[list[int]], str],
    routes: TurnRoutes | None = None,
) -> list[Trajectory]:
    """One turn of every trajectory in ``going``, its tool calls, their results appended; returns
    those still going."""
    max_new = [min(limits.max_new_tokens, limits.max_tokens - len(t.tokens)) for t in going]
    outs = generate_turn([t.prompt + t.tokens for t in going], max_new)
    turn_routes = routes() if routes is not None else None
    if len(outs) != len(going) or (turn_routes is not None and len(turn_routes) != len(going)):
        n_routes = "" if turn_routes is None else f" and {len(turn_routes)} routes"
        raise RuntimeError(f"generate_turn returned {len(outs)} turns{n_routes} for {len(going)} contexts")
    steps = {}
    for j, (t, m, (tokens, logprobs, stopped)) in enumerate(zip(going, max_new, outs, strict=True)):
        if len(tokens) > m:
            tokens, logprobs, stopped = tokens[:m], logprobs[:m], False
        t.append(tokens, logprobs)
        if turn_routes is not None:
            t.add_routes(turn_routes[j])
        t.turns += 1
        t.last_text = decode(list(tokens))
        if not stopped:
            _finish(t, pool, "max_tokens" if len(t.tokens) >= limits.max_tokens else "max_new_tokens")
            continue
        turn = parser.parse(t.last_text, t.tools)
        if turn.calls and t.turns >= limits.max_turns:
            _finish(t, pool, "max_turns")
        elif turn.calls and len(t.tokens) >= limits.max_tokens:
            _finish(t, pool, "max_tokens")
        else:  # calls to run, or a final answer for the environment to reward
            steps[t.tid] = (t, pool.step(t.tid, turn.calls, turn.content))
    for t, fut in steps.values():  # every call of the round was submitted before the first wait
        res = fut.result()
        if res.done:
            _finish(t, pool, "done")
        elif t.turns >= limits.max_turns:
            _finish(t, pool, "max_turns")
        else:
            ids = renderer.messages(res.messages)
            if len(t.tokens) + len(ids) >= limits.max_tokens:  # no room left for a student token
                _finish(t, pool, "max_tokens")
            else:
                t.append(ids, None)
    return [t for t in going if not t.stop]


def _finish(t: Trajectory, pool: EnvPool, why: str) -> None:
    t.stop = why
    t.stats = pool.close(t.tid)
    t.stats.stop = why


def pack_episodes(trajs: Sequence[Trajectory], pad_id: int, policy_version: int) -> RolloutBatch:
    """The RolloutBatch of finished trajectories (in order; group ids as given): each response
    region interleaves sampled and context tokens, ``responses`` holds each final student turn,
    ``truncated`` every trajectory a limit stopped, ``episodes`` their environment stats, and
    ``routed_experts`` when every trajectory has routes (routing replay)."""
    batch = pack_rollout(
        prompts=[t.prompt for t in trajs],
        responses=[t.tokens for t in trajs],
        logprobs=[t.logprobs for t in trajs],
        group_ids=[t.group for t in trajs],
        rows=[t.row for t in trajs],
        texts=[t.last_text for t in trajs],
        pad_id=pad_id,
        policy_version=policy_version,
        truncated=[t.stop != "done" for t in trajs],
        sampled=[t.sampled for t in trajs],
        episodes=[t.stats for t in trajs],
    )
    if not trajs or any(t.routes is None for t in trajs):
        return batch
    return replace(batch, routed_experts=packed_routes(trajs, batch))


def packed_routes(trajs: Sequence[Trajectory], batch: RolloutBatch) -> torch.Tensor:
    """(B, T, L, k) int16: each trajectory's routes in its row's columns (prompt right-aligned at
    ``prompt_len``, then the response region), -1 at padding and where nothing was routed."""
    routes = [t.routes for t in trajs if t.routes is not None]
    B, T = batch.attention_mask.shape
    out = torch.full((B, T, *routes[0].shape[1:]), NOT_RECORDED, dtype=torch.int16)
    for i, (t, r) in enumerate(zip(trajs, routes, strict=True)):
        start = batch.prompt_len - len(t.prompt)
        n = min(len(r), len(t.prompt) + len(t.tokens))
        out[i, start : start + n] = r[:n]
    out[~batch.attention_mask] = NOT_RECORDED
    return out


# --------------------------------------------------------------------------- what every backend shares

# one_turn(rows, n, seed, greedy) / multi_turn(rows, n, seed, greedy, domain, env): one part's batch
OneTurn = Callable[[list[PromptRow], int, int, bool], RolloutBatch]
MultiTurn = Callable[[list[PromptRow], int, int, bool, str, "EnvironmentConfig"], RolloutBatch]


class EnvironmentRollouts:
    """The engine-independent half of a rollout actor's environment domains, mixed into every backend:

        batch = self._generate_mixed(rows, n, seed, greedy, one_turn=self._one_turn, multi_turn=self._multi_turn)

    splits the rows into one one-turn part and one part per multi-turn domain (``environments.<domain>``),
    rolls part k out with seed ``seed_for(seed, k)`` and merges the parts back into the order of the
    rows (trajectory i*n + s is sample s of rows[i], group id i). A call without environment rows is
    one ``one_turn`` with ``seed`` itself. Each domain's ``EnvPool`` starts on first use and lives until
    ``_shutdown_envs``; the backend sets ``_env_pools = {}`` and ``_renderer = None`` in ``__init__``."""

    cfg: MOPDConfig
    tokenizer: Any
    stop_ids: list[int]
    _env_pools: dict[str, EnvPool]
    _renderer: Renderer | None

    def _generate_mixed(
        self, rows: list[PromptRow], n: int, seed: int, greedy: bool, *, one_turn: OneTurn, multi_turn: MultiTurn
    ) -> RolloutBatch:
        envs = self.cfg.environments
        if not any(r.domain in envs for r in rows):
            return one_turn(rows, n, seed, greedy)
        parts = [[i for i, r in enumerate(rows) if r.domain not in envs]]
        multi = sorted({r.domain for r in rows} & set(envs))
        parts += [[i for i, r in enumerate(rows) if r.domain == d] for d in multi]
        batches, order = [], []
        for k, idx in enumerate(p for p in parts if p):
            part = [rows[i] for i in idx]
            domain = part[0].domain
            if domain in envs:
                batches.append(multi_turn(part, n, seed_for(seed, k), greedy, domain, envs[domain]))
            else:
                batches.append(one_turn(part, n, seed_for(seed, k), greedy))
            order += [i * n + s for i in idx for s in range(n)]  # where each of its trajectories belongs
        merged = merge_batches(batches, self.tokenizer.pad_token_id)
        where = {pos: j for j, pos in enumerate(order)}  # final position i*n + s -> merged row
        batch = merged.select([where[p] for p in range(len(rows) * n)])
        return replace(batch, group_ids=torch.arange(len(rows)).repeat_interleave(n))

    def _tool_renderer(self) -> Renderer:
        """The student's renderer of tool messages (``make_renderer``), built once."""
        if self._renderer is None:
            self._renderer = make_renderer(self.tokenizer, self.stop_ids)
        return self._renderer

    def _tool_parser(self, env: EnvironmentConfig) -> ToolCallParser:
        """The domain's tool-call parser, after the ``run.plugins`` modules (where a user format
        registers) are imported in this process: the rollout actor's, not only the driver's."""
        from mopd.domains import load_plugins
        from mopd.envs import get_parser

        load_plugins(self.cfg.run.plugins)
        return get_parser(env.parser)

    def _env_pool(self, domain: str, env: EnvironmentConfig) -> EnvPool:
        """The environment pool of ``domain`` (``environments.<domain>.workers`` Ray actors, or
        in-process with 0), started on first use and kept until ``_shutdown_envs``."""
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
        for pool in getattr(self, "_env_pools", {}).values():
            for k, v in pool.metrics().items():
                out[k] = out.get(k, 0.0) + v
        return out

    def _shutdown_envs(self) -> None:
        for pool in getattr(self, "_env_pools", {}).values():
            pool.shutdown()
        self._env_pools = {}


class TurnSeeds:
    """Sampling seeds of the requests of each ``generate_turn`` call, for an engine that seeds every
    request (vLLM): ``seed_for(seed, trajectory, turn)``, so a trajectory's samples depend on its own
    context and seeds only, not on which other trajectories are still going.

        seeds = TurnSeeds(seed)
        generate_turn = lambda contexts, max_new: engine_turn(contexts, max_new, seeds(contexts))

    ``generate_turn`` sees contexts, not trajectories; the trajectory of each is found by its ids:
    the first call holds every trajectory in order (0, 1, ...), and every later context extends the
    context of one trajectory of the previous call, in the same order (``run_episodes`` keeps it).
    Two trajectories whose ids are equal so far are interchangeable: which takes which seed is
    still the same in every run."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.turn = 0
        self._last: list[tuple[int, list[int]]] = []  # (trajectory, context) of the previous call

    def __call__(self, contexts: Sequence[Sequence[int]]) -> list[int]:
        owners = list(range(len(contexts))) if self.turn == 0 else self._owners(contexts)
        self._last = [(t, list(c)) for t, c in zip(owners, contexts, strict=True)]
        seeds = [seed_for(self.seed, t, self.turn) for t in owners]
        self.turn += 1
        return seeds

    def _owners(self, contexts: Sequence[Sequence[int]]) -> list[int]:
        owners, j = [], 0
        for ctx in contexts:
            while j < len(self._last) and list(ctx[: len(self._last[j][1])]) != self._last[j][1]:
                j += 1  # that trajectory stopped last turn
            if j == len(self._last):
                raise RuntimeError(
                    "generate_turn got a context that extends no context of the previous turn (in order): "
                    "TurnSeeds needs run_episodes to keep the trajectories' order and only append to them"
                )
            owners.append(self._last[j][0])
            j += 1
        return owners
