"""Prompt data: load each configured source into ``PromptRow``s, then mix sources by weight.

A source (``data.sources[i]`` in a recipe, docs/data.md) is read by Hugging Face ``datasets``: a Hub
dataset (``openai/gsm8k`` with ``name``, ``split``, ``revision``; from the ``datasets`` cache when
``HF_DATASETS_OFFLINE=1``), local JSON Lines / JSON / Parquet / CSV files (a file, a glob, a
directory, ``data_files``), or a directory saved with ``save_to_disk``; or it is a registered
synthetic generator. Local files are read one at a time, so that a bad row is named by its file and
line (JSON Lines, blank lines counted) or row; a malformed JSON line, which makes ``datasets`` refuse
the whole file, is found by reading the file line by line and named (or skipped) the same way.

A row's prompt is text (``prompt_key``) or chat messages (``messages_key``), rendered with the
student's chat template (mopd/chat.py); ``prompt_as_user`` makes the text one user turn, rendered
the same way. The columns ``answer_key``, ``tests_key`` and ``calls_key`` go to ``row.meta`` as
``answer``, ``tests`` and ``calls``, every other column under its own name (a missing value is left
out); ``row.verifier`` is the source's ``verifier``. Every row is checked (prompt present,
non-empty, at most ``data.max_prompt_len`` tokens as the student sees it, domain known and equal to
the source's); a bad row either stops loading with a ``DataError`` naming the file and row
(``data.on_bad_row: reject``) or is skipped and counted (``skip``).

    tok = student_tokenizer(cfg)     # mopd.chat
    sources, stats = load_sources(cfg.data, seed=cfg.run.seed, known_domains=set(cfg.teachers), tokenizer=tok)
    mixer = PromptMixer(sources, seed=cfg.run.seed)
    rows = mixer.next_batch(8)          # resumable: mixer.state_dict() / load_state_dict(d)
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import itertools
import json
import logging
import math
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mopd.chat import prompts_ids, render_messages
from mopd.config import (
    DATASET_BUILDERS,
    ON_BAD_ROWS,
    ConfigError,
    DataConfig,
    DataSourceConfig,
    data_files_list,
    is_glob,
    is_hub_dataset_name,
)
from mopd.seeds import derive_seed, rng_state_from_json, rng_state_to_json
from mopd.types import PromptRow

log = logging.getLogger(__name__)

SKIPPED = "data/skipped/"
Source = tuple[DataSourceConfig, list[PromptRow]]
# The datasets reader of a local file, by its suffix.
READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# The columns that go to row.meta under a standard name: (meta key, the source's field naming the column).
MAPPED_KEYS = (("answer", "answer_key"), ("tests", "tests_key"), ("calls", "calls_key"))
_SKIP_HINT = " (set data.on_bad_row=skip to skip such rows)"


class DataError(ConfigError):
    """A data source that cannot be used; the message names the file, the row and the problem."""


class _BadRow(Exception):
    """One row's problem: ``kind`` is the stats key suffix, ``message`` says what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class _Part:
    """Rows read from one place (a file, a split, a generator) and how messages name row ``i`` (from 0)."""

    rows: Iterable[dict[str, Any]]
    columns: list[str]
    where: Callable[[int], str]


def source_name(src: DataSourceConfig) -> str:
    """How a source is named in messages, rows and checkpoints (a generator's or path's name as it
    always was; a configuration and data_files are added where set)."""
    if src.generator is not None:
        return f"generator:{src.generator}"
    name = "" if src.path is None else str(src.path)
    if src.name is not None:
        name += f":{src.name}"
    if src.data_files is not None:
        files = ",".join(data_files_list(src.data_files))
        name = f"{name}[{files}]" if name else files
    return name


# --------------------------------------------------------------------------- reading rows


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No ``datasets`` progress bars while local files are read: one per file would be noise."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _why(e: BaseException) -> str:
    """datasets' reason on one line: the cause of a generation error (which only says one happened)."""
    from datasets.exceptions import DatasetGenerationError

    while isinstance(e, DatasetGenerationError) and e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _dataset_part(ds: Any, where: Callable[[int], str]) -> _Part:
    """A ``datasets.Dataset`` as a part, its rows read a batch at a time (5x faster than one by one)."""

    def rows() -> Iterator[dict[str, Any]]:
        for batch in ds.iter(batch_size=1024):
            columns = list(batch)
            for values in zip(*batch.values(), strict=True):
                yield dict(zip(columns, values, strict=True))

    return _Part(rows(), list(ds.column_names), where)


