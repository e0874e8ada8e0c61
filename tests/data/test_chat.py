"""Chat rendering and assistant masks (kdpipe.pipeline.data.chat), on the demo teacher's real BPE
tokenizer: the prefix-difference method and transformers' {% generation %} method must give the
same ids and masks, and both must equal a mask built independently, piece by piece. A turn's targets
end at its end-of-turn token: the newline a template writes after it is no one's target."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdpipe.pipeline.data.chat import ROLES, check_chat_template, render_conversation
from kdpipe.pipeline.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[2] / "data"
START, END = "<|im_start|>", "<|im_end|>"

# Two templates that render the same text; the second marks assistant turns (content and end-of-turn
# token, not the newline after it) for transformers. (Templates drop a newline right after a {% tag %}:
# trim_blocks; {{ '\n' }} writes one.)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A prompt ending in a space: the first assistant token (" Hello") straddles the turn's start.
COLON = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
COLON_GENERATION = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '\\n' }}{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You know the plays by heart."},
    {"role": "user", "content": "Continue: 'If music be the food of love,'"},
    {"role": "assistant", "content": " play on; give me excess of it,\nthat, surfeiting,"},
    {"role": "user", "content": "Who says it, in Act 1?"},
    {"role": "assistant", "content": "Orsino, Duke of Illyria — Twelfth Night.\n"},
]


def chat_tokenizer(template: str | None):
    """The demo teacher's byte-level BPE (2,048 tokens) plus ChatML's two special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(DATA / "teacher")
    tokenizer.add_special_tokens({"additional_special_tokens": [START, END]})
    tokenizer.chat_template = template
    return tokenizer


def assistant_runs(ids: np.ndarray, is_target: np.ndarray, tokenizer) -> list[str]:
    """Decoded text of each maximal run of target tokens."""
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(is_target.astype(int))) + 1)
    return [tokenizer.decode(ids[run]) for run in runs if is_target[run[0]]]


def expected_chatml(messages, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """ChatML ids and mask built piece by piece, independently of the module under test."""
    ids, mask = [], []
    for m in messages:
        target = m["role"] == "assistant"
        for piece, is_target in ((START, False), (m["role"] + "\n", False), (m["content"], target),
                                 (END, target), ("\n", False)):
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            mask += [is_target] * len(piece_ids)
    text = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages)
    # The pieces end at special tokens or at a newline before a non-space: no merge crosses them.
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.array(ids), np.array(mask)


def test_both_templates_render_the_same_text():
    text = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in CONVERSATION)
    for template in (CHATML, CHATML_GENERATION):
        tokenizer = chat_tokenizer(template)
        assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == text
        prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
        assert prompt == text[: text.index(f"{START}assistant")] + f"{START}assistant\n"


@pytest.mark.parametrize("template", [CHATML, CHATML_GENERATION], ids=["prefix-diff", "generation"])
def test_assistant_mask_matches_independent_computation(template):
    tokenizer = chat_tokenizer(template)
    ids, is_target = render_conversation(CONVERSATION, tokenizer, targets="assistant", where="t:1")
    want_ids, want_mask = expected_chatml(CONVERSATION, tokenizer)
    assert ids.dtype == np.int64 and is_target.dtype == bool and ids.shape == is_target.shape
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(is_target, want_mask)
    # Targets are exactly each assistant turn's content and its end-of-turn token.
    assert assistant_runs(ids, is_target, tokenizer) == [
        m["content"] + END for m in CONVERSATION if m["role"] == "assistant"
    ]
    # transformers' own mask from the generation template agrees too.
    marked = chat_tokenizer(CHATML_GENERATION).apply_chat_template(
        CONVERSATION, return_dict=True, return_assistant_tokens_mask=True
    )
    np.testing.assert_array_equal(np.array(marked["assistant_masks"], dtype=bool), want_mask)


