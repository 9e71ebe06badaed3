"""``mopd quickstart``: MOPD's capability integration, reproduced at CPU scale with one command.

Stages, each cached in the output directory (a re-run skips finished stages; ``--from-stage S``
re-runs S and the stages after it):

    domains   three synthetic domains (math, code, agent): disjoint train/eval prompt files; agent
              is multi-turn (the ``lookup`` environment: the answer needs a number only a tool call
              returns, so a trajectory is a call, the tool's result, then the answer)
    student   a tiny MiMoV2Flash (MoE) student, general SFT on a mixture of all domains (agent rows:
              whole demonstrations, the tool results as context)
    teachers  one teacher per domain, trained from the student's SFT checkpoint on its domain only
    mopd      ``mopd train recipes/quickstart.yaml`` with the student and teachers above
    report    teacher / student-before / student-after accuracy per domain, normalised score,
              per-domain reverse KL, the multi-turn domains' turns, tool calls, invalid calls and
              success, a PNG of the curves, the student exported to student_hf/

    mopd quickstart --output-dir runs/quickstart
    mopd quickstart --output-dir runs/quickstart --from-stage mopd objective.kind=sampled objective.forward_kl=0 \
        trainer.lr=1e-3 rollout.prompts_per_step=768     # the paper's sampled form (docs/quickstart.md)
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mopd.app.shipped import recipes_dir
from mopd.config import LR_SCHEDULES, EnvironmentConfig, LoraSettings, LRSchedule, MOPDConfig, load_config

if TYPE_CHECKING:
    from mopd.types import PromptRow, TrainBatch
    from rollout.multiturn import Renderer


STAGES = ("domains", "student", "teachers", "mopd", "report")
RECIPE = recipes_dir() / "quickstart.yaml"  # shipped with mopd (package data), also in a wheel


@dataclass
class QuickstartSettings:
    """The stages' own knobs (the MOPD stage takes its settings from the recipe)."""

    # domain -> registered generator; the easiest levels, so that a tiny teacher reaches >= 0.9
    # within a few minutes of domain SFT on two cores.
    # agent_lookup rows are multi-turn (the recipe's environments.agent: lookup).
    generators: dict[str, str] = field(
        default_factory=lambda: {"math": "math_l0", "code": "code_l0", "agent": "agent_lookup"}
    )
    # Share of each domain in the student's general SFT mixture, relative (missing domains: 1.0).
    # An agent row is a whole tool trajectory, about twice the trained tokens of a one-turn agent
    # answer, and the SFT loss is a token mean: at an equal share of rows math and code lost
    # weight, and their students stayed too good on the noisy sub-tasks for the 0.30 gap (math
    # 0.72 before MOPD on seed 4); half the agent rows give them their one-turn-design weight back.
    student_mix: dict[str, float] = field(default_factory=lambda: {"math": 1.0, "code": 1.0, "agent": 0.5})
    # Sub-tasks (a row's ``kind``) where the student is noisy and its teacher is sharp. In the
    # student's SFT a share ``student_noise`` of these rows' answers carry a typo (the first two
    # characters swapped), or, where the row is a tool trajectory (agent), are answered at once
    # with a guessed number instead of looking it up; the teachers learn them clean. The student
    # then samples the right answer (the trajectory through the tool) ~30% of the time but its
    # greedy answer is the typo (the guess): its teacher sharpens what it half-knows, the regime
    # MOPD is made for (teachers trained from the student by RL), and its gap is set by the data,
    # not by where an unfinished SFT stopped (docs/quickstart.md).
    student_noisy_kinds: dict[str, list[str]] = field(
        default_factory=lambda: {"math": ["-"], "code": ["concat"], "agent": ["mail"]}
    )
    student_noise: float = 0.7
    train_prompts: int = 4000  # per domain
    eval_prompts: int = 128  # per domain
    sft_batch: int = 64
    student_sft_steps: int = 1000
    student_sft_lr: float = 3e-3
    # The student's SFT ends at its full rate (a checkpoint from the stable phase of a
    # warmup-stable-decay schedule); teachers and MOPD decay theirs to 0. With a cosine-decayed
    # student the same MOPD budget closed only ~60% of the gap (docs/quickstart.md).
    student_sft_schedule: str = "constant"
    teacher_sft_steps: int = 300
    teacher_sft_lr: float = 3e-3
    teacher_sft_schedule: str = "cosine"
    # > 0: each teacher is a LoRA adapter of this rank (alpha = 2 x rank, every linear layer of
    # the blocks) trained on the student, and the MOPD stage serves the three from one worker
    # that holds the student's weights once (adapter teachers, docs/adapter_teachers.md); 0: full
    # teachers, each a fine-tuned copy of the student.
    teacher_lora_rank: int = 0
    # The adapter teachers' rate (teacher_lora_rank > 0) in place of teacher_sft_lr: an adapter
    # moves the model less per step than full fine-tuning. Swept on seeds 0 and 3 at rank 16
    # (3e-3, 1e-2, 3e-2: 3e-2 diverged on both, 1e-2 was as good or better than 3e-3); at rank 32
    # and 1e-2 all five seeds meet the targets (docs/quickstart.md).
    teacher_lora_lr: float = 1e-2
    seed: int = 0

    @property
    def domain_names(self) -> list[str]:
        return list(self.generators)


