"""Chat data: render a conversation with the teacher's chat template and mark its assistant tokens.

A conversation is a list of ``{"role": ..., "content": ...}`` messages. It is rendered to text by the
tokenizer's own chat template and tokenised exactly as ``tokenizer.apply_chat_template(messages,
tokenize=True)`` does (``add_special_tokens=False``: the template writes any BOS itself), so the ids
are the ones the teacher sees at inference.

Which tokens are distillation targets (``targets="assistant"``): every token whose character span
overlaps the text of an assistant turn, i.e. ``token_end > turn_start and token_start < turn_end``.
This is transformers' own rule for ``return_assistant_tokens_mask``; a byte-level BPE token that
straddles a turn edge (``" Hello"`` after a prompt ending in ``":"`` + ``" "``) counts as a target.
An assistant turn is located in one of two ways, which agree whenever the spans are the same text:

- the template has ``{% generation %}`` blocks: the turn is what the block renders (transformers'
  ``return_assistant_tokens_mask``);
- otherwise (most templates): the turn of message ``i`` starts where rendering ``messages[:i]`` with
  ``add_generation_prompt=True`` ends, and ends at its **end-of-turn token**: the first special token
  of the tokenizer that the template writes after the content (whitespace between allowed, e.g.
  ``' ' + eos_token``), or at the content's end where the template writes none. Whatever the template
  adds after that (the ``"\n"`` of ``content + eos + "\n"``) is formatting between turns, no one's
  target, as it is for a ``{% generation %}`` block around ``content + eos``. The content is found in
  the text the turn adds (as given, or stripped); a template that rewrites it (so it cannot be found)
  has the whole added text as the turn. This needs a prefix-stable template: each partial rendering
  must be a prefix of the next, otherwise :class:`DataError`.
"""

from __future__ import annotations

import re
from typing import Any

import jinja2
import numpy as np

from kdpipe.pipeline.cache.text_spans import segment_code
from kdpipe.pipeline.data.byte_spans import TokenBytes, char_byte_offsets, spans_of
from kdpipe.pipeline.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")
TARGETS = ("assistant", "all")
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the test transformers itself uses


def check_chat_template(tokenizer, *, teacher: str) -> None:
    """Raise :class:`DataError` when ``tokenizer`` has no chat template (chat data cannot be rendered)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the teacher {teacher}'s tokenizer has no chat template, which chat data (records with a "
            "'messages' list) needs; add a chat_template to its tokenizer_config.json, use an "
            "instruct/chat teacher, or give the data as plain text (--text-field)"
        )


def render_conversation(
    messages: Any, tokenizer, *, targets: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Render and tokenise one conversation; ``where`` (e.g. ``"chat.jsonl:17"``) labels errors.

    Returns ``(input_ids [n] int64, is_target [n] bool)``: ``is_target[i]`` says token ``i`` belongs
    to an assistant turn (rule in the module docstring); all True for ``targets="all"``.
    """
    if targets not in TARGETS:
        raise ConfigError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    check_chat_template(tokenizer, teacher=getattr(tokenizer, "name_or_path", "") or "(unnamed)")
    _check_messages(messages, where)
    if targets == "all":
        input_ids = _encode(tokenizer, _render(tokenizer, messages, where))[0]
        return input_ids, np.ones(len(input_ids), dtype=bool)
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(
            f"{where}: the conversation has no assistant turn, so it has no distillation target; "
            "drop the record or pass --targets all"
        )
    if _GENERATION_BLOCK.search(tokenizer.get_chat_template()):
        out = _template_call(
            where, tokenizer.apply_chat_template, messages,
            tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        )
        input_ids = np.asarray(out["input_ids"], dtype=np.int64)
        is_target = np.asarray(out["assistant_masks"], dtype=bool)
    else:
        text = _render(tokenizer, messages, where)
        input_ids, offsets = _encode(tokenizer, text)  # [n], [n, 2] character spans
        is_target = np.zeros(len(input_ids), dtype=bool)
        for start, end in _assistant_spans(tokenizer, messages, text, where):
            is_target |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    if not is_target.any():
        raise DataError(
            f"{where}: the chat template renders no text for the assistant turns, so there is no "
            "distillation target; fix the record or the template, or pass --targets all"
        )
    return input_ids, is_target