def test_token_straddling_the_turn_start_is_a_target_in_both_methods():
    conversation = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "Hello there"}]
    ids, prefix_mask = render_conversation(
        conversation, chat_tokenizer(COLON), targets="assistant", where="t"
    )
    gen_ids, gen_mask = render_conversation(
        conversation, chat_tokenizer(COLON_GENERATION), targets="assistant", where="t"
    )
    np.testing.assert_array_equal(ids, gen_ids)
    np.testing.assert_array_equal(prefix_mask, gen_mask)
    tokenizer = chat_tokenizer(COLON)
    # " Hello"'s space is the template's, but the token carries the answer's first letters.
    # No end-of-turn token in this template: the targets end with the content, not its newline.
    assert assistant_runs(ids, prefix_mask, tokenizer) == [" Hello there"]
    assert tokenizer.decode(ids[~prefix_mask]) == "user: Speak.\nassistant:\n"


def test_leading_assistant_turn_after_template_bos():
    conversation = [{"role": "assistant", "content": "Who's there?"}, {"role": "user", "content": "Nay."},
                    {"role": "assistant", "content": "Long live the king!"}]
    results = [render_conversation(conversation, chat_tokenizer("<|endoftext|>" + template),
                                   targets="assistant", where="t")
               for template in (CHATML, CHATML_GENERATION)]
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    ids, is_target = results[0]
    assert ids[0] == chat_tokenizer(None).eos_token_id and not is_target[0]
    assert assistant_runs(ids, is_target, chat_tokenizer(None)) == [
        f"Who's there?{END}", f"Long live the king!{END}"
    ]


def test_targets_all_marks_every_token():
    tokenizer = chat_tokenizer(CHATML)
    ids, is_target = render_conversation(CONVERSATION[:2], tokenizer, targets="all", where="t")
    assert is_target.all() and len(ids) > 10
    np.testing.assert_array_equal(ids, tokenizer.apply_chat_template(CONVERSATION[:2])["input_ids"])


def test_shipped_chat_data_renders_with_the_demo_teacher_template():
    tokenizer = AutoTokenizer.from_pretrained(DATA / "teacher")
    assert not re.search(r"\{%-?\s*generation", tokenizer.chat_template)  # the prefix method
    for split in ("train", "heldout"):
        lines = (DATA / "chat" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            messages = json.loads(line)["messages"]
            ids, is_target = render_conversation(messages, tokenizer, targets="assistant", where=f"{n}")
            assert len(ids) < 256
            assert assistant_runs(ids, is_target, tokenizer) == [
                m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"
            ]


@pytest.mark.parametrize("messages, message", [
    ({"role": "user"}, "t:3: 'messages' must be a non-empty list"),
    ([], "t:3: 'messages' must be a non-empty list"),
    (["hi"], "t:3: message 0 is a str, not an object"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}, {"role": "user", "content": "b"}],
     "t:3: message 1 has no string 'content'; each message needs {\"role\": ..., \"content\": ...}"),
    ([{"role": 1, "content": "a"}], "t:3: message 0 has no string 'role'"),
    ([{"role": "bot", "content": "a"}],
     "t:3: message 0 has unknown role 'bot'; roles must be one of system, user, assistant, tool"),
    ([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
     "t:3: the conversation has no assistant turn, so it has no distillation target; drop the record "
     "or pass --targets all"),
])
def test_malformed_conversations_name_the_record_and_the_fix(messages, message):
    with pytest.raises(DataError) as err:
        render_conversation(messages, chat_tokenizer(CHATML), targets="assistant", where="t:3")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert ROLES == ("system", "user", "assistant", "tool")


def test_missing_chat_template():
    tokenizer = chat_tokenizer(None)
    with pytest.raises(DataError, match=r"^the teacher data/teacher's tokenizer has no chat template.*"
                                        r"add a chat_template to its tokenizer_config.json"):
        check_chat_template(tokenizer, teacher="data/teacher")
    with pytest.raises(DataError, match="has no chat template"):
        render_conversation(CONVERSATION, tokenizer, targets="assistant", where="t")
    check_chat_template(chat_tokenizer(CHATML), teacher="x")
    with pytest.raises(ConfigError, match="targets must be one of assistant, all"):
        render_conversation(CONVERSATION, chat_tokenizer(CHATML), targets="user", where="t")