# ---------------------------------------------------------------------- stage bookkeeping


class StageCache:
    """``DIR/stages/<stage>.json`` marks a finished stage and holds what it measured."""

    def __init__(self, out: Path):
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.dir / f"{stage}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, stage: str, result: dict[str, Any]) -> None:
        tmp = self.dir / f"{stage}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(self.dir / f"{stage}.json")

    def invalidate_from(self, stage: str) -> None:
        for s in STAGES[STAGES.index(stage) :]:
            (self.dir / f"{s}.json").unlink(missing_ok=True)

    def first_changed(self, inputs: dict[str, dict[str, Any]]) -> tuple[str, list[str]] | None:
        """The first cached stage whose recorded inputs differ from ``inputs[stage]``, and the
        keys that differ (a stage cached before inputs were recorded counts as changed)."""
        for stage in STAGES:
            cached = self.done(stage)
            if cached is None:
                return None
            before = cached.get("inputs")
            if before != inputs[stage]:
                if before is None:
                    return stage, ["(not recorded)"]
                return stage, sorted(
                    k for k in set(before) | set(inputs[stage]) if before.get(k) != inputs[stage].get(k)
                )
        return None


def stage_inputs(st: QuickstartSettings, recipe_over: list[str]) -> dict[str, dict[str, Any]]:
    """What each stage's result depends on: its own settings and everything earlier stages used
    (the recipe file and its overrides for the MOPD stage and the report)."""
    import hashlib

    from omegaconf import OmegaConf

    settings = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.structured(st)))
    own = {
        "domains": ("generators", "train_prompts", "eval_prompts", "seed"),
        "student": (
            "student_mix",
            "student_noisy_kinds",
            "student_noise",
            "sft_batch",
            "student_sft_steps",
            "student_sft_lr",
            "student_sft_schedule",
        ),
        "teachers": (
            "teacher_sft_steps",
            "teacher_sft_lr",
            "teacher_sft_schedule",
            "teacher_lora_rank",
            "teacher_lora_lr",
        ),
    }
    recipe = {
        "recipe_sha256": hashlib.sha256(RECIPE.read_bytes()).hexdigest()[:16],
        "recipe_overrides": list(recipe_over),
    }
    out: dict[str, dict[str, Any]] = {}
    acc: dict[str, Any] = {}
    for stage in STAGES:
        acc = {**acc, **{k: settings[k] for k in own.get(stage, ())}, **(recipe if stage == "mopd" else {})}
        out[stage] = dict(acc)
    return out


# ---------------------------------------------------------------------- stage 1: domains


