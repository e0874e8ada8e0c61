"""Alignment by byte ends and the shared-bytes map (pipeline/train/xtok/align.py, vocab_map.py),
checked against brute-force computations on the shipped BPE and Unigram tokenizers."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train.xtok.align import IGNORE, StudentTokenizer, student_row
from kdpipe.pipeline.train.xtok.vocab_map import (first_byte_groups, prefix_groups, prefix_token_map, shared_token_map,
                                                 token_bytes)
from tests.train.xtok_rows import DATA, packed_teacher_row, spans_from_bytes

DOCS = ["First Witch.\nWhen shall we three meet again\nIn thunder, lightning, or in rain?",
        "Second Witch.\nWhen the hurlyburly’s done,\nWhen the battle’s lost and won. Café naïve é",
        "  Third Witch.\n\nThat will be ere the set of sun."]


@pytest.fixture(scope="module")
def teacher():
    return AutoTokenizer.from_pretrained(DATA / "tokenizer")


@pytest.fixture(scope="module")
def unigram():
    return AutoTokenizer.from_pretrained(DATA / "tokenizer-unigram")


def _student(tokenizer):
    return StudentTokenizer.of(tokenizer, token_bytes(tokenizer), spans=spans_from_bytes)


def _brute_force_pairs(text, teacher_spans, counted, student_ids, student_ends):
    """Every byte offset: the teacher's counted text token ending there and the student's, if both exist."""
    pairs = []
    for b in range(1, len(text) + 1):
        t = [i for i, (s, e) in enumerate(teacher_spans) if e == b and e > s and counted[i]]
        s = [i for i, e in enumerate(student_ends) if e == b]
        assert len(t) <= 1 and len(s) <= 1
        if t and s:
            pairs.append((s[0], t[0]))
    return pairs


@pytest.mark.parametrize("skip,length", [(0, 64), (5, 48), (30, 200), (0, 12)])
def test_aligned_positions_equal_a_brute_force_over_byte_offsets(teacher, unigram, skip, length):
    text, spans, segments, real = packed_teacher_row(teacher, DOCS, length=length, skip=skip)
    kd_mask = real.copy()
    kd_mask[3] = False  # a teacher position without KD never pairs
    row = student_row(text, spans, segments, kd_mask, _student(unigram), chat=False, teacher_real=real)
    want = _brute_force_pairs(text, spans, kd_mask & real, row.input_ids, row.ends)
    assert list(zip(row.student_positions.tolist(), row.teacher_positions.tolist())) == want
    assert len(want) > 0.3 * len(row.input_ids)


def test_the_student_row_re_tokenises_each_segment_with_its_own_eos_between(teacher, unigram):
    text, spans, segments, real = packed_teacher_row(teacher, DOCS, length=400)
    row = student_row(text, spans, segments, real, _student(unigram), chat=False, teacher_real=real)
    eos = unigram.eos_token_id
    pieces = np.split(row.input_ids, np.nonzero(row.input_ids == eos)[0])
    assert [p[0] for p in pieces if len(p)] == [eos] * len(DOCS)  # one EOS before each document
    assert len(segments) == len(DOCS)
    for (kind, start, stop), piece in zip(segments, [p[1:] for p in pieces if len(p)]):
        assert piece.tolist() == unigram.encode(text[start:stop].decode(), add_special_tokens=False)
    ends = row.ends[row.ends >= 0]
    assert (np.diff(ends) > 0).all() and ends[-1] == len(text)
    # CE: every next token, EOS included; the last position has no label
    assert row.labels[:-1].tolist() == row.input_ids[1:].tolist() and row.labels[-1] == IGNORE


def test_a_row_cut_inside_a_character_gets_byte_tokens_at_its_edge(teacher, unigram):
    doc = "é" * 40
    text, spans, segments, real = packed_teacher_row(teacher, [doc], length=21, skip=2)  # 'Ã' '©' byte tokens
    assert not text.startswith("é".encode())
    row = student_row(text, spans, segments, real, _student(unigram), chat=False, teacher_real=real)
    table = token_bytes(unigram)
    assert b"".join(table[i] for i in row.input_ids).replace(b" ", b"") == text  # (the prepended metaspace)
    assert row.ends[0] == 1 and row.ends[-1] == len(text)
    want = _brute_force_pairs(text, spans, real, row.input_ids, row.ends)
    assert list(zip(row.student_positions.tolist(), row.teacher_positions.tolist())) == want


def test_the_student_row_is_cut_at_max_len(teacher, unigram):
    text, spans, segments, real = packed_teacher_row(teacher, DOCS, length=100)
    row = student_row(text, spans, segments, real, _student(unigram), chat=False, teacher_real=real, max_len=20)
    assert len(row.input_ids) == 20 and row.student_positions.max() < 20 and row.labels[-1] == IGNORE


def _decoded(tokenizer, token_id):
    """Bytes of one token by the tokenizer's own decoder, after an anchor token (so a SentencePiece
    decoder keeps the leading space); None where the token is no whole character."""
    anchor = tokenizer.convert_tokens_to_string(["x"])
    text = tokenizer.backend_tokenizer.decoder.decode(["x", tokenizer.convert_ids_to_tokens(token_id)])
    if "\ufffd" in text or not text.startswith(anchor):
        return None
    return text[len(anchor):].encode()


def test_the_shared_map_equals_a_brute_force_comparison_of_both_vocabularies(teacher, unigram):
    mapping = shared_token_map(teacher, unigram).teacher_to_student
    special_t, special_s = set(teacher.all_special_ids), set(unigram.all_special_ids)
    student = {}
    for j in range(len(unigram)):
        value = None if j in special_s else _decoded(unigram, j)
        if value is not None and not unigram.convert_ids_to_tokens(j).startswith("<0x"):
            student.setdefault(value, j)
    checked = 0
    for i in range(len(teacher)):
        value = None if i in special_t else _decoded(teacher, i)
        if value is None:
            continue
        want = student.get(value)
        if want is None and len(value) == 1:  # only a byte-fallback token has it
            want = unigram.convert_tokens_to_ids(f"<0x{value[0]:02X}>")
        assert mapping[i] == (want if want is not None else -1), (teacher.convert_ids_to_tokens(i), value)
        checked += 1
    assert checked > 1900 and (mapping >= 0).sum() > 500
    assert mapping[teacher.eos_token_id] == unigram.eos_token_id
    # bytes that are no whole character: the BPE's byte tokens map to the byte-fallback tokens
    for t, byte in zip(teacher.encode("é"), "é".encode()):
        assert mapping[t] == unigram.convert_tokens_to_ids(f"<0x{byte:02X}>")


def test_a_tokenizer_whose_bytes_cannot_be_told_is_refused(teacher):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ConfigError, match="neither byte-level BPE nor SentencePiece-style"):
        shared_token_map(teacher, wordpiece)


def _chat_teacher_row(tokenizer, messages):
    """A chat cache's row: the teacher's template tokens (no text) around each message's content tokens;
    kd mask: the next token is an assistant content token or the end of an assistant turn."""
    ids, spans, targets, segments, text, offset = [], [], [], [], b"", 0
    for role, content in messages:
        head = tokenizer.encode(f"<|im_start|>{role}\n", add_special_tokens=False)
        content_ids, content_spans = spans_from_bytes(tokenizer, content)
        ids += head + content_ids.tolist() + [tokenizer.eos_token_id]
        end = offset + len(content.encode())
        spans += [(offset, offset)] * len(head) + (content_spans + offset).tolist() + [(end, end)]
        targets += [False] * len(head) + [role == "assistant"] * (len(content_ids) + 1)
        segments.append((role, offset, offset + len(content.encode())))
        text += content.encode()
        offset += len(content.encode())
    kd_mask = np.zeros(len(ids), bool)
    kd_mask[:-1] = targets[1:]
    return text, np.asarray(spans, np.int64), segments, kd_mask


def test_a_chat_row_aligns_within_message_content_and_each_side_keeps_its_own_template(teacher, unigram):
    messages = [("user", "Who art thou, good fellow?"), ("assistant", "I am Viola, sir; a poor gentleman."),
                ("user", "What country, friends, is this?"), ("assistant", "This is Illyria, lady.")]
    text, spans, segments, kd_mask = _chat_teacher_row(teacher, messages)
    student = _student(unigram)
    row = student_row(text, spans, segments, kd_mask, student, chat=True)
    want = _brute_force_pairs(text, spans, kd_mask, row.input_ids, row.ends)
    assert list(zip(row.student_positions.tolist(), row.teacher_positions.tolist())) == want and want
    # the student's row is its own template around each message's content, tokenised alone
    expected, counted = [], []
    for role, content in messages:
        head, tail = student.template(role)
        body = unigram.encode(content, add_special_tokens=False)
        expected += head + body + tail
        counted += [False] * len(head) + [role == "assistant"] * (len(body) + 1) + [False] * (len(tail) - 1)
    assert row.input_ids.tolist() == expected
    labels = [nxt if c else IGNORE for nxt, c in zip(expected[1:], counted[1:])] + [IGNORE]
    assert row.labels.tolist() == labels
    # KD only where the teacher's next token is an assistant target, i.e. inside assistant turns
    teacher_roles = [next(r for r, a, b in segments if a < spans[t, 1] <= b) for t in row.teacher_positions]
    assert set(teacher_roles) == {"assistant"}  # (a reply's first token follows template tokens: no pair)


def test_the_prefix_map_sends_each_teacher_token_to_the_longest_student_token_it_begins_with(teacher, unigram):
    mapping = prefix_token_map(teacher, unigram).teacher_to_student
    teacher_bytes, student_bytes = token_bytes(teacher), token_bytes(unigram)
    for i, value in enumerate(teacher_bytes):
        if value is None:
            continue
        candidates = [j for j, s in enumerate(student_bytes) if s and value.startswith(s)]
        best = max(len(student_bytes[j]) for j in candidates)
        longest = [j for j in candidates if len(student_bytes[j]) == best]
        pieces = [j for j in longest if not unigram.convert_ids_to_tokens(j).startswith("<0x")]
        assert mapping[i] == min(pieces or longest), teacher.convert_ids_to_tokens(i)
    kingdom = teacher.encode(" kingdom")
    assert unigram.convert_ids_to_tokens(int(mapping[kingdom[0]])).startswith("▁k")


def test_the_prefix_groups_are_the_connected_sets_of_the_prefix_relation(teacher, unigram):
    """Brute force: a graph joining each token of either side to the longest token of the other side its
    bytes begin with, and ids with equal bytes; its connected sets (by search) are the groups."""
    groups = prefix_groups(teacher, unigram)
    teacher_bytes, student_bytes = token_bytes(teacher), token_bytes(unigram)
    nodes = [("t", i, v) for i, v in enumerate(teacher_bytes) if v] + [("s", j, v) for j, v in enumerate(student_bytes) if v]
    edges: dict = {(side, i): set() for side, i, _ in nodes}
    for side, i, value in nodes:
        others = [(o, j, w) for o, j, w in nodes if o != side and value.startswith(w)]
        best = max(len(w) for _, _, w in others)
        for o, j, w in nodes:  # the longest of the other side, and every id of either side with those bytes
            if (o != side and w == value[:best]) or (o == side and w == value):
                edges[(side, i)].add((o, j))
                edges[(o, j)].add((side, i))
    edges[("t", teacher.eos_token_id)] = {("s", unigram.eos_token_id)}
    edges[("s", unigram.eos_token_id)] = {("t", teacher.eos_token_id)}
    component, count = {}, 0
    for start in edges:
        if start in component:
            continue
        stack = [start]
        while stack:
            node = stack.pop()
            if node not in component:
                component[node] = count
                stack.extend(edges[node])
        count += 1
    assert groups.count == count
    labels = {("t", i): int(c) for i, c in enumerate(groups.teacher_group) if c >= 0}
    labels.update({("s", j): int(c) for j, c in enumerate(groups.student_group) if c >= 0})
    assert set(labels) == set(component)
    pairs = {(component[node], labels[node]) for node in component}  # one-to-one between the two labellings
    assert len(pairs) == count == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    kingdom, king = teacher.encode(" kingdom")[0], unigram.encode("king", add_special_tokens=False)[0]
    assert groups.teacher_group[kingdom] == groups.student_group[king]


def test_first_byte_groups_give_each_model_its_next_byte_distribution(teacher, unigram):
    groups = first_byte_groups(teacher, unigram)
    for group, table, eos in ((groups.teacher_group, token_bytes(teacher), teacher.eos_token_id),
                              (groups.student_group, token_bytes(unigram), unigram.eos_token_id)):
        for token_id, value in enumerate(table):
            assert group[token_id] == (value[0] if value else 256 if token_id == eos else -1)
