"""Loading prompt sources (Hub datasets, local files, datasets directories, generators) and mixing
them by weight."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mopd.config import DataConfig, DataSourceConfig
from mopd.data import DataError, PromptMixer, load_source, load_sources
from mopd.models import build_char_tokenizer
from mopd.types import PromptRow

TOK = build_char_tokenizer()  # one token per character, plus BOS

KNOWN = {"math", "code", "agent"}
GOOD = [{"prompt": "1+2=", "answer": "3", "level": 1}, {"prompt": "rev('ab')=", "domain": "code", "answer": "ba"}]


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _load(path, domain="math", on_bad_row="reject", max_prompt_len=40, kw_tokenizer=None, **kw):
    src = DataSourceConfig(domain=domain, path=str(path), **kw)
    return load_source(src, 0, max_prompt_len, on_bad_row, KNOWN, tokenizer=kw_tokenizer or TOK)


def test_jsonl_rows_keep_other_fields_as_meta(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD[0], "", {"q": "2+2=", "answer": "4"}])
    rows, stats = _load(path, prompt_key="q", on_bad_row="skip")
    assert [r.prompt for r in rows] == ["2+2="] and rows[0].meta == {"answer": "4"}
    assert rows[0].domain == "math" and rows[0].source == str(path) and rows[0].index == 0
    assert stats == {"data/skipped/missing_prompt": 1, "data/loaded": 1}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+2=", "answer": "3"}, {"prompt": "", "answer": "0"}]), path)
    rows, stats = _load(path, on_bad_row="skip")
    assert [(r.prompt, r.meta) for r in rows] == [("1+2=", {"answer": "3"})]
    assert stats["data/skipped/empty_prompt"] == 1
    with pytest.raises(DataError, match=r"a\.parquet, row 2: empty prompt"):
        _load(path)


def test_datasets_directory_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list([{"prompt": "1+2=", "answer": "3"}]).save_to_disk(str(tmp_path / "ds"))
    rows, _ = _load(tmp_path / "ds")
    assert [(r.prompt, r.meta) for r in rows] == [("1+2=", {"answer": "3"})]
    dd = DatasetDict(
        train=Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]),
        eval=Dataset.from_list([{"prompt": "5+5=", "answer": "10"}, {"prompt": "x" * 99, "answer": "?"}]),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.prompt for r in _load(tmp_path / "dd", split="train")[0]] == ["1+1="]
    with pytest.raises(DataError, match=r"dd/eval, row 2: prompt has 100 tokens"):
        _load(tmp_path / "dd", split="eval")
    with pytest.raises(DataError, match="no split 'test'.*splits: train, eval"):
        _load(tmp_path / "dd", split="test")


def test_directory_of_jsonl_files_in_name_order(tmp_path):
    _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2+2="}])
    _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1="}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.prompt for r in _load(tmp_path)[0]] == ["1+1=", "2+2="]


BAD_ROWS = {
    "malformed_json": ('{"prompt": "1+1=",', r"line 2: malformed JSON"),
    "missing_prompt": ({"text": "1+1="}, r"line 2: no 'prompt' field \(fields: text\)"),
    "prompt_not_string": ({"prompt": 12}, r"line 2: 'prompt' is a int, not a string"),
    "empty_prompt": ({"prompt": "   "}, r"line 2: empty prompt"),
    # 40 characters and BOS: the limit counts the tokens the student sees.
    "prompt_too_long": ({"prompt": "1" * 40}, r"line 2: prompt has 41 tokens; data.max_prompt_len is 40"),
    "unknown_domain": ({"prompt": "x", "domain": "law"}, r"line 2: unknown domain 'law'; known: agent, code, math"),
    "domain_mismatch": ({"prompt": "x", "domain": "agent"}, r"line 2: row domain 'agent' differs from .* 'math'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_rejected_with_file_and_line(tmp_path, kind):
    bad, message = BAD_ROWS[kind]
    path = _write_jsonl(tmp_path / "src.jsonl", [GOOD[0], bad, GOOD[0]])
    with pytest.raises(DataError, match=r"src\.jsonl, " + message):
        _load(path)


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_skipped_and_counted(tmp_path, kind):
    bad, _ = BAD_ROWS[kind]
    path = _write_jsonl(tmp_path / "src.jsonl", [GOOD[0], bad, bad, GOOD[0]])
    rows, stats = _load(path, on_bad_row="skip")
    assert len(rows) == 2 and [r.index for r in rows] == [0, 1]
    assert stats == {f"data/skipped/{kind}": 2, "data/loaded": 2}


def test_the_first_bad_row_is_named_when_a_long_prompt_comes_before_another_bad_row(tmp_path):
    """Lengths are counted in one batch after the other checks: still the first bad row in the
    file is the one named."""
    long, empty = {"prompt": "1" * 40}, {"prompt": "   "}
    with pytest.raises(DataError, match=r"line 2: prompt has 41 tokens"):
        _load(_write_jsonl(tmp_path / "a.jsonl", [GOOD[0], long, empty]))
    with pytest.raises(DataError, match=r"line 2: empty prompt"):
        _load(_write_jsonl(tmp_path / "b.jsonl", [GOOD[0], empty, long]))
    rows, stats = _load(_write_jsonl(tmp_path / "c.jsonl", [long, GOOD[0], empty, GOOD[0]]), on_bad_row="skip")
    assert [r.index for r in rows] == [0, 1] and stats["data/skipped/prompt_too_long"] == 1


def test_line_numbers_count_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "src.jsonl", [GOOD[0], "", "", {"prompt": ""}])
    with pytest.raises(DataError, match=r"src\.jsonl, line 4: empty prompt"):
        _load(path)


def test_source_level_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _load(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no usable prompts"):
        _load(_write_jsonl(tmp_path / "e.jsonl", [{"prompt": ""}]), on_bad_row="skip")
    with pytest.raises(DataError, match="source domain 'law' is not known"):
        _load(_write_jsonl(tmp_path / "g.jsonl", [GOOD[0]]), domain="law")
    (tmp_path / "x.txt").write_text("1+1=\n")  # (.csv, refused here before, is read now)
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        _load(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="valid: reject, skip"):
        _load(tmp_path / "g.jsonl", on_bad_row="ignore")


def test_generator_source_is_seeded_per_domain_and_split():
    def gen(domain, generator, split="train", seed=0, n=50):
        src = DataSourceConfig(domain=domain, generator=generator, num_prompts=n, split=split)
        return load_source(src, seed=seed, max_prompt_len=40, on_bad_row="reject", known_domains=KNOWN, tokenizer=TOK)

    rows, stats = gen("math", "math")
    assert len(rows) == 50 and stats == {"data/loaded": 50}
    assert all(r.domain == "math" and r.source == "generator:math" and "answer" in r.meta for r in rows)
    assert [r.prompt for r in rows] == [r.prompt for r in gen("math", "math")[0]]
    assert [r.prompt for r in rows] != [r.prompt for r in gen("math", "math", seed=1)[0]]
    assert not {r.prompt for r in rows} & {r.prompt for r in gen("math", "math", split="eval")[0]}
    # A generator may feed a source of another (known) domain: rows take the source's domain.
    assert {r.domain for r in gen("code", "math_l1")[0]} == {"code"}


def _sources(sizes_weights):
    out = []
    for i, (n, w) in enumerate(sizes_weights):
        src = DataSourceConfig(domain=f"d{i}", path=f"s{i}.jsonl", weight=w)
        rows = [PromptRow(prompt=f"{i}:{j}", domain=f"d{i}") for j in range(n)]
        out.append((src, rows))
    return out


def test_mixer_follows_weights():
    mixer = PromptMixer(_sources([(7, 3.0), (50, 1.0), (5, 1.0)]), seed=0)
    counts = Counter(r.domain for r in mixer.next_batch(5000))
    assert abs(counts["d0"] / 5000 - 0.6) < 0.04
    assert abs(counts["d1"] / 5000 - 0.2) < 0.04 and abs(counts["d2"] / 5000 - 0.2) < 0.04


def test_mixer_walks_each_source_by_epochs():
    mixer = PromptMixer(_sources([(10, 1.0)]), seed=3)
    first, second = mixer.next_batch(10), mixer.next_batch(10)
    assert sorted(r.prompt for r in first) == sorted(r.prompt for r in second) == sorted(f"0:{j}" for j in range(10))
    assert [r.prompt for r in first] != [r.prompt for r in second]  # reshuffled each epoch


def test_mixer_is_deterministic_and_seeded():
    def draw(seed):
        return [r.prompt for r in PromptMixer(_sources([(9, 1.0), (4, 2.0)]), seed).next_batch(60)]

    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_mixer_state_round_trip_resumes_exactly():
    sources = _sources([(9, 1.0), (4, 2.0), (13, 0.5)])
    whole = PromptMixer(sources, seed=5)
    expected = [r.prompt for r in whole.next_batch(37)] + [r.prompt for r in whole.next_batch(80)]

    first = PromptMixer(sources, seed=5)
    got = [r.prompt for r in first.next_batch(37)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = PromptMixer(sources, seed=5)
    resumed.load_state_dict(state)
    assert got + [r.prompt for r in resumed.next_batch(80)] == expected


def test_mixer_refuses_state_of_other_sources_or_seed():
    state = PromptMixer(_sources([(9, 1.0)]), seed=5).state_dict()
    with pytest.raises(ValueError, match="mixer state is for sources"):
        PromptMixer(_sources([(8, 1.0)]), seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 5"):
        PromptMixer(_sources([(9, 1.0)]), seed=6).load_state_dict(state)


def test_load_sources_sums_stats(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD[0], {"prompt": ""}])
    cfg = DataConfig(
        sources=[
            DataSourceConfig(domain="math", path=str(path)),
            DataSourceConfig(domain="code", generator="code", num_prompts=5),
        ],
        max_prompt_len=40,
        on_bad_row="skip",
    )
    sources, stats = load_sources(cfg, seed=0, known_domains=KNOWN, tokenizer=TOK)
    assert [len(rows) for _, rows in sources] == [1, 5]
    assert stats == {"data/skipped/empty_prompt": 1, "data/loaded": 6}


def test_bad_rows_are_rejected_by_default(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD[0], {"prompt": ""}])
    cfg = DataConfig(sources=[DataSourceConfig(domain="math", path=str(path))])
    with pytest.raises(DataError, match=r"a\.jsonl, line 2: empty prompt.*data\.on_bad_row=skip"):
        load_sources(cfg, seed=0, known_domains=KNOWN, tokenizer=TOK)


# --------------------------------------------------------------------------- sources read by datasets


def _source(on_bad_row="reject", domain="math", **fields):
    """``load_source`` of a source given by its fields (path, data_files, name, split, ...)."""
    return load_source(DataSourceConfig(domain=domain, **fields), 0, 40, on_bad_row, KNOWN, tokenizer=TOK)


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_file(path, rows):
    """``rows`` as the suffix says: JSON Lines, a JSON array, Parquet, or CSV (a header, then text cells)."""
    if path.suffix == ".parquet":
        return _write_parquet(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        columns = list(rows[0])
        lines = [columns, *([row[c] for c in columns] for row in rows)]
        path.write_text("".join(",".join(cells) + "\n" for cells in lines))
    else:
        _write_jsonl(path, rows)
    return path


@pytest.mark.parametrize(
    "suffix,where", [(".jsonl", "line 2"), (".json", "row 2"), (".parquet", "row 2"), (".csv", "row 2")]
)
def test_each_file_format_and_its_bad_row(tmp_path, suffix, where):
    path = _write_file(tmp_path / f"a{suffix}", [{"prompt": "1+2=", "answer": "3"}, {"prompt": "  ", "answer": "0"}])
    rows, stats = _load(path, on_bad_row="skip")
    # CSV cells are text: the answer stays "3" there too.
    assert [(r.prompt, r.meta, r.source) for r in rows] == [("1+2=", {"answer": "3"}, str(path))]
    assert stats == {"data/skipped/empty_prompt": 1, "data/loaded": 1}
    with pytest.raises(DataError, match=rf"a\{suffix}, {where}: empty prompt"):
        _load(path)


def test_glob_and_data_files_read_each_file_in_order(tmp_path):
    """A glob as path, data_files alone, with a builder name or relative to a directory: the files
    in name order, each with its own columns, a bad row named by its own file and line."""
    d = tmp_path / "d"
    d.mkdir()
    _write_jsonl(d / "b.jsonl", ["", {"q": "2+2="}])
    _write_jsonl(d / "a.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    _write_parquet(d / "c.parquet", [{"prompt": "3+3="}])
    pattern = str(d / "*.jsonl")
    for fields in ({"path": pattern}, {"data_files": pattern}, {"path": "json", "data_files": [pattern]}):
        rows, stats = _source("skip", **fields)
        assert [(r.prompt, r.meta) for r in rows] == [("1+1=", {"answer": "2"})], fields
        assert stats == {"data/skipped/missing_prompt": 1, "data/loaded": 1}
    rows, _ = _source(path=str(d), data_files=["c.parquet", "a.jsonl"])
    assert [r.prompt for r in rows] == ["3+3=", "1+1="] and rows[0].source == f"{d}[c.parquet,a.jsonl]"
    with pytest.raises(DataError, match=r"d/b\.jsonl, line 2: no 'prompt' field \(fields: q\)"):
        _source(path=pattern)
    with pytest.raises(DataError, match=r"no file matches 'x\*\.csv' in .*d$"):
        _source(path=str(d), data_files="x*.csv")
    with pytest.raises(DataError, match="data_files needs path to be a directory"):
        _source(path=str(d / "a.jsonl"), data_files="b.jsonl")


def test_malformed_lines_among_blank_ones(tmp_path):
    """datasets refuses a whole JSON Lines file for one malformed line: the line is still named,
    or skipped with the rest of the file read."""
    path = _write_jsonl(tmp_path / "src.jsonl", [GOOD[0], "", '{"prompt": ', "[1, 2]", "", {"prompt": "2+2="}])
    with pytest.raises(DataError, match=r"src\.jsonl, line 3: malformed JSON \(Expecting value"):
        _load(path)
    rows, stats = _load(path, on_bad_row="skip")
    assert [r.prompt for r in rows] == ["1+2=", "2+2="]
    assert stats == {"data/skipped/malformed_json": 2, "data/loaded": 2}


def test_a_blank_line_and_a_column_of_mixed_types(tmp_path):
    """datasets 5.2 refuses a valid JSON Lines file with a blank line and a column whose type varies
    from row to row ("ValueError: Expected object or value"): read again without the blank lines."""
    rows = [{"prompt": "a", "tests": ["x"]}, "", {"prompt": "b", "tests": "y"}, {"prompt": ""}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    assert [r.meta for r in _load(path, on_bad_row="skip")[0]] == [{"tests": ["x"]}, {"tests": "y"}]
    with pytest.raises(DataError, match=r"m\.jsonl, line 4: empty prompt"):
        _load(path)


def _hub_layout(root, configs=("main", "socratic")):
    """A dataset directory laid out as on the Hub (as openai/gsm8k is): Parquet shards per
    configuration and split, and a README.md whose ``configs:`` header names them."""
    header = ["---", "configs:"]
    for config in configs:
        header += [f"- config_name: {config}", "  data_files:"]
        train = [{"question": f"{config}: 1+1=", "answer": "2"}]
        test = [{"question": f"{config}: 2+2=", "answer": "4"}, {"question": "", "answer": "0"}]
        for split, rows in (("train", train), ("test", test)):
            _write_parquet(root / config / f"{split}-00000-of-00001.parquet", rows)
            header += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*header, "---", "# A dataset card"]) + "\n")
    return root


def test_directory_in_the_hub_layout_by_name_and_split(tmp_path):
    root = _hub_layout(tmp_path / "gsm8k")
    rows, _ = _source("skip", path=str(root), name="socratic", split="test", prompt_key="question")
    assert [(r.prompt, r.meta, r.source) for r in rows] == [("socratic: 2+2=", {"answer": "4"}, f"{root}:socratic")]
    with pytest.raises(DataError, match=r"gsm8k/main/test-00000-of-00001\.parquet, row 2: empty prompt"):
        _source(path=str(root), name="main", split="test", prompt_key="question")
    with pytest.raises(DataError, match=r"no split 'validation'; splits: train, test"):
        _source(path=str(root), name="main", split="validation", prompt_key="question")
    with pytest.raises(DataError, match=r"cannot read the directory as a dataset .*\['main', 'socratic'\]"):
        _source(path=str(root), prompt_key="question")  # no name, two configurations
    # Without a README: the splits by file name (data/<split>-00000-of-00001.parquet).
    _write_parquet(tmp_path / "plain" / "data" / "train-00000-of-00001.parquet", [{"prompt": "1+1="}])
    _write_parquet(tmp_path / "plain" / "data" / "test-00000-of-00001.parquet", [{"prompt": "2+2="}])
    assert [r.prompt for r in _source(path=str(tmp_path / "plain"), split="test")[0]] == ["2+2="]


def test_hub_dataset_from_the_offline_cache(tmp_path, monkeypatch):
    """A Hub name with HF_DATASETS_OFFLINE=1 loads from the datasets cache. Tests have no network, so
    the cache is filled from a local copy, laid out as a download of openai/gsm8k leaves it
    (<cache>/openai___gsm8k/main/<version>/<hash>/)."""
    import datasets
    from datasets import load_dataset_builder

    cache = tmp_path / "cache"
    load_dataset_builder(str(_hub_layout(tmp_path / "gsm8k")), "main", cache_dir=str(cache)).download_and_prepare()
    (cache / "gsm8k").rename(cache / "openai___gsm8k")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what the variable sets when datasets loads
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    rows, _ = _source("skip", path="openai/gsm8k", name="main", split="test", prompt_key="question")
    assert [(r.prompt, r.meta, r.source) for r in rows] == [("main: 2+2=", {"answer": "4"}, "openai/gsm8k:main")]
    with pytest.raises(DataError, match=r"openai/gsm8k:main, split test, row 2: empty prompt"):
        _source(path="openai/gsm8k", name="main", split="test", prompt_key="question")
    with pytest.raises(DataError, match=r"nobody/nothing: .*cannot load it as a Hub dataset .*HF_DATASETS_OFFLINE"):
        _source(path="nobody/nothing")


def test_field_mapping_takes_the_datasets_own_columns(tmp_path):
    mbpp = [
        {"text": "Write f.", "test_list": ["assert f(1) == 1"], "code": "def f(x): return x", "tests": "not these"},
        {"text": "Write g."},
    ]
    rows, _ = _load(
        _write_jsonl(tmp_path / "mbpp.jsonl", mbpp), domain="code", prompt_key="text", tests_key="test_list"
    )
    # The mapped column under its standard name, the data's own "tests" unused; a row without it has none.
    assert [r.meta for r in rows] == [{"tests": ["assert f(1) == 1"], "code": "def f(x): return x"}, {}]
    calls = [[{"name": "f", "arguments": {"a": 1}}], [{"name": "g", "arguments": {"b": "x", "c": [1, 2]}}]]
    tools = _write_jsonl(
        tmp_path / "tools.jsonl",
        [{"prompt": "Call f.", "expected": calls[0], "solution": "1"}, {"prompt": "Call g.", "expected": calls[1]}],
    )
    rows, _ = _load(tools, domain="agent", calls_key="expected", answer_key="solution")
    # Each row's calls as written (objects of different keys are not merged into one shape).
    assert [r.meta for r in rows] == [{"calls": calls[0], "answer": "1"}, {"calls": calls[1]}]
    with pytest.raises(
        DataError, match="tests_key 'test' is not a column of the data; columns: prompt, expected, solution"
    ):
        _load(tools, domain="agent", tests_key="test")
    # The standard names need no setting; a missing value is left out.
    rows, _ = _load(_write_jsonl(tmp_path / "m.jsonl", [GOOD[0], {"prompt": "2+2=", "tests": ["t"]}]))
    assert [r.meta for r in rows] == [{"answer": "3", "level": 1}, {"tests": ["t"]}]


def test_the_sources_verifier_is_on_every_row(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD[0], {"prompt": "2+2="}])
    assert [r.verifier for r in _load(path, verifier="math_answer")[0]] == ["math_answer"] * 2
    assert [r.verifier for r in _load(path)[0]] == [None] * 2
    rows, _ = _source(generator="math", num_prompts=3, verifier="my_checks.math:exact_int")
    assert [r.verifier for r in rows] == ["my_checks.math:exact_int"] * 3


def _recipe_errors(*sources):
    """validate's message for recipes/tiny.yaml with these data sources; '' when it is valid."""
    from mopd.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    try:
        load_config(tiny, [f"data.sources=[{', '.join(sources)}]"])
    except ConfigError as e:
        return str(e)
    return ""