def stage_domains(out: Path, st: QuickstartSettings) -> dict[str, Any]:
    """Write ``data/<domain>_{train,eval}.jsonl`` from each domain's generator (own RNG per split)."""
    from mopd.domains import get_generator
    from mopd.seeds import derive_seed

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    counts = {}
    for d, gen in st.generators.items():
        for split, n in (("train", st.train_prompts), ("eval", st.eval_prompts)):
            rows = get_generator(gen).generate(random.Random(derive_seed(st.seed, d, split)), n, split)
            with open(data / f"{d}_{split}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps({"prompt": r.prompt, "domain": d, **r.meta}) + "\n")
            counts[f"{d}_{split}"] = len(rows)
    return {"counts": counts}


def read_rows(out: Path, domain: str, split: str, base: MOPDConfig):
    """The rows of ``data/<domain>_<split>.jsonl``, read and checked like any data source."""
    from mopd.chat import student_tokenizer
    from mopd.config import DataSourceConfig
    from mopd.data import load_source

    src = DataSourceConfig(domain=domain, path=str(out / "data" / f"{domain}_{split}.jsonl"))
    rows, _ = load_source(src, base.run.seed, base.data.max_prompt_len, "reject", {domain}, student_tokenizer(base))
    return rows


# ---------------------------------------------------------------------- stages 2-3: SFT


# An SFT row's target: the assistant turns it is trained on, with the tool results between them.
Target = list[dict[str, Any]]
# target(row, rng) -> the target of one drawn row (the student's may be a noisy one)
TargetFn = Callable[["PromptRow", random.Random], Target]
# a row and its target -> (prompt ids, response ids, sampled flags)
Encoded = dict[tuple[str, ...], tuple[list[int], list[int], list[bool]]]


def sft_target(row: PromptRow, envs: Mapping[str, EnvironmentConfig]) -> Target:
    """What a model should write for ``row``: a lookup row of a multi-turn domain is its
    ``lookup`` demonstration in the domain's call format (the call, the tool's result, the answer);
    any other row is its answer, one turn."""
    env = envs.get(row.domain)
    if env is not None and "key" in row.meta:
        from mopd.envs.builtin import demonstration

        return demonstration(row, env.parser)
    return [{"role": "assistant", "content": str(row.meta["answer"])}]


def encode_target(tokenizer, renderer: Renderer, target: Target) -> tuple[list[int], list[bool]]:
    """The response ids of ``target`` as a rollout of that trajectory holds them, and which of
    them the model wrote: each assistant turn's text and then EOS (written), and the messages
    between two turns rendered as the rollout appends one step's results, all in one
    ``renderer.messages`` call (context)."""
    ids: list[int] = []
    written: list[bool] = []
    for is_turn, group in groupby(target, key=lambda m: m["role"] == "assistant"):
        msgs = list(group)
        if is_turn:
            for m in msgs:
                turn = [*tokenizer(str(m["content"]), add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
                ids += turn
                written += [True] * len(turn)
        else:
            context = renderer.messages(msgs)
            ids += context
            written += [False] * len(context)
    return ids, written


def sft_batch(
    tokenizer,
    rows: list[PromptRow],
    cache: Encoded | None = None,
    targets: list[Target] | None = None,
    renderer: Renderer | None = None,
) -> TrainBatch:
    """A TrainBatch whose responses are the rows' targets (default: their answers, one turn), in
    the rollout layout: ``response_mask`` on what the model writes (each turn and its EOS), not on
    the tool results between turns (context, as in a rollout batch); ``renderer`` renders those
    (default: ``rollout.multiturn.make_renderer``). ``cache`` (kept by the caller across steps) maps
    a row's prompt and target to their token ids: an SFT run draws the same rows again and again,
    and encoding each one every time it is drawn took ~15% of a step."""
    import torch

    from mopd.types import TrainBatch
    from rollout.batching import encode_prompts, pack_rollout

    cache = {} if cache is None else cache
    if targets is None:
        targets = [[{"role": "assistant", "content": str(r.meta["answer"])}] for r in rows]
    keys = [(r.prompt, str(r.messages), json.dumps(t)) for r, t in zip(rows, targets, strict=True)]
    new = {k: (r, t) for k, r, t in zip(keys, rows, targets, strict=True) if k not in cache}
    if new:
        if renderer is None:
            from rollout.multiturn import make_renderer

            renderer = make_renderer(tokenizer, [tokenizer.eos_token_id])
        prompt_ids = encode_prompts(tokenizer, [r for r, _ in new.values()])
        for key, prompt, (_, target) in zip(new, prompt_ids, new.values(), strict=True):
            cache[key] = (prompt, *encode_target(tokenizer, renderer, target))
    encoded = [cache[k] for k in keys]
    batch = pack_rollout(
        [e[0] for e in encoded],
        [e[1] for e in encoded],
        [[0.0] * len(e[1]) for e in encoded],
        list(range(len(rows))),
        rows,
        [str(t[-1]["content"]) for t in targets],
        tokenizer.pad_token_id,
        0,
        sampled=[e[2] for e in encoded],
    )
    return TrainBatch(batch, torch.zeros_like(batch.rollout_logprobs))


# Rows per micro-batch of the student's SFT. The loss is a token mean over the whole batch
# whatever its micro-batches, and each micro-batch is cut to its own padding: with a batch's rows
# sorted by length (``by_length``), 9-token math rows no longer pad to the 60 tokens of a tool
# trajectory. Measured on 2 cores, the student's mixture: 16 took 30% less time per step than one
# micro-batch of 64, 8 more; a teacher's batch (one domain, rows of similar length) is faster whole.
STUDENT_MICRO_BATCH = 16


def by_length(rows: list[PromptRow], targets: list[Target]) -> tuple[list[PromptRow], list[Target]]:
    """``rows`` and their ``targets`` sorted by the characters of prompt and target (a stand-in for
    their tokens, good enough to group short rows with short ones)."""
    size = [len(r.prompt) + sum(len(str(m["content"])) for m in t) for r, t in zip(rows, targets, strict=True)]
    order = sorted(range(len(rows)), key=size.__getitem__)
    return [rows[i] for i in order], [targets[i] for i in order]


def run_sft(
    recipe: MOPDConfig,
    init: dict[str, Any],
    rows,
    steps: int,
    lr: float,
    schedule: str,
    batch: int,
    seed: int,
    out_dir: Path,
    desc: str,
    weights: list[float] | None = None,
    target: TargetFn | None = None,
    micro_batch: int | None = None,
    master_port: int | None = None,
    position: int = 0,
) -> dict[str, Any]:
    """SFT through the project's DeepSpeed trainer (one in-process rank, ZeRO 0) and save the
    result as a Hugging Face directory. ``init`` overrides ``recipe.student`` (path or config);
    each batch draws rows uniformly, or in proportion to ``weights`` (one per row); ``target(row,
    rng)`` gives each drawn row's target (default: ``sft_target``, clean; the student's may be
    noisy). A tool trajectory's ids are those the multi-turn rollout gives it (``sft_batch``). Each
    batch runs sorted by length, in micro-batches of ``micro_batch`` rows (default: all).
    ``master_port``: the rank's rendezvous port (default: a free one); ``position``: the line of
    its progress bar, for runs side by side."""
    from tqdm import tqdm

    from mopd.chat import stop_token_ids
    from mopd.dist.runtime import free_port
    from mopd.models import load_tokenizer
    from rollout.multiturn import make_renderer
    from trainers.deepspeed_trainer import TrainerWorker

    cfg = replace(
        recipe,
        student=replace(recipe.student, **init),
        run=replace(recipe.run, total_steps=steps, seed=seed),
        trainer=replace(
            recipe.trainer,
            lr=lr,
            zero_stage=0,
            world_size=1,
            lr_schedule=cast(LRSchedule, schedule),
            warmup_steps=10,
            micro_batch_size=min(batch, micro_batch or batch),
        ),
    )
    tok = load_tokenizer(cfg.student)
    renderer = make_renderer(tok, stop_token_ids(cfg, tok))  # as the rollout renders tool results
    target = target or (lambda row, rng: sft_target(row, cfg.environments))
    port = master_port or free_port("127.0.0.1")
    worker = TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=port)
    rng = random.Random(seed)
    encoded: Encoded = {}
    t0, loss = time.time(), float("nan")
    for _ in tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, position=position):
        drawn = rng.choices(rows, weights=weights, k=batch) if weights else [rng.choice(rows) for _ in range(batch)]
        drawn, targets = by_length(drawn, [target(r, rng) for r in drawn])
        loss = worker.sft_step(sft_batch(tok, drawn, encoded, targets, renderer))["sft/loss"]
    worker.save_hf(str(out_dir))
    # The gloo process group stays up for the next SFT run in this process: DeepSpeed caches its
    # groups, so tearing it down and re-creating it breaks the next engine.
    return {"final_loss": loss, "seconds": time.time() - t0, "steps": steps}


# ---------------------------------------------------------------------- evaluation


# A multi-turn domain's episode stats in the report (means per greedy trajectory): its name
# there -> the key of ``mopd.loop.evaluate`` (``eval/<domain>/<key>``). Success is the eval's
# accuracy: the environment's reward over every trajectory (0 for one a limit stopped), not
# ``env_reward``, which averages over the trajectories that were rewarded only.
EPISODE_STATS = {"turns": "turns", "tool_calls": "tool_calls", "tool_errors": "tool_errors", "success": "accuracy"}


WHO = ("student_before", "teacher", "student_after")  # the models a report compares


@dataclass
class Evaluation:
    """A model's greedy evaluation: ``accuracy[domain]`` (its verifier on the final turn) and, per
    multi-turn domain, ``episodes[domain]``: turns, tool calls, invalid calls (``tool_errors``)
    and success, means per trajectory (``EPISODE_STATS``)."""

    accuracy: dict[str, float]
    episodes: dict[str, dict[str, float]]


def evaluate_model(recipe: MOPDConfig, model_dir: Path, rows) -> Evaluation:
    """Greedy evaluation of a model directory, with an in-process HF rollout worker (a multi-turn
    domain's rows are rolled out through its environment)."""
    from mopd.loop import evaluate
    from rollout.pool import RolloutPool

    cfg = replace(recipe, student=replace(recipe.student, path=str(model_dir), config=None, tokenizer=None))
    pool = RolloutPool(cfg, local=True)
    try:
        metrics = evaluate(pool, rows, seed=0)
    finally:
        pool.shutdown()
    accuracy = {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("/accuracy")}
    episodes = {
        d: {name: metrics.get(f"eval/{d}/{key}", float("nan")) for name, key in EPISODE_STATS.items()}
        for d in accuracy
        if f"eval/{d}/turns" in metrics
    }
    return Evaluation(accuracy, episodes)


# ---------------------------------------------------------------------- the command


def mopd_overrides(out: Path, st: QuickstartSettings) -> list[str]:
    """Recipe overrides that point the MOPD stage at this run's student, teachers and data."""
    data = out / "data"
    sources = ", ".join(
        f"{{domain: {d}, path: {data / f'{d}_train.jsonl'}, eval_path: {data / f'{d}_eval.jsonl'}}}"
        for d in st.domain_names
    )
    over = [
        f"run.output_dir={out / 'mopd'}",
        f"student.path={out / 'student_sft'}",
        "student.config=null",
        "student.tokenizer=null",
        f"data.sources=[{sources}]",
    ]
    for d in st.domain_names:
        over += [f"teachers.{d}.config=null", f"teachers.{d}.tokenizer=null"]
        if st.teacher_lora_rank > 0:  # adapters of the student: one worker holds it once
            over += [
                f"teachers.{d}.path={out / 'student_sft'}",
                f"teachers.{d}.adapter={out / 'teachers' / d / 'adapter'}",
            ]
        else:
            over.append(f"teachers.{d}.path={out / 'teachers' / d}")
    return over


def split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` items naming a QuickstartSettings field go to the stages; the rest to the recipe."""
    names = {f.name for f in fields(QuickstartSettings)}
    mine, recipe = {}, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.split(".")[0] in names:  # `generators.agent=agent_l2` names a field too
            mine[key] = value
        else:
            recipe.append(item)
    return mine, recipe


def settings_from(items: dict[str, str]) -> QuickstartSettings:
    """The stages' settings with ``items`` applied; ValueError naming every bad value, before any stage runs."""
    from omegaconf import OmegaConf

    base = OmegaConf.structured(QuickstartSettings)
    st = cast(
        QuickstartSettings,
        OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.from_dotlist([f"{k}={v}" for k, v in items.items()]))),
    )
    errors = []
    for name in ("student_mix", "student_noisy_kinds"):
        unknown = sorted(set(getattr(st, name)) - set(st.generators))
        if unknown:
            errors.append(f"{name} names {', '.join(unknown)}, not a quickstart domain ({', '.join(st.generators)})")
    if any(w < 0 for w in st.student_mix.values()) or not any(st.student_mix.get(d, 1.0) > 0 for d in st.generators):
        errors.append(f"student_mix weights must be >= 0 and not all 0, got {dict(st.student_mix)}")
    errors += _kind_errors(st)
    if st.teacher_lora_rank < 0:
        errors.append(f"teacher_lora_rank must be >= 0 (0: full teachers), got {st.teacher_lora_rank}")
    for name in ("student_sft_lr", "teacher_sft_lr", "teacher_lora_lr"):
        if not getattr(st, name) > 0:
            errors.append(f"{name} must be > 0, got {getattr(st, name)}")
    for name in ("student_sft_schedule", "teacher_sft_schedule"):
        if getattr(st, name) not in LR_SCHEDULES:
            errors.append(f"{name}={getattr(st, name)!r}; valid: {', '.join(LR_SCHEDULES)}")
    if errors:
        raise ValueError("quickstart settings: " + "; ".join(errors))
    return st


def _kind_errors(st: QuickstartSettings) -> list[str]:
    """What is wrong with ``student_noisy_kinds`` / ``student_noise``: kinds the domain's generator
    never draws, a share outside [0, 1] (unknown domains are checked in ``settings_from``)."""
    from mopd.domains import get_generator

    errors = []
    if not 0.0 <= st.student_noise <= 1.0:
        errors.append(f"student_noise must be in [0, 1], got {st.student_noise}")
    for d, kinds in st.student_noisy_kinds.items():
        if d not in st.generators:
            continue  # reported with the other settings that name domains
        rows = get_generator(st.generators[d]).generate(random.Random(0), 500, "train")
        drawn = {str(r.meta.get("kind")) for r in rows}
        bad = sorted(set(kinds) - drawn)
        if bad:
            errors.append(
                f"student_noisy_kinds.{d}={list(kinds)}: {st.generators[d]} draws the kinds {', '.join(sorted(drawn))}"
            )
    return errors


def environment_errors(st: QuickstartSettings, base: MOPDConfig) -> list[str]:
    """Domains whose generator makes tool trajectories (rows with a lookup table) but that the
    recipe does not roll out through the ``lookup`` environment (their SFT targets are its
    demonstrations, their evaluation its episodes)."""
    from mopd.domains import get_generator

    errors = []
    for d, gen in st.generators.items():
        rows = get_generator(gen).generate(random.Random(0), 8, "train")
        env = base.environments.get(d)
        if any("table" in r.meta for r in rows) and (env is None or env.name != "lookup"):
            have = f"environments.{d}.name={env.name!r}" if env is not None else f"no environments.{d}"
            errors.append(f"generators.{d}={gen} makes lookup rows, which need environments.{d}.name=lookup ({have})")
    return errors


def run_quickstart(out_dir: str, from_stage: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    out = Path(out_dir).resolve()
    mine, recipe_over = split_overrides(list(overrides or []))
    st = settings_from(mine)
    # The recipe (with the user's overrides) is validated before any stage runs.
    base = load_config(RECIPE, recipe_over)
    errors = environment_errors(st, base)
    if errors:
        raise ValueError("quickstart settings: " + "; ".join(errors))
    cache = StageCache(out)
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from-stage {from_stage!r}; valid: {', '.join(STAGES)}")
    inputs = stage_inputs(st, recipe_over)
    changed = cache.first_changed(inputs)
    if changed is not None and (from_stage is None or STAGES.index(changed[0]) < STAGES.index(from_stage)):
        # A cached stage made with other settings must not feed this run.
        print(
            f"[quickstart] {changed[0]}: its settings changed since it ran ({', '.join(changed[1])}); "
            "re-running it and the stages after it"
        )
        from_stage = changed[0]
    if from_stage is not None:
        cache.invalidate_from(from_stage)
    results: dict[str, Any] = {}
    t_all = time.time()
    for stage in STAGES:
        cached = cache.done(stage)
        if cached is not None:
            print(f"[quickstart] {stage}: cached ({cached.get('seconds', 0):.0f} s when it ran)")
            results[stage] = cached
            continue
        print(f"[quickstart] {stage}: running")
        t0 = time.time()
        res = STAGE_FUNCS[stage](out, st, base, recipe_over, results)
        res["seconds"] = time.time() - t0
        res["inputs"] = inputs[stage]
        cache.finish(stage, res)
        results[stage] = res
        print(f"[quickstart] {stage}: done in {res['seconds']:.0f} s")
    print(f"[quickstart] all stages in {time.time() - t_all:.0f} s; report: {out / 'report.json'}")
    return results


def _stage_domains(out, st, base, recipe_over, results):
    return stage_domains(out, st)


def _eval_rows(out: Path, st: QuickstartSettings, base: MOPDConfig):
    return [r for d in st.domain_names for r in read_rows(out, d, "eval", base)]


def _stage_student(out, st, base, recipe_over, results):
    per_domain = {d: read_rows(out, d, "train", base) for d in st.domain_names}
    mix = [r for d in st.domain_names for r in per_domain[d]]
    # A domain's share of the mixture is its weight (the rows of a domain share it equally).
    weights = [st.student_mix.get(d, 1.0) / len(per_domain[d]) for d in st.domain_names for _ in per_domain[d]]
    res = run_sft(
        base, {}, mix, st.student_sft_steps, st.student_sft_lr, st.student_sft_schedule, st.sft_batch, st.seed,
        out / "student_sft", "student SFT", weights=weights, target=student_target(st, base.environments),
        micro_batch=STUDENT_MICRO_BATCH,
    )  # fmt: skip
    ev = evaluate_model(base, out / "student_sft", _eval_rows(out, st, base))
    return {**res, "accuracy": ev.accuracy, "episodes": ev.episodes}


def typo(answer: str) -> str:
    """``answer`` with its first two characters swapped (unchanged if they are equal or it is shorter)."""
    return answer[1] + answer[0] + answer[2:] if len(answer) >= 2 and answer[0] != answer[1] else answer


def guess(row: PromptRow, rng: random.Random) -> str:
    """A lookup row's answer with a made-up number in place of the one only the tool returns."""
    number = str(row.meta["table"][row.meta["key"]])
    made_up = rng.choice([n for n in range(100, 1000) if str(n) != number])
    return str(row.meta["answer"]).replace(number, str(made_up))


def student_target(st: QuickstartSettings, envs: Mapping[str, EnvironmentConfig]) -> TargetFn:
    """The student's SFT targets: each row's ``sft_target``, except that a row of a noisy kind, with
    probability ``student_noise`` (drawn afresh each time the row is drawn), is answered at once:
    a tool trajectory by its answer with a guessed number (no call: the student did not learn to
    use the tool there), any other row by its answer with a typo."""
    noisy = {(d, k) for d, kinds in st.student_noisy_kinds.items() for k in kinds}

    def target(row: PromptRow, rng: random.Random) -> Target:
        clean = sft_target(row, envs)
        if (row.domain, row.meta.get("kind")) not in noisy or rng.random() >= st.student_noise:
            return clean
        wrong = guess(row, rng) if len(clean) > 1 else typo(str(row.meta["answer"]))
        return [{"role": "assistant", "content": wrong}]

    return target


def _stage_teachers(out, st, base, recipe_over, results):
    """One teacher per domain, trained side by side, one process and one thread each: the tiny
    models do not use a second thread well (the agent teacher's SFT ran 2.80 steps/s on one thread,
    2.45 on two, on 2 cores), and the three SFTs, one after another, took ~30% of the command.
    One process per core, the longest SFT first (``sft_cost``): on 2 cores the agent teacher then
    trains alone on one while math's and code's follow each other on the other, instead of three
    sharing two cores until the agent's ran last, alone. A teacher's result does not depend on
    the order (its seed and data are its own)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from mopd.dist.runtime import free_ports

    domains = st.domain_names
    ports = free_ports("127.0.0.1", len(domains))  # one rendezvous each, all distinct
    jobs = [(out, st, base, i, d, p) for i, (d, p) in enumerate(zip(domains, ports, strict=True))]
    cost = {d: sft_cost(read_rows(out, d, "train", base), base.environments) for d in domains}
    jobs.sort(key=lambda job: -cost[job[4]])
    workers = min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip([job[4] for job in jobs], pool.map(_train_teacher, jobs), strict=True))
    return {d: done[d] for d in domains}


def sft_cost(rows: list[PromptRow], envs: Mapping[str, EnvironmentConfig]) -> float:
    """A domain's SFT cost per step, relative to the others': the mean characters of a row's prompt
    and target (a tool trajectory's turns and results included)."""
    sizes = [len(r.prompt) + sum(len(str(m["content"])) for m in sft_target(r, envs)) for r in rows[:256]]
    return sum(sizes) / max(len(sizes), 1)


def _train_teacher(job) -> dict[str, Any]:
    """Domain ``d``'s teacher: SFT from the student's checkpoint on ``d``'s rows only, then its
    greedy evaluation on ``d`` (in a process of its own: ``_stage_teachers``)."""
    import torch

    from mopd.domains import load_plugins

    out, st, base, i, d, port = job
    torch.set_num_threads(1)
    load_plugins(base.run.plugins)  # a plugin's domains, parsers, environments: registered in this process too
    init: dict[str, Any] = {"path": str(out / "student_sft"), "config": None, "tokenizer": None}
    lr = st.teacher_sft_lr
    if st.teacher_lora_rank > 0:  # an adapter of the student; save_hf writes it beside the merged model
        rank, lr = st.teacher_lora_rank, st.teacher_lora_lr
        init = {**init, "lora": LoraSettings(r=rank, alpha=2 * rank)}
    rows = read_rows(out, d, "train", base)
    r = run_sft(
        base, init, rows, st.teacher_sft_steps, lr, st.teacher_sft_schedule, st.sft_batch,
        st.seed + 1 + i, out / "teachers" / d, f"teacher {d} SFT", master_port=port, position=i,
    )  # fmt: skip
    ev = evaluate_model(base, out / "teachers" / d, read_rows(out, d, "eval", base))
    return {**r, "accuracy": ev.accuracy[d], **({"episodes": ev.episodes[d]} if d in ev.episodes else {})}


def _stage_mopd(out, st, base, recipe_over, results):
    from mopd.app.run import run_training

    shutil.rmtree(out / "mopd", ignore_errors=True)  # a re-run starts the MOPD stage afresh
    cfg = load_config(RECIPE, mopd_overrides(out, st) + recipe_over)
    run_training(cfg)
    return {"objective": cfg.objective.kind, "steps": cfg.run.total_steps}


def _stage_report(out, st, base, recipe_over, results):
    from mopd.app.export import export_checkpoint
    from mopd.app.report import build_report, plot_curves

    t0 = time.time()
    export_checkpoint(out / "mopd" / "checkpoints", out / "student_hf")
    after = evaluate_model(base, out / "student_hf", _eval_rows(out, st, base))
    report = build_report(st.domain_names, results, after.accuracy, out / "mopd" / "metrics.jsonl")
    add_episodes(report, results, after)
    rank = st.teacher_lora_rank
    report["teachers"] = f"LoRA adapters (rank {rank}) of the student, one worker" if rank else "full models"
    # All stages' own times (cached ones count as when they ran) plus this one so far.
    report["wall_time_s"] = round(sum(results[s]["seconds"] for s in STAGES[:-1]) + time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_curves(out / "mopd" / "metrics.jsonl", st.domain_names, out / "curves.png")
    print(format_table(report))
    return {"report": report}


def add_episodes(report: dict[str, Any], results: dict[str, Any], after: Evaluation) -> None:
    """``report["domains"][d]["episodes"]``, per multi-turn domain: the greedy eval episodes' stats
    (``EPISODE_STATS``) of the teacher, the student before and the student after MOPD."""
    for d in after.episodes:
        report["domains"][d]["episodes"] = {
            "student_before": results["student"].get("episodes", {}).get(d, {}),
            "teacher": results["teachers"][d].get("episodes", {}),
            "student_after": after.episodes[d],
        }


STAGE_FUNCS = {
    "domains": _stage_domains,
    "student": _stage_student,
    "teachers": _stage_teachers,
    "mopd": _stage_mopd,
    "report": _stage_report,
}


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'domain':8s} {'student before':>15s} {'teacher':>8s} {'student after':>14s} {'KL start':>9s} {'KL end':>7s}"
    ]
    for d, r in report["domains"].items():
        lines.append(
            f"{d:8s} {r['student_before']:15.3f} {r['teacher']:8.3f} {r['student_after']:14.3f} "
            f"{r.get('reverse_kl_start', float('nan')):9.3f} {r.get('reverse_kl_end', float('nan')):7.3f}"
        )
    lines.append(f"normalized score {report['normalized_score']:.3f} (objective: {report['objective']})")
    return "\n".join(lines + episode_lines(report))


def episode_lines(report: dict[str, Any]) -> list[str]:
    """The multi-turn domains' episode stats of ``report``, one line per model (none without such domains)."""
    multi = {d: r["episodes"] for d, r in report["domains"].items() if "episodes" in r}
    if not multi:
        return []
    head = f"{'domain':8s} {'model':15s} {'turns':>6s} {'tool calls':>11s} {'invalid calls':>14s} {'success':>8s}"
    lines = ["multi-turn domains, greedy eval episodes (means per trajectory):", head]
    nan = float("nan")
    for d, eps in multi.items():
        for who in WHO:
            e = eps.get(who, {})
            lines.append(
                f"{d:8s} {who.replace('_', ' '):15s} {e.get('turns', nan):6.2f} {e.get('tool_calls', nan):11.2f} "
                f"{e.get('tool_errors', nan):14.2f} {e.get('success', nan):8.3f}"
            )
    return lines


def episodes_table(reports: dict[int, dict[str, Any]]) -> str:
    """A Markdown table of several seeds' multi-turn episode stats: per multi-turn domain and stat,
    student before / teacher / after, one row per seed, then the mean ("" without such domains)."""
    seeds = sorted(reports)
    first = reports[seeds[0]]["domains"]
    cols = [(d, k, who) for d in first if "episodes" in first[d] for k in EPISODE_STATS for who in WHO]
    if not cols:
        return ""
    names = {"student_before": "before", "teacher": "teacher", "student_after": "after"}
    labels = {"turns": "turns", "tool_calls": "tool calls", "tool_errors": "invalid calls", "success": "success"}
    head = "| seed | " + " | ".join(f"{d} {labels[k]} {names[w]}" for d, k, w in cols) + " |"
    rows = {
        s: [reports[s]["domains"][d]["episodes"].get(w, {}).get(k, float("nan")) for d, k, w in cols] for s in seeds
    }
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {s} | " + " | ".join(f"{v:.2f}" for v in rows[s]) + " |" for s in seeds]
    means = [sum(rows[s][i] for s in seeds) / len(seeds) for i in range(len(cols))]
    lines.append("| **mean** | " + " | ".join(f"{v:.2f}" for v in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m mopd.app.quickstart DIR SEED...``: the episodes table of ``DIR/seed_S/report.json``."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m mopd.app.quickstart DIR SEED...", file=sys.stderr)
        return 2
    reports = {int(s): json.loads((Path(args[0]) / f"seed_{s}" / "report.json").read_text()) for s in args[1:]}
    print(episodes_table(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
