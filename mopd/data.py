"""Prompt data: load each configured source into ``PromptRow``s, then mix sources by weight.

A source (``data.sources[i]`` in a recipe) is a JSONL file, a Parquet file, a directory saved by
``datasets`` (``save_to_disk``), a directory of JSONL/Parquet files, or a registered synthetic
generator. A row's prompt is text (``prompt_key``) or chat messages (``messages_key``), rendered
with the student's chat template (mopd/chat.py). Every row is checked (prompt present, non-empty, at
most ``data.max_prompt_len`` tokens as the student sees it, domain known and equal to the
source's); a bad row either stops loading with a ``DataError`` naming the file and row
(``data.on_bad_row: reject``) or is skipped and counted (``skip``).

    tok = student_tokenizer(cfg)     # mopd.chat
    sources, stats = load_sources(cfg.data, seed=cfg.run.seed, known_domains=set(cfg.teachers), tokenizer=tok)
    mixer = PromptMixer(sources, seed=cfg.run.seed)
    rows = mixer.next_batch(8)          # resumable: mixer.state_dict() / load_state_dict(d)
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mopd.chat import prompt_ids, render_messages
from mopd.config import ON_BAD_ROWS, ConfigError, DataConfig, DataSourceConfig
from mopd.seeds import derive_seed, rng_state_from_json, rng_state_to_json
from mopd.types import PromptRow

log = logging.getLogger(__name__)

SKIPPED = "data/skipped/"
# (where, record or None, problem or None): a record from a file, or the reason it has none.
Record = tuple[str, Any, str | None]
Source = tuple[DataSourceConfig, list[PromptRow]]


class DataError(ConfigError):
    """A data source that cannot be used; the message names the file, the row and the problem."""


class _BadRow(Exception):
    """One row's problem: ``kind`` is the stats key suffix, ``message`` says what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def source_name(src: DataSourceConfig) -> str:
    """How a source is named in messages, rows and checkpoints."""
    return f"generator:{src.generator}" if src.generator is not None else str(src.path)


# --------------------------------------------------------------------------- reading records


def _jsonl_records(path: Path) -> Iterator[Record]:
    """One record per non-blank line; blank lines are not rows but still count in line numbers."""
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as e:
                yield where, None, f"malformed JSON ({e.msg} at column {e.colno})"


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for i, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}, row {i}", rec, None


def _saved_dataset_records(path: Path, split: str) -> Iterator[Record]:
    """Rows of a ``save_to_disk`` directory; a DatasetDict contributes its ``split``."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} in the saved dataset; splits: {', '.join(ds)}")
        ds, path = ds[split], path / split
    for i, rec in enumerate(ds, start=1):
        yield f"{path}, row {i}", rec, None


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _file_records(path: Path) -> Iterator[Record]:
    if path.suffix == ".parquet":
        return _parquet_records(path)
    if path.suffix == ".jsonl":
        return _jsonl_records(path)
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .parquet or a datasets directory")


def _path_records(src: DataSourceConfig) -> Iterator[Record]:
    """Records of a file or directory source, files of a directory in name order."""
    path = Path(str(src.path))
    if not path.exists():
        raise DataError(f"data source {path}: file or directory does not exist")
    if path.is_file():
        return _file_records(path)
    if _is_saved_dataset(path):
        return _saved_dataset_records(path, src.split)
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet") and p.is_file())
    if not files:
        raise DataError(f"{path}: no .jsonl or .parquet files and not a saved datasets directory")
    return itertools.chain.from_iterable(_file_records(p) for p in files)


def _generated_records(src: DataSourceConfig, seed: int) -> Iterator[Record]:
    """Rows of a registered generator, with a generator of its own per (seed, domain, generator,
    split): sources never share a random stream, so adding one changes no other."""
    from mopd.domains import get_generator

    gen = get_generator(str(src.generator)).generate
    rng = random.Random(derive_seed(seed, src.domain, src.generator, src.split))
    for i, row in enumerate(gen(rng, src.num_prompts, src.split), start=1):
        # No "domain" field: the rows take the source's domain (a recipe may relabel a generator).
        rec = {**row.meta, src.prompt_key: row.prompt}
        yield f"generator {src.generator!r}, row {i}", rec, None


# --------------------------------------------------------------------------- checking rows


def _check_messages(messages: Any, key: str) -> list[dict[str, Any]]:
    """A chat-form prompt: a non-empty list of {role, content} objects."""
    if not isinstance(messages, list) or not messages:
        got = type(messages).__name__
        raise _BadRow("bad_messages", f"{key!r} must be a non-empty list of chat messages, got {got}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
            raise _BadRow("bad_messages", f"{key!r}[{j}] is not a message with a 'role' string and a 'content'")
    return messages


def _render(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The messages through the chat template; a template that refuses them (many raise on roles
    out of order or a role they do not know) makes the row a bad row."""
    from jinja2 import TemplateError

    try:
        return render_messages(tokenizer, messages)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        raise _BadRow(
            "bad_messages", f"the chat template cannot render these messages ({type(e).__name__}: {e})"
        ) from e