def _generated_part(src: DataSourceConfig, seed: int) -> _Part:
    """Rows of a registered generator, with a generator of its own per (seed, domain, generator,
    split): sources never share a random stream, so adding one changes no other."""
    from mopd.domains import get_generator

    gen = get_generator(str(src.generator)).generate
    rng = random.Random(derive_seed(seed, src.domain, src.generator, src.split))
    # No "domain" field: the rows take the source's domain (a recipe may relabel a generator).
    records = [{**row.meta, src.prompt_key: row.prompt} for row in gen(rng, src.num_prompts, src.split)]
    columns = list(dict.fromkeys(k for rec in records for k in rec))
    return _Part(records, columns, lambda i: f"generator {src.generator!r}, row {i + 1}")


def _hub_part(src: DataSourceConfig) -> _Part:
    """A Hub dataset's split (all its ``data_files`` where those are set): downloaded into, or with
    ``HF_DATASETS_OFFLINE=1`` read from, the ``datasets`` cache."""
    from datasets import load_dataset

    name = source_name(src)
    split = "train" if src.data_files is not None else src.split
    try:
        ds = load_dataset(str(src.path), src.name, split=split, revision=src.revision, data_files=src.data_files)
    except Exception as e:  # not on the Hub nor in the cache, offline, no such config or split, ...
        raise DataError(
            f"{name}: no local file or directory of this name, and datasets cannot load it as a Hub dataset "
            f"({_why(e)}); offline, HF_DATASETS_OFFLINE=1 reads a dataset an earlier load put in the cache"
        ) from e
    return _dataset_part(ds, lambda i: f"{name}, split {split}, row {i + 1}")


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _saved_part(path: Path, split: str) -> _Part:
    """Rows of a ``save_to_disk`` directory; a DatasetDict contributes its ``split``."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} in the saved dataset; splits: {', '.join(ds)}")
        ds, path = ds[split], path / split
    return _dataset_part(ds, lambda i: f"{path}, row {i + 1}")


def _glob_files(patterns: list[str], base: Path | None, name: str) -> list[Path]:
    """The files each pattern (relative to ``base`` if given) matches, in name order per pattern."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        full = str(base / pattern) if base is not None else pattern
        matched = sorted(Path(m) for m in glob.glob(full, recursive=True) if Path(m).is_file())
        if not matched:
            raise DataError(f"{name}: no file matches {pattern!r}" + (f" in {base}" if base is not None else ""))
        files.update(dict.fromkeys(matched))
    return list(files)


def _directory_files(src: DataSourceConfig, path: Path) -> list[Path]:
    """The files of ``src.split`` in a directory, as ``datasets`` finds them: a README.md ``configs``
    header (``src.name`` picks one), split names in file or folder names (``data/train-*``,
    ``test.jsonl``), or else every file of the most common data format, in the split ``train``."""
    from datasets import load_dataset_builder

    try:
        with tempfile.TemporaryDirectory() as cache, _quiet():
            builder = load_dataset_builder(str(path), src.name, cache_dir=cache)
    except Exception as e:  # no data files, a config name missing or unknown, a bad README header
        raise DataError(f"{source_name(src)}: cannot read the directory as a dataset ({_why(e)})") from e
    splits = builder.config.data_files or {}
    if src.split not in splits:
        raise DataError(f"{source_name(src)}: no split {src.split!r}; splits: {', '.join(map(str, splits))}")
    return [Path(f) for f in splits[src.split]]


def _local_files(src: DataSourceConfig) -> list[Path]:
    """The files of a local source, in the order their rows are used."""
    name, path = source_name(src), src.path
    if src.data_files is not None:
        base = Path(path) if path is not None and Path(path).is_dir() else None
        if path is not None and base is None and path not in DATASET_BUILDERS:
            raise DataError(f"{name}: data_files needs path to be a directory, a builder (json, parquet, csv) or unset")
        return _glob_files(data_files_list(src.data_files), base, name)
    assert path is not None  # load_source: a path or data_files
    if Path(path).is_file():
        return [Path(path)]
    if Path(path).is_dir():
        return _directory_files(src, Path(path))
    if is_glob(path):
        return _glob_files([path], None, name)
    if path in DATASET_BUILDERS:
        raise DataError(f"{name}: {path!r} names a datasets builder; give its files in data_files")
    raise DataError(f"data source {path}: file or directory does not exist")