def test_template_that_rejects_the_conversation():
    strict = ("{% if messages[0]['role'] == 'assistant' %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}" + CHATML)
    with pytest.raises(DataError) as err:
        render_conversation(CONVERSATION[2:], chat_tokenizer(strict), targets="assistant", where="c.jsonl:9")
    assert str(err.value) == (
        "c.jsonl:9: the teacher's chat template rejects this conversation (Conversation roles must "
        "alternate user/assistant); fix the record or the template"
    )


@pytest.mark.parametrize("template", [
    CHATML.replace("%}<|im_start|>assistant\n{% endif", "%}<|im_start|>bot\n{% endif"),  # other prompt
    CHATML.replace("{% for m in messages %}", "{% for m in messages[-2:] %}"),  # drops earlier turns
], ids=["generation-prompt-differs", "drops-earlier-turns"])
def test_template_that_is_not_prefix_stable(template):
    with pytest.raises(DataError, match=r"^t:4: the teacher's chat template is not prefix-stable at "
                                        r"message 2 .*\{% generation %\}.*--targets all$"):
        render_conversation(CONVERSATION, chat_tokenizer(template), targets="assistant", where="t:4")
    # With every token a target the template is fine.
    render_conversation(CONVERSATION, chat_tokenizer(template), targets="all", where="t:4")


def test_generation_marked_template_needs_no_prefix_stability():
    last_round = CHATML_GENERATION.replace("{% for m in messages %}", "{% for m in messages[-2:] %}")
    tokenizer = chat_tokenizer(last_round)
    ids, is_target = render_conversation(CONVERSATION, tokenizer, targets="assistant", where="t")
    assert assistant_runs(ids, is_target, tokenizer) == [CONVERSATION[-1]["content"] + END]


# The demo teacher's template, each turn closed by "\n" after the EOS (a common shape), without and
# with {% generation %} markers around content + EOS.
EOS_NEWLINE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS_NEWLINE_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2's shape: a space between the content and the end-of-turn token, then template text.
SPACE_EOS = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
)


def test_newline_after_the_end_of_turn_token_is_no_target_with_or_without_markers():
    """Issue 27.5: without markers every assistant turn had the "\n" after its EOS as one target too many."""
    lines = (DATA / "chat" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    plain, marked = AutoTokenizer.from_pretrained(DATA / "teacher"), AutoTokenizer.from_pretrained(DATA / "teacher")
    plain.chat_template, marked.chat_template = EOS_NEWLINE, EOS_NEWLINE_GENERATION
    eos = plain.eos_token
    for n, line in enumerate(lines, 1):
        messages = json.loads(line)["messages"]
        ids, is_target = render_conversation(messages, plain, targets="assistant", where=f"{n}")
        marked_ids, marked_mask = render_conversation(messages, marked, targets="assistant", where=f"{n}")
        np.testing.assert_array_equal(ids, marked_ids)
        np.testing.assert_array_equal(is_target, marked_mask, err_msg=f"conversation {n}")
        turns = [m["content"] + eos for m in messages if m["role"] == "assistant"]
        assert assistant_runs(ids, is_target, plain) == turns
        assert is_target.sum() == sum(len(plain(t, add_special_tokens=False)["input_ids"]) for t in turns)


def test_end_of_turn_token_after_a_space_is_a_target():
    tokenizer = AutoTokenizer.from_pretrained(DATA / "teacher")
    tokenizer.chat_template = SPACE_EOS
    conversation = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "Hello there"},
                    {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hello"}]
    ids, is_target = render_conversation(conversation, tokenizer, targets="assistant", where="t")
    eos = tokenizer.eos_token
    assert assistant_runs(ids, is_target, tokenizer) == [f" Hello there {eos}", f" Hello {eos}"]
