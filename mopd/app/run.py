"""The run: a validated recipe -> checks that need no actor -> the three pools -> the loop.

    run_training(load_config("recipes/tiny.yaml", ["run.total_steps=20"]))   # what `mopd train` does

Everything that can fail without an actor fails here first, in ``preflight`` (data sources, eval
prompts, the checkpoint to resume against the recipe, every teacher's vocabulary against the
student's), which ``mopd validate`` runs too; then
the run's one placement group is reserved (mopd/dist/placement.py: fails here, before any actor starts,
if the cluster cannot hold it), the teacher, trainer and rollout pools start together on its
bundles, ``MOPDLoop`` runs, and every pool and the group are released however the run ends. A run
that cannot go on raises ``RunStoppedError`` naming the ``--resume`` command.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mopd import checkpoint as ckpt
from mopd import sandbox
from mopd.app.check import check_teachers
from mopd.chat import student_tokenizer
from mopd.config import ConfigError, DataSourceConfig, MOPDConfig, to_yaml
from mopd.data import PromptMixer, load_source, load_sources
from mopd.dist.actors import ActorFailedError
from mopd.dist.placement import RunPlacement
from mopd.dist.runtime import init_ray, warn_if_in_ray_working_dir
from mopd.domains import verifiers
from mopd.loop import ConfigMismatchError, MOPDLoop, check_teacher_set, teacher_fingerprint
from mopd.metrics import MetricsWriter
from mopd.models import model_config
from mopd.objective import get_objective
from mopd.types import PromptRow

log = logging.getLogger(__name__)


class RunStoppedError(RuntimeError):
    """The run cannot go on (a trainer rank died, a worker ran out of restarts); nothing after the
    latest checkpoint was saved, and the message says how to continue with ``--resume``."""


def run_training(cfg: MOPDConfig, resume: bool = False, force_teachers: bool = False) -> Path:
    """Validate data, start the actors, run (or resume) the loop; returns the output directory.
    Logs through ``logging`` and configures none of it: the program that calls this does (``mopd
    train``: ``mopd.app.cli.configure_logging``)."""
    pre = preflight(cfg, resume, force_teachers)  # every refusal a user can cause, before Ray
    sandbox.allow_unisolated(cfg.sandbox.allow_unisolated)  # the verifiers run in this process
    mixer, eval_rows, latest, signature = pre.mixer, pre.eval_rows, pre.latest, pre.signature
    out = Path(cfg.run.output_dir)
    # A submitted job's relative paths resolve in Ray's copy of its --working-dir: say so, loudly.
    where = {"run.output_dir": out} | ({"checkpoint.dir": Path(cfg.checkpoint.dir)} if cfg.checkpoint.dir else {})
    warn_if_in_ray_working_dir(where)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(to_yaml(cfg))  # the resolved recipe this run used

    # The workers load here, not at import: `mopd validate` and the checks above need no Ray.
    from rollout import RolloutPool
    from teachers import TeacherPool
    from trainers import TrainerPool

    for warning in pre.warnings:  # e.g. a teacher that is the student (mopd check)
        log.warning("%s", warning)
    init_ray(cfg)
    pools: list[Any] = []
    writer = MetricsWriter(out, resume_step=None if latest is None else int(ckpt.read_state(latest)["step"]))
    try:
        topk = get_objective(cfg.objective.kind).teacher_topk(cfg.objective)
        placement = RunPlacement.create(cfg)
        pools.append(placement)  # released last, after every pool's actors
        teachers, trainer, rollout = start_pools(
            pools,
            lambda: TeacherPool(
                cfg.teachers,
                cfg.run.seed,
                signature,
                max_topk=max(topk, 1),
                env=cfg.ray.env,
                max_restarts=cfg.ray.max_restarts,
                placement=placement,
            ),
            lambda: TrainerPool(cfg, placement),
            lambda: RolloutPool(cfg, placement=placement),
        )
        loop = MOPDLoop(cfg, rollout, teachers, trainer, mixer, writer, eval_rows)
        if latest is not None:
            loop.restore(latest, force_teachers)
        if pre.data_stats:
            writer.write(loop.step, pre.data_stats)
        loop.run()
    except ActorFailedError as e:
        stopped = RunStoppedError(stopped_message(cfg, e))
        log.error("%s", stopped)
        raise stopped from e
    except BaseException as e:
        log.error("the run stopped (%s: %s); %s", type(e).__name__, e, stopped_message(cfg, None))
        raise
    finally:
        writer.close()
        _shutdown(pools)
    return out


@dataclass
class Preflight:
    """What the checks before Ray produce, for the run to use."""

    mixer: PromptMixer
    data_stats: dict[str, int]  # data/loaded, data/skipped/<kind>
    eval_rows: list[PromptRow]
    latest: Path | None  # the checkpoint to resume from
    signature: dict[str, Any]  # the student's vocabulary signature (mopd.vocab)
    warnings: list[str] = field(default_factory=list)  # e.g. a teacher that is the student (mopd check)


def preflight(cfg: MOPDConfig, resume: bool = False, force_teachers: bool = False) -> Preflight:
    """Every check ``mopd train`` runs before Ray, and all that ``mopd validate`` runs after the
    recipe's own (``mopd.config.validate``): every data source read and checked, the eval prompts,
    the checkpoint to resume against the recipe (teacher set, data sources and seed, student), every
    teacher's vocabulary, special ids and stop ids against the student's (``mopd check`` without
    ``--models``: tokenizers and configs only, no weights). Writes
    nothing. Raises ``ConfigError`` (or a subclass) naming what to change."""
    tokenizer = readable_student_tokenizer(cfg)
    mixer, data_stats = build_mixer(cfg, tokenizer)
    eval_rows = build_eval_rows(cfg, tokenizer)
    check_sandbox(cfg, mixer, eval_rows)
    check_environments(cfg, tokenizer)
    check_lora_sync(cfg)
    latest = _checkpoint_to_resume(cfg, resume, force_teachers)
    signature, warnings = checked_teachers(cfg)
    if latest is not None:
        _check_data_cursor(mixer, latest)
        _check_student(cfg, latest)
    return Preflight(mixer, data_stats, eval_rows, latest, signature, warnings)


def check_environments(cfg: MOPDConfig, tokenizer: Any) -> None:
    """Multi-turn domains (``environments``) need a student chat template that appends a tool result
    without changing what it rendered before (rollout/multiturn.py ``ChatRenderer``)."""
    if not cfg.environments:
        return
    from mopd.chat import stop_token_ids
    from rollout.multiturn import TemplateError, make_renderer

    try:
        stops = stop_token_ids(cfg, tokenizer)
    except ValueError:  # reported by the teacher checks, with what to set
        stops = []
    try:
        make_renderer(tokenizer, stops)
    except TemplateError as e:
        raise ConfigError(f"environments ({', '.join(sorted(cfg.environments))}): {e}") from e


def check_lora_sync(cfg: MOPDConfig) -> None:
    """``rollout.lora_sync: adapter`` (a LoRA student on the vLLM rollout) needs vLLM's LoRA for the
    student's architecture; ``auto`` sends merged weights where it has none."""
    lora = getattr(cfg.student, "lora", None)
    if cfg.rollout.backend != "vllm" or cfg.rollout.lora_sync != "adapter" or lora is None or lora.r == 0:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from mopd.models import model_config

    config = model_config(cfg.student)
    arch = (getattr(config, "architectures", None) or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")])[0]
    try:
        from rollout.vllm import no_lora_message, vllm_has_lora
    except ImportError:  # no vLLM here: the rollout's start says so
        return
    if not vllm_has_lora(arch):
        raise ConfigError(no_lora_message(arch))


def check_sandbox(cfg: MOPDConfig, mixer: PromptMixer, eval_rows: list[PromptRow]) -> None:
    """Model output is executed (a verified row whose domain ``executes`` it: training rows when
    ``objective.alpha > 0``, eval rows) only where the sandbox's kernel layer works, or where the
    recipe accepts the risk (``sandbox.allow_unisolated``)."""
    if cfg.sandbox.allow_unisolated:
        return
    known = verifiers()
    verified: list[tuple[str, Iterator[PromptRow]]] = [("eval.every > 0", iter(eval_rows))]
    if get_objective(cfg.objective.kind).uses_outcome_reward(cfg.objective):
        verified.append((f"objective.alpha={cfg.objective.alpha}", mixer.rows()))
    for why, rows in verified:
        row = next((r for r in rows if executes(r, known)), None)
        if row is not None and sandbox.isolation() == "basic":
            whose = f"verifier {row.verifier!r}" if row.verifier else f"verifier of domain '{row.domain}'"
            raise ConfigError(
                f"the {whose} executes model output ({row.source} rows, {why}), but {sandbox.unisolated_message()}"
            )


def executes(row: PromptRow, known: dict[str, Any]) -> bool:
    """Whether verifying ``row`` runs the response: its source's verifier says so, or (none named)
    its domain's registered one (``known``: ``mopd.domains.verifiers()``)."""
    if row.verifier is not None:
        from mopd.verifiers import verifier_executes

        return verifier_executes(row.verifier, row)
    return row.domain in known and known[row.domain].executes(row)


def stopped_message(cfg: MOPDConfig, cause: BaseException | None) -> str:
    """What stopped the run, where it can continue from, and how."""
    latest = ckpt.latest_checkpoint(ckpt.checkpoint_root(cfg))
    if latest is None:
        where = "no checkpoint was written yet, so --resume starts again from step 0"
    else:
        where = f"it can continue from checkpoint step {int(ckpt.read_state(latest)['step'])} ({latest})"
    head = f"{cause}; the run stopped and saved nothing after its latest checkpoint: " if cause else ""
    return f"{head}{where}. Continue with: mopd train <recipe> [overrides] --resume"


def _shutdown(pools: list[Any]) -> None:
    """Shut every pool down (last started first), even if one of them fails to."""
    for pool in reversed(pools):
        try:
            pool.shutdown()
        except Exception as e:  # keep releasing the others; the run's own error matters more
            log.warning("shutting down %s: %s", type(pool).__name__, e)


def start_pools(pools: list[Any], *starters: Callable[[], Any]) -> list[Any]:
    """Start the pools at once (their actors load models in parallel, not one pool after the
    other) and append each started one to ``pools`` for shutdown. If any fails, the first
    failure in ``starters`` order is raised (teachers first: a vocabulary mismatch is reported as
    such) once all have finished starting; the caller shuts down the ones in ``pools``."""
    t0 = time.monotonic()
    took: dict[str, float] = {}

    def timed(start: Callable[[], Any]) -> Any:
        pool = start()
        took[type(pool).__name__] = time.monotonic() - t0
        return pool

    with ThreadPoolExecutor(max_workers=len(starters), thread_name_prefix="mopd-start") as ex:
        futures = [ex.submit(timed, start) for start in starters]
    if took:  # each pool's actors loaded their models, side by side: where a slow start goes
        each = ", ".join(f"{k} {v:.1f} s" for k, v in took.items())
        log.info("pools started in %.1f s (%s)", max(took.values()), each)
    errors = []
    for f in futures:
        try:
            pools.append(f.result())
        except BaseException as e:
            errors.append(e)
    if errors:
        raise errors[0]
    return pools[-len(starters) :]


def _checkpoint_to_resume(cfg: MOPDConfig, resume: bool, force_teachers: bool) -> Path | None:
    if not resume:
        return None
    root = ckpt.checkpoint_root(cfg)
    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        started = Path(cfg.run.output_dir) / "recipe.yaml"  # written by every run before its actors start
        if not started.is_file():
            raise ConfigError(
                f"--resume: nothing to resume: no checkpoint under {root} and no earlier run in "
                f"{cfg.run.output_dir}; check run.output_dir (run.name) and checkpoint.dir, or drop --resume"
            )
        log.warning("--resume: no checkpoint under %s; starting from step 0", root)
        return None
    # Checked here too, so a teacher mismatch fails before any actor starts.
    check_teacher_set(ckpt.read_state(latest).get("teachers", {}), teacher_fingerprint(cfg), force_teachers)
    return latest


def _check_data_cursor(mixer: PromptMixer, latest: Path) -> None:
    """The checkpoint's data cursor fits these sources and this seed (else the run would stop in
    ``MOPDLoop.restore``, after every actor started)."""
    try:
        mixer.load_state_dict(ckpt.read_state(latest)["data"])
    except ValueError as e:
        raise ConfigMismatchError(
            f"--resume: the data differs from checkpoint {latest}'s ({e}); resume with the data.sources "
            "and run.seed of the recipe the checkpoint was written with"
        ) from None


# The student settings that shape its weights and optimizer state: a checkpoint of another fits no more.
STUDENT_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def _check_student(cfg: MOPDConfig, latest: Path) -> None:
    """The checkpoint was trained from a student of the recipe's shape (its ``hf/config.json``
    against the recipe's student; paths may differ), else loading it would fail after every actor
    started."""
    saved_json = latest / "hf" / "config.json"
    if not saved_json.is_file():
        return
    saved, current = json.loads(saved_json.read_text()), model_config(cfg.student).to_dict()
    diffs = [
        f"{k}: {current[k]!r} vs {saved[k]!r}"
        for k in STUDENT_SHAPE_KEYS
        if k in saved and k in current and saved[k] != current[k]
    ]
    if diffs:
        raise ConfigMismatchError(
            f"--resume: the student differs from checkpoint {latest}'s (recipe vs checkpoint: {'; '.join(diffs)}); "
            "resume with the student the checkpoint was trained from (student.path or student.config)"
        )


def readable_student_tokenizer(cfg: MOPDConfig) -> Any:
    """``mopd.chat.student_tokenizer``, or a ConfigError saying what to set when it cannot be read."""
    try:
        return student_tokenizer(cfg)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"student: cannot read its tokenizer ({first}); set student.path to a Hugging Face model directory "
            "with tokenizer files, or student.tokenizer to a tokenizer directory"
        ) from None


