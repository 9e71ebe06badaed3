"""Loading prompt sources (files, datasets directories, generators) and mixing them by weight."""

from __future__ import annotations

import json
from collections import Counter

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
    (tmp_path / "x.csv").write_text("prompt\n1+1=\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        _load(tmp_path / "x.csv")
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
