"""Chat templates, end-of-turn tokens and prompt lengths in tokens (mopd/chat.py, mopd/data.py, the
HF rollout), with a tokenizer built here the way instruct checkpoints ship theirs: a ChatML chat
template, an end-of-turn token ``<|im_end|>`` whose id differs from ``eos_token``, no BOS, and
``pad_token == eos_token``.

    OMP_NUM_THREADS=1 pytest tests/test_chat.py
"""

from __future__ import annotations

import json

import pytest
import torch

from mopd.chat import prompt_ids, stop_token_ids, student_tokenizer
from mopd.config import ConfigError, DataSourceConfig, ModelConfig, MOPDConfig, TeacherConfig, validate
from mopd.data import DataError, load_source
from mopd.loop import rollout_metrics
from mopd.models import CHARS, load_model, sequence_logprobs, tiny_mimo_config
from mopd.types import PromptRow
from rollout.batching import merge_batches, pack_rollout

EOT_TEXT, EOS_TEXT, START = "<|im_end|>", "<|endoftext|>", "<|im_start|>"
EOS_ID, START_ID, EOT_ID = 0, 1, 2  # EOS is also the pad token
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_NEW = 12
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2 ="}]


def chat_tokenizer():
    """Character-level, like the builtin tokenizer, with the three special tokens above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS_TEXT: EOS_ID, START: START_ID, EOT_TEXT: EOT_ID}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TEXT))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS_TEXT, START, EOT_TEXT])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TEXT,
        pad_token=EOS_TEXT,
        unk_token=EOS_TEXT,
        additional_special_tokens=[START, EOT_TEXT],
        chat_template=CHATML,
        padding_side="left",
    )


def chat_model(seed: int = 0, scale: float = 10.0):
    """A tiny MiMoV2Flash sized to the chat tokenizer, lm_head sharpened so greedy paths are clear."""
    config = tiny_mimo_config(bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    model = load_model(ModelConfig(config=config, tokenizer="builtin:char"), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def save_student(model, path, eos_ids: list[int] | None) -> str:
    """A model directory as a checkpoint ships it: weights, tokenizer, and a generation_config.json
    with ``eos_ids`` (none at all when None)."""
    from transformers import GenerationConfig

    model.save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    if eos_ids is not None:
        GenerationConfig(eos_token_id=eos_ids, pad_token_id=EOS_ID).save_pretrained(path)
    return str(path)


def make_cfg(student_path: str, **rollout) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.student = ModelConfig(path=student_path)
    cfg.rollout.max_new_tokens = MAX_NEW
    for key, value in rollout.items():
        setattr(cfg.rollout, key, value)
    return cfg


def chat_row(content: str = "1 + 2 =") -> PromptRow:
    messages = [MESSAGES[0], {"role": "user", "content": content}]
    return PromptRow(prompt="", domain="math", messages=messages)


# --------------------------------------------------------------------------- rendering


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load(path, tokenizer, max_prompt_len=256, on_bad_row="reject", **kw):
    src = DataSourceConfig(domain="math", path=path, **kw)
    return load_source(src, 0, max_prompt_len, on_bad_row, {"math"}, tokenizer)


def test_auto_renders_chat_messages_with_the_student_template(tmp_path):
    tok = chat_tokenizer()
    path = _write(tmp_path / "chat.jsonl", [{"messages": MESSAGES, "answer": "3"}])
    (row,), _ = _load(path, tok, messages_key="messages")
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 2 =<|im_end|>\n<|im_start|>assistant\n"
    assert row.prompt == expected and row.messages == MESSAGES and row.meta == {"answer": "3"}
    ids = prompt_ids(tok, row)
    # The special tokens are single ids (not their characters) and nothing is added twice.
    assert ids[0] == START_ID and ids.count(EOT_ID) == 2 and tok.decode(ids) == expected


def test_text_prompts_are_used_as_they_are(tmp_path):
    tok = chat_tokenizer()
    (row,), _ = _load(_write(tmp_path / "t.jsonl", [{"prompt": "1 + 2 ="}]), tok)
    assert row.messages is None and prompt_ids(tok, row) == tok("1 + 2 =")["input_ids"]


def test_a_text_prompt_rendered_by_hand_gets_no_second_bos():
    from mopd.models import build_char_tokenizer

    tok = build_char_tokenizer()  # adds BOS "<s>" to every encoding
    assert prompt_ids(tok, PromptRow("1+2=", "math")) == tok("1+2=")["input_ids"]
    assert prompt_ids(tok, PromptRow("<s>1+2=", "math")) == tok("1+2=")["input_ids"]


def test_prompts_ids_of_many_rows_are_each_rows_prompt_ids():
    """The batched encoding (text prompts with and without BOS, chat messages) gives each row the
    ids ``prompt_ids`` gives it alone, in the rows' order."""
    from mopd.chat import prompts_ids
    from mopd.models import build_char_tokenizer

    rows = [
        PromptRow("1+2=", "math"), PromptRow("<s>3+4=", "math"), PromptRow("55-5=", "math"),
        PromptRow("x", "math", messages=MESSAGES), PromptRow("<s>7=", "math"),
    ]  # fmt: skip
    text = [r for r in rows if r.messages is None]
    for tok, these in ((build_char_tokenizer(), text), (chat_tokenizer(), rows)):
        assert prompts_ids(tok, these) == [prompt_ids(tok, r) for r in these]
    assert prompts_ids(chat_tokenizer(), []) == []