def build_mixer(cfg: MOPDConfig, tokenizer: Any = None) -> tuple[PromptMixer, dict[str, int]]:
    """Load every data source and mix them by weight; returns (mixer, data stats). ``tokenizer``:
    the student's (loaded here if not given), which renders chat prompts and counts their tokens."""
    tokenizer = tokenizer if tokenizer is not None else readable_student_tokenizer(cfg)
    sources, stats = load_sources(cfg.data, cfg.run.seed, set(cfg.teachers), tokenizer)
    return PromptMixer(sources, seed=cfg.run.seed), stats


def build_eval_rows(cfg: MOPDConfig, tokenizer: Any = None) -> list[PromptRow]:
    """Up to ``eval.num_prompts`` held-out prompts per domain that has a verifier: a source's
    ``eval_path``, or its generator's eval split. Empty when ``eval.every`` is 0."""
    if cfg.eval.every <= 0:
        return []
    tokenizer = tokenizer if tokenizer is not None else readable_student_tokenizer(cfg)
    per_domain: dict[str, list[PromptRow]] = {}
    for src in evaluated_sources(cfg):
        if src.domain not in per_domain:
            per_domain[src.domain] = held_out_rows(cfg, src, cfg.eval.num_prompts, tokenizer)
    return [r for d in sorted(per_domain) for r in per_domain[d]]