def _read(reader: str, path: Path, cache: Path) -> Any:
    """One local file as an in-memory ``datasets.Dataset``; CSV cells are read as text (a number
    stays as written: ``007``, ``2``), an empty cell is a missing value."""
    from datasets import Dataset, Features, Value

    kwargs: dict[str, Any] = {"cache_dir": str(cache), "keep_in_memory": True}
    if reader == "csv":
        import csv

        with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: without a byte order mark
            header = next(csv.reader(f), [])
        kwargs["features"] = Features({column: Value("string") for column in header})
    read = {"json": Dataset.from_json, "parquet": Dataset.from_parquet, "csv": Dataset.from_csv}[reader]
    return read(str(path), **kwargs)


def _is_json_array(path: Path) -> bool:
    """A ``[...]`` document (one row per element), not JSON Lines, as datasets tells them apart."""
    with path.open("rb") as f:
        return f.read(8).removeprefix(b"\xef\xbb\xbf").startswith(b"[")


def _line_locator(path: Path) -> Callable[[int], str]:
    """Row ``i`` of a JSON Lines file as "file, line N": datasets skips blank lines, N counts them."""

    def where(i: int) -> str:
        with path.open(encoding="utf-8") as f:
            lines = (n for n, line in enumerate(f, start=1) if line.strip())
            lineno = next(itertools.islice(lines, i, None), None)
        return f"{path}, line {lineno}" if lineno is not None else f"{path}, row {i + 1}"

    return where