def _prompt_field(rec: Any, src: DataSourceConfig) -> tuple[str, Any]:
    """(field name, value) of the record's prompt: its messages for a chat-form source, else its text."""
    if not isinstance(rec, dict):
        raise _BadRow("malformed_json", f"expected a JSON object, got {type(rec).__name__}")
    key = src.messages_key or src.prompt_key
    if rec.get(key) is None:  # a column may hold None where a row lacks the field
        hint = ""
        if src.messages_key is None and isinstance(rec.get("messages"), list):
            hint = "; for chat messages set the source's messages_key: messages"
        raise _BadRow("missing_prompt", f"no {key!r} field (fields: {', '.join(map(str, rec)) or 'none'}){hint}")
    return key, rec[key]


def _check_record(rec: Any, src: DataSourceConfig, tokenizer: Any, max_prompt_len: int, known: set[str]) -> PromptRow:
    """The record as a ``PromptRow`` (without source and index), or ``_BadRow`` saying why the
    record cannot be used."""
    key, value = _prompt_field(rec, src)
    messages = None
    if src.messages_key is not None:
        messages = _check_messages(value, key)
        prompt = _render(tokenizer, messages)
    elif not isinstance(value, str):
        raise _BadRow("prompt_not_string", f"{key!r} is a {type(value).__name__}, not a string")
    else:
        prompt = value
    if not prompt.strip():
        raise _BadRow("empty_prompt", f"empty prompt in {key!r}")
    domain = rec.get("domain")
    if domain is not None and (not isinstance(domain, str) or domain not in known):
        raise _BadRow("unknown_domain", f"unknown domain {domain!r}; known: {', '.join(sorted(known))}")
    if domain is not None and domain != src.domain:
        raise _BadRow("domain_mismatch", f"row domain {domain!r} differs from the source's domain {src.domain!r}")
    meta = {k: v for k, v in rec.items() if k not in (key, "domain")}
    row = PromptRow(prompt=prompt, domain=src.domain, meta=meta, messages=messages)
    n_tokens = len(prompt_ids(tokenizer, row))
    if n_tokens > max_prompt_len:
        message = f"prompt has {n_tokens} tokens; data.max_prompt_len is {max_prompt_len}"
        raise _BadRow("prompt_too_long", message)
    return row


def _rows(
    records: Iterator[Record],
    src: DataSourceConfig,
    tokenizer: Any,
    max_prompt_len: int,
    on_bad_row: str,
    known: set[str],
) -> tuple[list[PromptRow], Counter]:
    rows: list[PromptRow] = []
    skipped: Counter = Counter()
    name = source_name(src)
    for where, rec, problem in records:
        try:
            if problem is not None:
                raise _BadRow("malformed_json", problem)
            row = _check_record(rec, src, tokenizer, max_prompt_len, known)
        except _BadRow as bad:
            if on_bad_row == "reject":
                hint = " (set data.on_bad_row=skip to skip such rows)"
                raise DataError(f"{where}: {bad.message}{hint}") from None
            skipped[bad.kind] += 1
            continue
        rows.append(replace(row, source=name, index=len(rows)))
    return rows, skipped


def _chat_form_needs_template(src: DataSourceConfig, tokenizer: Any) -> None:
    if src.messages_key is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source_name(src)}: rows are chat messages ({src.messages_key!r}) but the student tokenizer has "
            "no chat template; set data.chat_template to a Jinja template file, or give text prompts (prompt_key)"
        )
    if src.messages_key is None and src.path is not None and getattr(tokenizer, "chat_template", None):
        log.warning(
            "%s: text prompts are used as they are, though the student tokenizer has a chat template; "
            "give chat messages (the source's messages_key) to have them rendered with it",
            source_name(src),
        )


def load_source(
    src: DataSourceConfig, seed: int, max_prompt_len: int, on_bad_row: str, known_domains: set[str], tokenizer: Any
) -> tuple[list[PromptRow], dict[str, int]]:
    """Load and check one source; returns its rows and stats (``data/skipped/<kind>``, ``data/loaded``).

    ``tokenizer`` is the student's (``mopd.chat.student_tokenizer``): chat-form rows are rendered
    with its template and every prompt's length is counted in its tokens (``mopd.chat.prompt_ids``).

    File rows keep every field other than the prompt and ``domain`` in ``row.meta``; generated rows
    carry the generator's meta (e.g. ``answer``). ``num_prompts`` and ``split`` apply to generators
    (``split`` also picks the split of a saved DatasetDict); files are used whole.
    """
    if on_bad_row not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_row is {on_bad_row!r}; valid: {', '.join(ON_BAD_ROWS)}")
    name = source_name(src)
    if src.domain not in known_domains:
        raise DataError(f"{name}: source domain {src.domain!r} is not known; known: {', '.join(sorted(known_domains))}")
    if (src.path is None) == (src.generator is None):
        raise DataError(f"source of domain {src.domain!r}: set exactly one of 'path' and 'generator'")
    _chat_form_needs_template(src, tokenizer)
    records = _generated_records(src, seed) if src.generator is not None else _path_records(src)
    rows, skipped = _rows(records, src, tokenizer, max_prompt_len, on_bad_row, known_domains)
    if skipped:
        log.warning("%s: skipped %d bad rows (%s)", name, sum(skipped.values()), dict(skipped))
    if skipped["prompt_too_long"]:
        log.warning(
            "%s: dropped %d prompts longer than data.max_prompt_len (%d tokens)",
            name,
            skipped["prompt_too_long"],
            max_prompt_len,
        )
    if not rows:
        raise DataError(f"{name}: no usable prompts (skipped: {dict(skipped) or 'none'})")
    stats = {SKIPPED + kind: n for kind, n in sorted(skipped.items())}
    stats["data/loaded"] = len(rows)
    return rows, stats