def test_validate_names_a_source_verifier_that_is_no_name():
    code = "{domain: code, generator: code, verifier: 'mopd.verifiers.code_tests:code_tests'}"
    assert _recipe_errors("{domain: math, generator: math, verifier: math_answer}", code) == ""
    # A well-formed name that names nothing: refused before any actor starts, saying what is missing.
    message = _recipe_errors(
        "{domain: math, generator: math, verifier: math_answr}",
        "{domain: code, generator: code, verifier: 'my_checks.code:run_tests'}",
    )
    assert "data.sources[0].verifier: unknown verifier 'math_answr'; built-in: math_answer, code_tests" in message
    assert "data.sources[1].verifier: verifier 'my_checks.code:run_tests': cannot import module 'my_checks.code'" in (
        message
    )
    for bad in ("", "math answer", "3x", "pkg.mod:", "a..b:f", "a:b:c"):
        message = _recipe_errors(f"{{domain: math, generator: math, verifier: '{bad}'}}", code)
        assert f"data.sources[0].verifier is {bad!r}: neither a verifier name (e.g. math_answer) nor" in message


def test_validate_where_a_source_reads_from(tmp_path):
    """A Hub name is left to the data preflight; local paths, globs and data_files must match files."""
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1="}\n')
    code = "{domain: code, generator: code}"
    assert _recipe_errors("{domain: math, path: openai/gsm8k, name: main, revision: v1}", code) == ""
    assert _recipe_errors(f"{{domain: math, data_files: '{tmp_path}/*.jsonl'}}", code) == ""
    message = _recipe_errors(
        f"{{domain: math, path: '{tmp_path}/*.parquet', revision: v1}}",
        f"{{domain: code, path: {tmp_path}/a.jsonl, data_files: b.jsonl}}",
    )
    assert f"data.sources[0].path: no file matches {tmp_path}/*.parquet" in message
    assert "data.sources[0].revision: applies to a dataset on the Hugging Face Hub" in message
    assert f"data.sources[1].data_files: path {tmp_path}/a.jsonl names files itself" in message