def _json_lines(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The non-blank lines of a JSON Lines file, read one by one: (line number, line) of every JSON
    object, and (line number, problem) of every other line."""
    good, bad = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((lineno, f"malformed JSON ({e.msg} at column {e.colno})"))
                continue
            if isinstance(value, dict):
                good.append((lineno, line.rstrip("\r\n")))
            else:
                bad.append((lineno, f"expected a JSON object, got {type(value).__name__}"))
    return good, bad


def _read_json_lines(path: Path, tmp: Path, on_bad_row: str) -> tuple[_Part, int]:
    """A JSON Lines file and the number of malformed lines skipped. datasets refuses a file with a
    malformed line as a whole (and, as of datasets 5.2, one with a blank line and a column of mixed
    types), so then the file is read line by line: the first bad line is named (reject), or the good
    lines alone go to datasets in a copy (skip), each row still named by its line in the file."""
    try:
        ds = _read("json", path, tmp / "cache")
        return _dataset_part(ds, _line_locator(path)), 0
    except Exception as e:  # whatever datasets raised: the lines say whether the file is at fault
        failure = e
    good, bad = _json_lines(path)
    if bad and on_bad_row == "reject":
        lineno, problem = bad[0]
        raise DataError(f"{path}, line {lineno}: {problem}{_SKIP_HINT}") from None
    if not good:
        return _Part([], [], lambda i: f"{path}, row {i + 1}"), len(bad)
    copy = tmp / path.name
    copy.write_text("".join(line + "\n" for _, line in good), encoding="utf-8")
    try:
        ds = _read("json", copy, tmp / "cache")
    except Exception as e:
        raise DataError(f"{path}: datasets cannot read it ({_why(e)}; first: {_why(failure)})") from e
    linenos = [lineno for lineno, _ in good]
    return _dataset_part(ds, lambda i: f"{path}, line {linenos[i]}"), len(bad)


def _read_file(path: Path, tmp: Path, on_bad_row: str) -> tuple[_Part, int]:
    """One local file (``tmp``: an empty directory of its own); returns its rows and the number of
    malformed lines skipped."""
    reader = READERS[path.suffix.lower()]
    if reader == "json" and not _is_json_array(path):
        return _read_json_lines(path, tmp, on_bad_row)
    try:
        ds = _read(reader, path, tmp / "cache")
    except Exception as e:  # a file that is not what its suffix says, a JSON array with an error, ...
        raise DataError(f"{path}: datasets cannot read it ({_why(e)})") from e
    return _dataset_part(ds, lambda i: f"{path}, row {i + 1}"), 0


def _read_local(src: DataSourceConfig, on_bad_row: str) -> tuple[list[_Part], Counter]:
    """A local source, file by file (each in its own columns, so files may differ, and each row
    named by its file), through a cache directory of its own that is gone once the rows are in memory."""
    files = _local_files(src)
    for f in files:
        if f.suffix.lower() not in READERS:
            raise DataError(
                f"{f}: unsupported file type {f.suffix!r}; use .jsonl, .json, .parquet or .csv files, "
                "a directory of them or a datasets directory"
            )
    parts: list[_Part] = []
    skipped: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        for i, f in enumerate(files):
            (Path(tmp) / str(i)).mkdir()
            part, malformed = _read_file(f, Path(tmp) / str(i), on_bad_row)
            parts.append(part)
            skipped["malformed_json"] += malformed
    return parts, +skipped


def _read_source(src: DataSourceConfig, seed: int, on_bad_row: str) -> tuple[list[_Part], Counter]:
    """The parts of a source and what was skipped before its rows were checked (malformed lines)."""
    if src.generator is not None:
        return [_generated_part(src, seed)], Counter()
    if src.path is not None and is_hub_dataset_name(src.path):
        return [_hub_part(src)], Counter()
    if src.path is not None and src.data_files is None and _is_saved_dataset(Path(src.path)):
        return [_saved_part(Path(src.path), src.split)], Counter()
    return _read_local(src, on_bad_row)


def _check_mapping(src: DataSourceConfig, parts: list[_Part]) -> None:
    """A mapped key set to a column other than its standard name must be a column of the data."""
    columns = list(dict.fromkeys(c for part in parts for c in part.columns))
    for std, key in MAPPED_KEYS:
        column = getattr(src, key)
        if column != std and column not in columns:
            raise DataError(
                f"{source_name(src)}: {key} {column!r} is not a column of the data; columns: "
                f"{', '.join(columns) or 'none'}"
            )


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


def _prompt_field(rec: dict[str, Any], src: DataSourceConfig) -> tuple[str, Any]:
    """(field name, value) of the record's prompt: its messages for a chat-form source, else its text."""
    key = src.messages_key or src.prompt_key
    if rec.get(key) is None:  # a row without the field holds None in the dataset's column
        hint = ""
        if src.messages_key is None and isinstance(rec.get("messages"), list):
            hint = "; for chat messages set the source's messages_key: messages"
        fields = ", ".join(str(k) for k, v in rec.items() if v is not None) or "none"
        raise _BadRow("missing_prompt", f"no {key!r} field (fields: {fields}){hint}")
    return key, rec[key]


def _meta(rec: dict[str, Any], src: DataSourceConfig, prompt_key: str) -> dict[str, Any]:
    """Every column but the prompt and ``domain``, without missing values; a mapped column (say
    ``tests_key: test_list``) under its standard name (``tests``), in place of the data's own."""
    mapped = {std: getattr(src, key) for std, key in MAPPED_KEYS if getattr(src, key) != std}
    left_out = {prompt_key, "domain", *mapped, *mapped.values()}
    meta = {k: v for k, v in rec.items() if v is not None and k not in left_out}
    meta.update({std: rec[column] for std, column in mapped.items() if rec.get(column) is not None})
    return meta


def _check_text(value: Any, key: str) -> str:
    """A text prompt: a string that is not blank."""
    if not isinstance(value, str):
        raise _BadRow("prompt_not_string", f"{key!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise _BadRow("empty_prompt", f"empty prompt in {key!r}")
    return value


def _check_record(rec: dict[str, Any], src: DataSourceConfig, tokenizer: Any, known: set[str]) -> PromptRow:
    """The record as a ``PromptRow`` (without source and index), or ``_BadRow`` saying why the
    record cannot be used; its length is checked by ``_rows``, all rows' in one batch."""
    key, value = _prompt_field(rec, src)
    messages = None
    if src.messages_key is not None:
        messages = _check_messages(value, key)
    elif src.prompt_as_user:
        messages = [{"role": "user", "content": _check_text(value, key)}]
    prompt = _check_text(value, key) if messages is None else _render(tokenizer, messages)
    if not prompt.strip():
        raise _BadRow("empty_prompt", f"empty prompt in {key!r}")
    domain = rec.get("domain")
    if domain is not None and (not isinstance(domain, str) or domain not in known):
        raise _BadRow("unknown_domain", f"unknown domain {domain!r}; known: {', '.join(sorted(known))}")
    if domain is not None and domain != src.domain:
        raise _BadRow("domain_mismatch", f"row domain {domain!r} differs from the source's domain {src.domain!r}")
    meta = _meta(rec, src, key)
    return PromptRow(prompt=prompt, domain=src.domain, meta=meta, messages=messages, verifier=src.verifier)


def _too_long(n_tokens: int, max_prompt_len: int) -> _BadRow | None:
    if n_tokens <= max_prompt_len:
        return None
    return _BadRow("prompt_too_long", f"prompt has {n_tokens} tokens; data.max_prompt_len is {max_prompt_len}")


def _rows(
    parts: list[_Part],
    src: DataSourceConfig,
    tokenizer: Any,
    max_prompt_len: int,
    on_bad_row: str,
    known: set[str],
) -> tuple[list[PromptRow], Counter]:
    """The checked rows of every part, and the number of bad rows skipped by kind."""
    skipped: Counter = Counter()
    checked: list[tuple[_Part, int, PromptRow]] = []  # rows that passed all but the length check

    def lengths_checked() -> list[PromptRow]:
        """``checked`` without its prompts over the limit (tokenised in one batch: ``prompts_ids``);
        with ``reject`` the first of them raises."""
        kept, rows = [], [row for _, _, row in checked]
        # In chunks: a large source's ids are never all held at once, only their lengths.
        lengths = [len(ids) for k in range(0, len(rows), 4096) for ids in prompts_ids(tokenizer, rows[k : k + 4096])]
        for (part, i, row), n in zip(checked, lengths, strict=True):
            bad = _too_long(n, max_prompt_len)
            if bad is None:
                kept.append(row)
            elif on_bad_row == "reject":
                raise DataError(f"{part.where(i)}: {bad.message}{_SKIP_HINT}") from None
            else:
                skipped[bad.kind] += 1
        return kept

    for part in parts:
        for i, rec in enumerate(part.rows):
            try:
                checked.append((part, i, _check_record(rec, src, tokenizer, known)))
            except _BadRow as bad:
                if on_bad_row == "reject":
                    lengths_checked()  # an earlier row over the limit is named first, as it comes first
                    raise DataError(f"{part.where(i)}: {bad.message}{_SKIP_HINT}") from None
                skipped[bad.kind] += 1
    name = source_name(src)
    return [replace(row, source=name, index=j) for j, row in enumerate(lengths_checked())], skipped


def _chat_form_needs_template(src: DataSourceConfig, tokenizer: Any) -> None:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if (src.messages_key is not None or src.prompt_as_user) and not has_template:
        what = (
            f"chat messages ({src.messages_key!r})"
            if src.messages_key is not None
            else f"user turns (prompt_as_user, the text of {src.prompt_key!r})"
        )
        raise DataError(
            f"{source_name(src)}: rows are {what} but the student tokenizer has no chat template; set "
            "data.chat_template to a Jinja template file, or give text prompts (prompt_key)"
        )
    if src.messages_key is None and not src.prompt_as_user and src.generator is None and has_template:
        log.warning(
            "%s: text prompts are used as they are, though the student tokenizer has a chat template; "
            "give chat messages (the source's messages_key) or set prompt_as_user: true to have them "
            "rendered with it",
            source_name(src),
        )


def load_source(
    src: DataSourceConfig, seed: int, max_prompt_len: int, on_bad_row: str, known_domains: set[str], tokenizer: Any
) -> tuple[list[PromptRow], dict[str, int]]:
    """Load and check one source; returns its rows and stats (``data/skipped/<kind>``, ``data/loaded``).

    ``tokenizer`` is the student's (``mopd.chat.student_tokenizer``): chat-form rows are rendered
    with its template and every prompt's length is counted in its tokens (``mopd.chat.prompt_ids``).

    Rows keep every column other than the prompt and ``domain`` in ``row.meta`` (the columns of
    ``answer_key``, ``tests_key`` and ``calls_key`` as ``answer``, ``tests``, ``calls``); generated
    rows carry the generator's meta (e.g. ``answer``); every row carries the source's ``verifier``.
    ``split`` picks the split of a Hub dataset, a dataset directory, a saved DatasetDict or a
    generator (``train`` / ``eval``), ``num_prompts`` a generator's size; files named by ``path``
    or ``data_files`` are used whole.
    """
    if on_bad_row not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_row is {on_bad_row!r}; valid: {', '.join(ON_BAD_ROWS)}")
    name = source_name(src)
    if src.domain not in known_domains:
        raise DataError(f"{name}: source domain {src.domain!r} is not known; known: {', '.join(sorted(known_domains))}")
    if (src.path is None and src.data_files is None) == (src.generator is None):
        raise DataError(f"source of domain {src.domain!r}: set exactly one of 'path' (or 'data_files') and 'generator'")
    if src.prompt_as_user and src.messages_key is not None:
        raise DataError(f"{name}: prompt_as_user and messages_key both make the prompt chat messages; set one")
    _chat_form_needs_template(src, tokenizer)
    parts, skipped = _read_source(src, seed, on_bad_row)
    _check_mapping(src, parts)
    rows, bad = _rows(parts, src, tokenizer, max_prompt_len, on_bad_row, known_domains)
    skipped.update(bad)
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
