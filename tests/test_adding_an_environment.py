"""docs/adding_an_environment.md, followed literally: its environment module is written from the
document's Python block and used as a ``run.plugins`` file; its recipe lines validate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_an_environment.md"
# The document's teacher is a checkpoint path; the test's is a tiny model built from config.
TINY_TEACHER = (
    "{tokenizer: 'builtin:char', config: {model_type: llama, vocab_size: 128, hidden_size: 64, "
    "intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, "
    "max_position_embeddings: 1024, bos_token_id: 1, eos_token_id: 2, pad_token_id: 0}}"
)


def block(lang: str, section: str) -> str:
    """The one ``lang`` code block of the doc's section whose heading starts with ``section``."""
    text = DOC.read_text()
    start = text.index("\n" + section)
    end = text.find("\n## ", start + 1)
    found = re.findall(rf"```{lang}\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)
    assert len(found) == 1, f"expected one {lang} block in section {section!r} of {DOC.name}"
    return found[0]


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_documents_environment_answers_its_tool_and_rewards_the_answer(tmp_path):
    """A hermes call of the document's tool gets the row's price; the right final answer scores 1,
    a wrong one 0, an unknown tool an error message."""
    (tmp_path / "my_envs.py").write_text(block("python", "## 1."))
    code = """
import random
from mopd.domains import get_generator, load_plugins
from mopd.envs import apply_step, get_env, get_parser
load_plugins(["my_envs.py"])
row = get_generator("shop").generate(random.Random(0), 1, "train")[0]
env = get_env("stock")(row)
item = row.prompt.split()[-1].rstrip("?")
turn = get_parser("hermes").parse('<tool_call>{"name": "price", "arguments": {"item": "%s"}}</tool_call>' % item)
res = apply_step(env, turn.calls, turn.content)
assert not res.done and res.messages[0]["content"] == str(row.meta["prices"][item]), res
bad = get_parser("hermes").parse('<tool_call>{"name": "cost", "arguments": {}}</tool_call>')
assert apply_step(env, bad.calls, "").messages[0]["content"].startswith("error: unknown tool"), bad
assert apply_step(env, [], str(row.meta["answer"])).reward == 1.0
assert get_env("stock")(row).step([], "0").reward == 0.0
print("ok")
"""
    proc = python(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_documents_recipe_lines_validate(tmp_path):
    """The recipe lines as written (with a tiny teacher for the checkpoint path), over recipes/tiny.yaml."""
    (tmp_path / "my_envs.py").write_text(block("python", "## 1."))
    yaml = block("yaml", "## 2.").replace("{path: /path/to/shop_teacher}", TINY_TEACHER)
    (tmp_path / "shop.yaml").write_text(yaml)
    cmd = [sys.executable, "-m", "mopd.app.cli", "validate", str(ROOT / "recipes" / "tiny.yaml"), "shop.yaml"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name: stock" in proc.stdout and "parser: hermes" in proc.stdout
    refused = subprocess.run(
        [*cmd, "environments.shop.parser=xml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2 and "xml" in refused.stderr and "hermes" in refused.stderr, refused.stderr