def test_eval_split_holds_out_another_split_of_the_same_dataset(tmp_path):
    """``eval_split: test`` (GSM8K's held-out split): the eval rows come from that split of the
    source's own dataset, checked as training rows are."""
    from dataclasses import replace

    from mopd.app.run import held_out_rows
    from mopd.config import load_config

    root = _hub_layout(tmp_path / "gsm8k", configs=("main",))
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    src = DataSourceConfig(domain="math", path=str(root), name="main", prompt_key="question", eval_split="test")
    cfg = load_config(tiny)
    cfg = replace(cfg, data=replace(cfg.data, on_bad_row="skip"))
    assert [r.prompt for r in held_out_rows(cfg, src, 8, TOK)] == ["main: 2+2="]  # the empty prompt skipped
    assert [r.prompt for r in _source(**{k: v for k, v in vars(src).items() if k != "eval_split"})[0]] == ["main: 1+1="]
    code = "{domain: code, generator: code}"
    assert _recipe_errors(f"{{domain: math, path: {root}, name: main, eval_split: test}}", code) == ""
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1="}\n')
    message = _recipe_errors(
        f"{{domain: math, path: {tmp_path}/a.jsonl, eval_split: test}}",
        "{domain: code, generator: code, eval_split: x}",
    )
    assert (
        f"data.sources[0].eval_split: picks a split of a Hub dataset or a dataset directory, not of {tmp_path}"
        in message
    )
    assert (
        "data.sources[1].eval_split: another split of this source's dataset; not with eval_path or a generator"
        in message
    )