def conversation_text(
    tokenizer, table: TokenBytes, messages: list[dict], input_ids: np.ndarray, *, where: str
) -> tuple[np.ndarray, np.ndarray, bytes]:
    """What the tokens ``input_ids`` of a rendered conversation spell of its messages' contents, for
    a cache that records text (:mod:`kdpipe.pipeline.cache.text_spans`): ``(lengths [n] int64,
    segment codes [n] uint8, text bytes)``. A token that ends inside a message's content covers its
    bytes there (a token that starts in the template before the content is cut to the content);
    template tokens and a token that runs from the content into the template after it cover nothing
    (its part of the content is left out: the teacher's prediction after it follows template text).
    A conversation whose contents cannot be located (a template that rewrites them) records no text."""
    n = len(input_ids)
    nothing = (np.zeros(n, np.int64), np.zeros(n, np.uint8), b"")
    text = _render(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != input_ids.tolist():
        return nothing
    spans = spans_of(table, text, input_ids, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2))
    contents = _content_ranges(tokenizer, messages, text, where)
    if spans is None or contents is None:
        return nothing
    data, (lengths, codes, _) = text.encode("utf-8"), nothing
    parts = []
    for role, start, end in contents:
        inside = np.nonzero((spans[:, 1] > start) & (spans[:, 1] <= end) & (spans[:, 1] > spans[:, 0]))[0]
        if not len(inside):
            continue
        lengths[inside] = spans[inside, 1] - np.maximum(spans[inside, 0], start)
        codes[inside] = segment_code(role, start=False)
        codes[inside[0]] = segment_code(role, start=True)
        parts.append(data[start : spans[inside[-1], 1]])
    return lengths, codes, b"".join(parts)


def _content_ranges(tokenizer, messages: list[dict], text: str, where: str) -> list[tuple[str, int, int]] | None:
    """``(role, byte start, byte end)`` in ``text`` of each message content the template writes, found
    by rendering the conversation with a marker for each content; None when the rendering with the
    contents (as given, or stripped) put back for the markers is not ``text``."""
    marked = [{**message, "content": f"\ue000{i}\ue001"} for i, message in enumerate(messages)]
    pieces = _MARKER.split(_render(tokenizer, marked, where))  # template, index, template, index, ...
    to_bytes = char_byte_offsets(text)
    for strip in (False, True):
        rebuilt, ranges = [pieces[0]], []
        at = len(pieces[0])
        for index, after in zip(pieces[1::2], pieces[2::2]):
            message = messages[int(index)]
            content = message["content"].strip() if strip else message["content"]
            ranges.append((message["role"], at, at + len(content)))
            rebuilt += [content, after]
            at += len(content) + len(after)
        if "".join(rebuilt) == text:
            return [(role, int(to_bytes[a]), int(to_bytes[b])) for role, a, b in ranges]
    return None


_MARKER = re.compile("\ue000([0-9]+)\ue001")  # private-use characters around a message's index


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
            f"objects, got {type(messages).__name__} {str(messages)[:40]!r}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: message {i} is a {type(message).__name__}, not an object; each message "
                "needs {\"role\": ..., \"content\": ...}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(
                    f"{where}: message {i} has no string '{key}'; each message needs "
                    "{\"role\": ..., \"content\": ...}"
                )
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} has unknown role {message['role']!r}; roles must be one of "
                f"{', '.join(ROLES)}"
            )


def _assistant_spans(tokenizer, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
    """[start, end) character span in ``text`` of each assistant turn, by prefix differences."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], where)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise DataError(
                f"{where}: the teacher's chat template is not prefix-stable at message {i} (rendering "
                "the conversation up to an assistant turn is not a prefix of rendering more of it: "
                "the template rewrites or drops earlier turns, or its generation prompt differs from "
                "how it opens an assistant turn), so the assistant tokens cannot be found; use a "
                "template that marks them with {% generation %} ... {% endgeneration %}, or pass "
                "--targets all"
            )
        spans.append((len(prompt), _turn_end(tokenizer, text, len(prompt), len(turn), message["content"])))
    return spans


def _turn_end(tokenizer, text: str, start: int, end: int, content: str) -> int:
    """End of the assistant turn ``text[start:end]`` (what rendering it added): after its end-of-turn
    token, else at the content's end; ``end`` when the content is not in it (rules in the module doc)."""
    added = text[start:end]
    for body in (content, content.strip()):
        at = added.find(body)
        if at >= 0:
            break
    else:
        return end
    content_end = start + at + len(body)
    closing = content_end  # where the end-of-turn token may start, after any whitespace
    while closing < end and text[closing].isspace():
        closing += 1
    for token in _special_tokens(tokenizer):  # longest first: "<|im_end|>" before "<|im"
        if text.startswith(token, closing, end):
            return closing + len(token)
    return content_end


def _special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens (BOS/EOS/PAD..., added special tokens such as ``<|eot_id|>``)."""
    tokens = set(tokenizer.all_special_tokens)
    tokens |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _render(tokenizer, messages: list[dict], where: str, *, add_generation_prompt: bool = False) -> str:
    if messages:
        return _template_call(
            where, tokenizer.apply_chat_template, messages,
            tokenize=False, add_generation_prompt=add_generation_prompt,
        )
    # apply_chat_template refuses an empty conversation; render it as it would (the prompt before a
    # leading assistant turn may still hold a BOS or a default system message).
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = _template_call(
        where, render_jinja_template, conversations=[[]], chat_template=tokenizer.get_chat_template(),
        add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map,
    )
    return rendered[0]


def _template_call(where: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except jinja2.TemplateError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"{where}: the teacher's chat template rejects this conversation ({reason}); fix the "
            "record or the template"
        ) from exc


def _encode(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids [n] int64, offsets [n, 2] int64)``, tokenised as apply_chat_template does."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return np.asarray(enc["input_ids"], dtype=np.int64), offsets