def load_sources(
    cfg: DataConfig, seed: int, known_domains: set[str], tokenizer: Any
) -> tuple[list[Source], dict[str, int]]:
    """Load every source of ``cfg`` (``tokenizer``: as for ``load_source``); stats are summed over sources."""
    loaded: list[Source] = []
    total: Counter = Counter()
    for src in cfg.sources:
        rows, stats = load_source(src, seed, cfg.max_prompt_len, cfg.on_bad_row, known_domains, tokenizer)
        loaded.append((src, rows))
        total.update(stats)
    return loaded, dict(total)


# --------------------------------------------------------------------------- mixing


class PromptMixer:
    """Draws prompts: each prompt's source by weight, then the next row of that source's shuffled order.

    Every source walks through a permutation of its rows and reshuffles when it runs out (an
    epoch), so no row repeats before all rows of its source have been drawn. The permutation of
    epoch e of source i is a function of (seed, i, e), so the cursor needed to resume exactly is
    small: the weight RNG's state plus each source's position and epoch.
    """

    def __init__(self, sources: Sequence[Source], seed: int):
        if not sources:
            raise ValueError("PromptMixer needs at least one source")
        for src, rows in sources:
            if not rows:
                raise ValueError(f"source {source_name(src)} has no rows")
            if not (math.isfinite(src.weight) and src.weight > 0):
                raise ValueError(f"source {source_name(src)}: weight must be positive, got {src.weight}")
        self._sources = list(sources)
        self._seed = seed
        total = sum(src.weight for src, _ in sources)
        self._cum = list(itertools.accumulate(src.weight / total for src, _ in sources))
        self._rng = random.Random(derive_seed(seed, "mixer"))
        self._pos = [0] * len(sources)
        self._epoch = [0] * len(sources)
        self._order = [self._permutation(i, 0) for i in range(len(sources))]

    def rows(self) -> Iterator[PromptRow]:
        """Every row of every source, in source order."""
        for _, rows in self._sources:
            yield from rows

    def _permutation(self, i: int, epoch: int) -> list[int]:
        order = list(range(len(self._sources[i][1])))
        random.Random(derive_seed(self._seed, "order", i, epoch)).shuffle(order)
        return order

    def _pick_source(self) -> int:
        # bisect on the cumulative weights; min() guards the last bucket against rounding (sum < 1).
        return min(bisect.bisect_right(self._cum, self._rng.random()), len(self._cum) - 1)

    def _take(self, i: int) -> PromptRow:
        if self._pos[i] == len(self._order[i]):
            self._epoch[i] += 1
            self._pos[i] = 0
            self._order[i] = self._permutation(i, self._epoch[i])
        row = self._sources[i][1][self._order[i][self._pos[i]]]
        self._pos[i] += 1
        return row

    def next_batch(self, k: int) -> list[PromptRow]:
        """The next ``k`` prompts (rows are shared objects: do not mutate them)."""
        return [self._take(self._pick_source()) for _ in range(k)]

    def state_dict(self) -> dict[str, Any]:
        """The full cursor as JSON-serialisable data (plus what identifies the sources)."""
        return {
            "seed": self._seed,
            "sources": [[source_name(src), len(rows)] for src, rows in self._sources],
            "rng": rng_state_to_json(self._rng.getstate()),
            "positions": list(self._pos),
            "epochs": list(self._epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the sources and seed must be those it was taken with."""
        mine = [[source_name(src), len(rows)] for src, rows in self._sources]
        theirs = [list(s) for s in state["sources"]]
        if theirs != mine:
            raise ValueError(f"mixer state is for sources {theirs}, but this mixer has {mine}")
        if state["seed"] != self._seed:
            raise ValueError(f"mixer state was taken with seed {state['seed']}, this mixer has seed {self._seed}")
        self._rng.setstate(rng_state_from_json(state["rng"]))
        self._pos = [int(p) for p in state["positions"]]
        self._epoch = [int(e) for e in state["epochs"]]
        self._order = [self._permutation(i, e) for i, e in enumerate(self._epoch)]