def test_messages_the_template_refuses_are_bad_rows(tmp_path):
    tok = chat_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('roles must be user or assistant') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    path = _write(tmp_path / "chat.jsonl", [{"messages": MESSAGES}, {"messages": MESSAGES[1:]}])
    with pytest.raises(DataError, match="line 1: the chat template cannot render these messages .*user or assistant"):
        _load(path, tok, messages_key="messages")
    rows, stats = _load(path, tok, messages_key="messages", on_bad_row="skip")
    assert [r.prompt for r in rows] == ["1 + 2 ="] and stats["data/skipped/bad_messages"] == 1


def test_a_template_file_replaces_the_tokenizer_template(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    student = save_student(chat_model(), tmp_path / "student", [EOS_ID, EOT_ID])
    cfg = make_cfg(student)
    cfg.data.chat_template = str(template)
    tok = student_tokenizer(cfg)
    path = _write(tmp_path / "chat.jsonl", [{"messages": MESSAGES}])
    (row,), _ = _load(path, tok, messages_key="messages")
    assert row.prompt == "system: Be brief.\nuser: 1 + 2 =\nassistant:"
    assert prompt_ids(tok, row) == tok(row.prompt, add_special_tokens=False)["input_ids"]


def test_chat_source_refused_with_template_none_or_without_a_template(tmp_path):
    from mopd.models import build_char_tokenizer

    path = _write(tmp_path / "chat.jsonl", [{"messages": MESSAGES}])
    cfg = MOPDConfig()
    cfg.run.total_steps = 1
    cfg.student = ModelConfig(config=tiny_mimo_config(), tokenizer="builtin:char")
    cfg.teachers = {"math": TeacherConfig(config=tiny_mimo_config(), tokenizer="builtin:char")}
    cfg.data.sources = [DataSourceConfig(domain="math", path=path, messages_key="messages")]
    cfg.data.chat_template = "none"
    with pytest.raises(ConfigError, match=r"data.sources\[0\] is in chat form .* data.chat_template is 'none'"):
        validate(cfg)
    cfg.data.chat_template = str(tmp_path / "missing.jinja")
    with pytest.raises(ConfigError, match="data.chat_template is .*missing.jinja.*nor an existing Jinja template"):
        validate(cfg)
    # auto, but the builtin char tokenizer has no chat template
    with pytest.raises(DataError, match="student tokenizer has no chat template; set data.chat_template"):
        _load(path, build_char_tokenizer(), messages_key="messages")
    # A text source whose rows hold messages: the message says which key to set.
    with pytest.raises(DataError, match="no 'prompt' field .*set the source's messages_key: messages"):
        _load(path, chat_tokenizer())
    bad = _write(tmp_path / "bad.jsonl", [{"messages": "hi"}])
    with pytest.raises(DataError, match="line 1: 'messages' must be a non-empty list of chat messages"):
        _load(bad, chat_tokenizer(), messages_key="messages")


def test_max_prompt_len_counts_tokens_after_the_template(tmp_path):
    tok = chat_tokenizer()
    short, long = [{"role": "user", "content": "1 + 2 ="}], [{"role": "user", "content": "12 + 34 ="}]
    path = _write(tmp_path / "chat.jsonl", [{"messages": short}, {"messages": long}, {"messages": short}])
    n = len(prompt_ids(tok, PromptRow("", "math", messages=short)))
    # Far more characters than tokens: <|im_start|> and <|im_end|> are one token each.
    assert len(tok.apply_chat_template(short, add_generation_prompt=True, tokenize=False)) > n + 20
    rows, stats = _load(path, tok, max_prompt_len=n, on_bad_row="skip", messages_key="messages")
    assert len(rows) == 2 and stats == {"data/skipped/prompt_too_long": 1, "data/loaded": 2}
    with pytest.raises(DataError, match=rf"line 2: prompt has {n + 2} tokens; data.max_prompt_len is {n}"):
        _load(path, tok, max_prompt_len=n, messages_key="messages")


# --------------------------------------------------------------------------- stop tokens


def test_stop_ids_join_tokenizer_generation_config_and_recipe(tmp_path):
    student = save_student(chat_model(), tmp_path / "a", [EOT_ID, 7])
    tok = chat_tokenizer()
    assert stop_token_ids(make_cfg(student), tok) == [EOS_ID, EOT_ID, 7]
    assert stop_token_ids(make_cfg(student, stop_token_ids=[9, 7]), tok) == [EOS_ID, EOT_ID, 7, 9]
    bare = save_student(chat_model(), tmp_path / "b", None)
    assert stop_token_ids(make_cfg(bare), tok) == [EOS_ID]
    with pytest.raises(ValueError, match=r"stop token ids \[500\] are outside the student's vocabulary"):
        stop_token_ids(make_cfg(bare, stop_token_ids=[500]), tok, vocab_size=128)


def greedy_response(student: str, **rollout) -> tuple[list[int], bool, object]:
    """The greedy response of the HF rollout to ``chat_row()``: (response ids, truncated, batch)."""
    from rollout.hf import HFRolloutActor

    actor = HFRolloutActor(make_cfg(student, **rollout))
    b = actor.generate([chat_row()], n=1, seed=0, greedy=True)
    P = b.prompt_len
    assert b.input_ids[0, :P][b.attention_mask[0, :P]].tolist() == prompt_ids(actor.tokenizer, chat_row())
    assert b.truncated is not None
    return b.input_ids[0, P:][b.response_mask[0, P:]].tolist(), bool(b.truncated[0]), b


def put_token_at(model, tokens: list[int], target: int) -> int:
    """Swap the lm_head rows of ``target`` and of the first greedy token k that has not appeared
    before (and is no special token): the greedy path of ``model`` is then unchanged up to step k,
    where it emits ``target`` instead. Returns k."""
    k = next(i for i, t in enumerate(tokens) if i >= 2 and t > EOT_ID and t not in tokens[:i])
    with torch.no_grad():
        w = model.lm_head.weight
        w[[tokens[k], target]] = w[[target, tokens[k]]]
    return k


def with_token_at(model, path, tokens: list[int], target: int, eos_ids: list[int] | None) -> tuple[str, int]:
    """``put_token_at``, then the model saved to ``path``: (model directory, k)."""
    k = put_token_at(model, tokens, target)
    return save_student(model, path, eos_ids), k


@pytest.fixture(scope="module")
def free_run(tmp_path_factory) -> list[int]:
    """The greedy response of ``chat_model()`` when only EOS stops it (assumed to run to MAX_NEW)."""
    path = save_student(chat_model(), tmp_path_factory.mktemp("free"), None)
    tokens, truncated, _ = greedy_response(path)
    assert truncated and len(tokens) == MAX_NEW and not {EOS_ID, EOT_ID} & set(tokens)
    return tokens


@pytest.mark.parametrize(
    "eos_ids, recipe_stops, stops",
    [([EOS_ID, EOT_ID], [], True), (None, [EOT_ID], True), (EOS_ID, [], False)],
    ids=["generation_config", "rollout.stop_token_ids", "eos_only"],
)
def test_hf_rollout_stops_at_end_of_turn(tmp_path, free_run, eos_ids, recipe_stops, stops):
    """Regression: only tokenizer.eos_token ended a response, so a chat model's <|im_end|> (its
    generation_config.json EOS) let the response run on past the turn."""
    path, k = with_token_at(chat_model(), tmp_path / "s", free_run, EOT_ID, eos_ids)
    tokens, truncated, b = greedy_response(path, stop_token_ids=recipe_stops)
    assert tokens[: k + 1] == free_run[:k] + [EOT_ID]
    if stops:  # <|im_end|> is the last response token, inside the mask
        assert tokens == free_run[:k] + [EOT_ID] and not truncated
        assert rollout_metrics(b)["rollout/truncated_frac"] == 0.0
    else:  # <|im_end|> is just another token: the response runs on
        assert len(tokens) > k + 1 and truncated == (EOS_ID not in tokens)


def test_eos_equal_to_pad_is_a_response_token_scored_and_trained(tmp_path, free_run):
    """pad_token == eos_token (load_tokenizer's fallback, and many checkpoints): the EOS that ends a
    response is in the response mask, a teacher scores it and the loss has a gradient there."""
    from mopd.objective import mopd_loss
    from teachers.hf import HFTeacherWorker

    path, k = with_token_at(chat_model(), tmp_path / "s", free_run, EOS_ID, None)
    tokens, truncated, b = greedy_response(path)
    assert tokens == free_run[:k] + [EOS_ID] and not truncated
    P, end = b.prompt_len, b.prompt_len + k
    assert b.input_ids[0, end] == EOS_ID == b.input_ids[0, -1] and b.response_mask[0, end]
    assert b.attention_mask[0, end] and b.rollout_logprobs[0, end] < 0
    teacher = HFTeacherWorker(
        "math", TeacherConfig(path=save_student(chat_model(seed=5, scale=1.0), tmp_path / "t", None)), 0
    )
    scores = teacher.score(b.input_ids, b.attention_mask, b.response_mask)
    ref = sequence_logprobs(teacher.model, b.input_ids, b.attention_mask)
    assert scores.logprobs[0, end] < 0
    torch.testing.assert_close(scores.logprobs[0, P : end + 1], ref[0, P : end + 1], atol=1e-5, rtol=0)
    logp_train = b.rollout_logprobs.clone().requires_grad_(True)
    loss, _ = mopd_loss(
        logp_train,
        b.rollout_logprobs,
        scores.logprobs,
        b.response_mask,
        eps_low=0.5,
        eps_high=5.0,
        alpha=0.0,
        adv_clip=5.0,
    )
    loss.backward()
    assert logp_train.grad is not None and logp_train.grad[0, end] != 0


def test_teachers_score_the_sampled_ids_not_retokenised_text(tmp_path, free_run, monkeypatch):
    """The ids the student sampled (chat-rendered prompt + response) reach every teacher as they
    are: the teacher pool passes the batch's input_ids, never text."""
    from teachers.hf import HFTeacherWorker
    from teachers.pool import TeacherPool

    path, _ = with_token_at(chat_model(), tmp_path / "s", free_run, EOT_ID, [EOS_ID, EOT_ID])
    _, _, b = greedy_response(path)
    seen = []
    score = HFTeacherWorker.score

    def spy(self, input_ids, *args, **kwargs):
        seen.append(input_ids.clone())
        return score(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(HFTeacherWorker, "score", spy)
    pool = TeacherPool({"math": TeacherConfig(path=path)}, 0, local=True)
    pool.worker("math").tokenizer = None  # a text round trip in scoring would fail here
    scores, _ = pool.score(b)
    assert len(seen) == 1 and torch.equal(seen[0], b.input_ids)
    assert (scores.logprobs[b.response_mask] < 0).all()


def test_a_teacher_with_its_own_template_scores_its_rendering_before_the_same_response(tmp_path, free_run):
    """teachers.<d>.chat_template: the teacher gets the prompt rendered with its template (here a
    longer one, so every column moves) followed by the student's response ids, and its scores come
    back in the batch's columns: equal to scoring that sequence directly."""
    from teachers.hf import HFTeacherWorker
    from teachers.pool import TeacherPool

    path, _ = with_token_at(chat_model(), tmp_path / "s", free_run, EOT_ID, [EOS_ID, EOT_ID])
    _, _, b = greedy_response(path)
    template = tmp_path / "teacher.jinja"
    template.write_text(CHATML.replace("<|im_start|>assistant\n", "<|im_start|>assistant\nAnswer: "))
    teacher = TeacherConfig(path=save_student(chat_model(seed=5, scale=1.0), tmp_path / "t", None))
    teacher.chat_template = str(template)
    pool = TeacherPool({"math": teacher}, 0, local=True)
    scores, _ = pool.score(b)

    worker = HFTeacherWorker("math", teacher, 0, set_threads=False)
    P = b.prompt_len
    tok = chat_tokenizer()
    tok.chat_template = template.read_text()
    own = tok.apply_chat_template(b.rows[0].messages, add_generation_prompt=True, tokenize=False)
    assert own.endswith("Answer: ")
    prompt = tok(own, add_special_tokens=False)["input_ids"]
    assert len(prompt) > P  # the teacher's prompt part is longer than the student's
    response = b.input_ids[0, P:]
    ids = torch.cat([torch.as_tensor(prompt), response])[None]
    mask = torch.cat([torch.ones(len(prompt), dtype=b.attention_mask.dtype), b.attention_mask[0, P:]])[None]
    resp = torch.cat([torch.zeros(len(prompt), dtype=torch.bool), b.response_mask[0, P:]])[None]
    direct = worker.score(ids, mask, resp).logprobs[0, len(prompt) :]
    on = b.response_mask[0, P:]
    torch.testing.assert_close(scores.logprobs[0, P:][on], direct[on], atol=1e-5, rtol=0)
    # The student's own rendering scores differently: the template reached the teacher.
    plain = TeacherPool({"math": TeacherConfig(path=teacher.path)}, 0, local=True).score(b)[0]
    assert (plain.logprobs[0, P:][on] - direct[on]).abs().max() > 1e-3


def test_relayout_keeps_text_rows_and_restores_columns():
    from mopd.types import TeacherScores
    from teachers.pool import relayout_prompts, restore_columns

    ids = torch.tensor([[0, 7, 8, 9, 10], [5, 6, 7, 9, 0]])  # P = 3; row 0 left-padded, row 1 response padded
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    resp = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    new_ids, new_mask, new_resp, p = relayout_prompts(ids, mask, resp, 3, [[1, 2, 3, 4], None], pad_id=0)
    assert p == 4
    assert new_ids.tolist() == [[1, 2, 3, 4, 9, 10], [0, 5, 6, 7, 9, 0]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]]
    assert new_resp.tolist() == [[False] * 4 + [True, True], [False] * 4 + [True, False]]
    top = new_ids[..., None]
    scored = TeacherScores(logprobs=new_ids.float(), topk_ids=top, topk_logprobs=top.float())
    back = restore_columns(scored, p, 3, 5)
    assert back.logprobs[:, 3:].tolist() == ids[:, 3:].float().tolist() and back.logprobs[:, :3].abs().sum() == 0
    assert back.topk_ids is not None and back.topk_ids[:, 3:, 0].tolist() == ids[:, 3:].tolist()


# --------------------------------------------------------------------------- truncated_frac


def test_truncated_frac_per_domain_and_through_merge():
    def batch(truncated, domains):
        k = len(domains)
        return pack_rollout(
            prompts=[[5, 6]] * k,
            responses=[[7, EOT_ID]] * k,
            logprobs=[[-1.0, -1.0]] * k,
            group_ids=list(range(k)),
            rows=[PromptRow("p", d) for d in domains],
            texts=["r"] * k,
            pad_id=EOS_ID,
            policy_version=0,
            truncated=truncated,
        )

    merged = merge_batches(
        [batch([True, False, False], ["math", "math", "code"]), batch([True], ["code"])], pad_id=EOS_ID
    )
    assert merged.truncated is not None and merged.truncated.tolist() == [True, False, False, True]
    m = rollout_metrics(merged)
    assert m["rollout/truncated_frac"] == 0.5
    assert m["rollout/math/truncated_frac"] == 0.5 and m["rollout/code/truncated_frac"] == 0.5
    assert merged.select([1, 3]).truncated.tolist() == [False, True]
    unknown = batch(None, ["math"])
    assert "rollout/truncated_frac" not in rollout_metrics(unknown)