# --------------------------------------------------------------------------- prompt_as_user


def _chat_char_tokenizer():
    """The builtin character tokenizer with a chat template (role, colon, content per turn)."""
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tok


def test_prompt_as_user_renders_the_text_as_one_user_turn(tmp_path):
    """GSM8K's ``question`` as a chat student sees it: the same prompt, ids and messages as a
    ``messages_key`` row holding that one user turn; the other columns stay meta."""
    from mopd.chat import prompt_ids

    tok = _chat_char_tokenizer()
    text = _write_jsonl(tmp_path / "q.jsonl", [{"question": "1+2=", "answer": "... #### 3"}])
    turn = [{"role": "user", "content": "1+2="}]
    chat = _write_jsonl(tmp_path / "m.jsonl", [{"messages": turn, "answer": "... #### 3"}])
    (row,), stats = _load(text, max_prompt_len=64, kw_tokenizer=tok, prompt_key="question", prompt_as_user=True)
    (want,), _ = _load(chat, max_prompt_len=64, kw_tokenizer=tok, messages_key="messages")
    assert row.prompt == want.prompt == "user: 1+2=\nassistant: "
    assert row.messages == turn and row.meta == {"answer": "... #### 3"} == want.meta
    assert prompt_ids(tok, row) == prompt_ids(tok, want) and stats == {"data/loaded": 1}
    # Off (the default), the same text is used as it is.
    (plain,), _ = _load(text, max_prompt_len=64, kw_tokenizer=tok, prompt_key="question")
    assert plain.prompt == "1+2=" and plain.messages is None


