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
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mopd.envs.base import Message
from mopd.envs.parsers import ToolCallParser
from mopd.types import PromptRow, RolloutBatch
from rollout.batching import pack_rollout

if TYPE_CHECKING:
    from mopd.dist.env_pool import EnvPool
    from mopd.envs.base import TrajectoryStats

# generate_turn(contexts, max_new) -> per context (sampled ids, their log-probs, ended by a stop token)
GenerateTurn = Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float], bool]]]


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

    def append(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        """Sampled ids with their log-probs, or context ids (``logprobs`` None)."""
        self.tokens += list(ids)
        self.logprobs += [float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids)
        self.sampled += [logprobs is not None] * len(ids)


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
) -> list[Trajectory]:
    """n trajectories of each row (trajectory i*n + k: sample k of rows[i], group i), each run
    until its episode ends or a limit stops it (module docstring). Every trajectory is closed in
    the pool when it returns, also on an error."""
    opened = [(i, row, pool.open(row)) for i, row in enumerate(rows) for _ in range(n)]
    trajs: list[Trajectory] = []
    try:
        for group, row, fut in opened:
            ep = fut.result()
            trajs.append(Trajectory(row, group, ep.id, ep.tools, renderer.prompt(row, ep.messages, ep.tools)))
        going = list(trajs)
        while going:
            going = _round(going, pool, parser, renderer, generate_turn, limits, decode)
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
) -> list[Trajectory]:
    """One turn of every trajectory in ``going``, its tool calls, their results appended; returns
    those still going."""
    max_new = [min(limits.max_new_tokens, limits.max_tokens - len(t.tokens)) for t in going]
    outs = generate_turn([t.prompt + t.tokens for t in going], max_new)
    if len(outs) != len(going):
        raise RuntimeError(f"generate_turn returned {len(outs)} turns for {len(going)} contexts")
    steps = {}
    for t, m, (tokens, logprobs, stopped) in zip(going, max_new, outs, strict=True):
        if len(tokens) > m:
            tokens, logprobs, stopped = tokens[:m], logprobs[:m], False
        t.append(tokens, logprobs)
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
    ``truncated`` every trajectory a limit stopped, ``episodes`` their environment stats."""
    return pack_rollout(
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