def evaluated_sources(cfg: MOPDConfig) -> list[DataSourceConfig]:
    """The sources that can be evaluated: held-out prompts (``held_out``) and a verifier (their
    own ``verifier``, or their domain's)."""
    verified = verifiers()
    return [
        s for s in cfg.data.sources if (s.verifier is not None or s.domain in verified) and held_out(s, 0) is not None
    ]


def held_out(src: DataSourceConfig, num_prompts: int) -> DataSourceConfig | None:
    """The source of ``src``'s held-out prompts: its ``eval_path``, its dataset's ``eval_split``, or
    its generator's eval split (``num_prompts`` of them); None for a file source without
    ``eval_path``."""
    if src.eval_path is not None:
        return replace(src, path=src.eval_path, generator=None)
    if src.eval_split is not None:
        return replace(src, split=src.eval_split)
    if src.generator is not None:
        return replace(src, split="eval", num_prompts=num_prompts)
    return None


def held_out_rows(cfg: MOPDConfig, src: DataSourceConfig, num_prompts: int, tokenizer: Any) -> list[PromptRow]:
    """Up to ``num_prompts`` of ``src``'s held-out rows (``held_out``), checked as training rows are."""
    source = held_out(src, num_prompts)
    if source is None:
        return []
    known = set(cfg.teachers)
    rows, _ = load_source(source, cfg.run.seed, cfg.data.max_prompt_len, cfg.data.on_bad_row, known, tokenizer)
    return rows[:num_prompts]


def checked_teachers(cfg: MOPDConfig) -> tuple[dict[str, Any], list[str]]:
    """``mopd check``'s cheap part (mopd/app/check.py: every teacher's vocabulary, probe and chat
    ids, special and stop ids against the student's): raises on a mismatch; returns the student's
    vocabulary signature and the warnings (a teacher that is the student, ...)."""
    report = check_teachers(cfg)
    report.raise_on_failure()
    return report.student.signature, report.warnings