def test_prompt_as_user_bad_rows_and_what_it_needs(tmp_path):
    tok = _chat_char_tokenizer()
    lines = [{"question": "1+2="}, {"question": 7}, {"question": "  "}, {"text": "2+2="}, {"question": "9" * 40}]
    path = _write_jsonl(tmp_path / "q.jsonl", lines)
    kw = dict(max_prompt_len=30, kw_tokenizer=tok, prompt_key="question", prompt_as_user=True)
    rows, stats = _load(path, on_bad_row="skip", **kw)
    assert [r.messages for r in rows] == [[{"role": "user", "content": "1+2="}]]
    kinds = ("prompt_not_string", "empty_prompt", "missing_prompt", "prompt_too_long")
    assert stats == {**{f"data/skipped/{k}": 1 for k in sorted(kinds)}, "data/loaded": 1}
    messages = [
        (2, "'question' is a int, not a string"),
        (3, "empty prompt in 'question'"),
        (4, "no 'question' field"),
        (5, "prompt has 58 tokens; data.max_prompt_len is 30"),  # 40 characters and 18 of the template
    ]
    for lineno, message in messages:
        only = _write_jsonl(tmp_path / f"only{lineno}.jsonl", [lines[lineno - 1]])
        with pytest.raises(DataError, match=rf"only{lineno}\.jsonl, line 1: {message}"):
            _load(only, **kw)
    tok.chat_template = "{{ raise_exception('no user turns here') }}"
    with pytest.raises(DataError, match="line 1: the chat template cannot render these messages .*no user turns"):
        _load(path, **kw)
    with pytest.raises(DataError, match=r"rows are user turns \(prompt_as_user, the text of 'question'\) but the"):
        _load(path, **{**kw, "kw_tokenizer": TOK})  # no chat template
    with pytest.raises(DataError, match="prompt_as_user and messages_key both make the prompt chat messages"):
        _load(path, **kw, messages_key="messages")


def test_validate_refuses_prompt_as_user_with_messages_or_a_generator(tmp_path):
    from mopd.config import ConfigError, load_config

    (tmp_path / "q.jsonl").write_text('{"question": "1+1="}\n')
    code = "{domain: code, generator: code}"
    ok = f"{{domain: math, path: {tmp_path}/q.jsonl, prompt_key: question, prompt_as_user: true}}"
    assert _recipe_errors(ok, code) == ""
    message = _recipe_errors(
        f"{{domain: math, path: {tmp_path}/q.jsonl, messages_key: messages, prompt_as_user: true}}",
        "{domain: code, generator: code, prompt_as_user: true}",
    )
    assert (
        "data.sources[0].prompt_as_user: makes the text of prompt_key ('prompt') a user turn, but the source "
        "is already in chat form (messages_key='messages'); set one of the two" in message
    )
    assert "data.sources[1].prompt_as_user needs a file source; generator 'code' gives its prompts as they are" in (
        message
    )
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"data.sources\[0\].prompt_as_user renders the prompt as a user turn, but"):
        load_config(tiny, [f"data.sources=[{ok}, {code}]", "data.chat_template=none"])
