"""ChatML rendering and tokenisation (ftloop.data.encode) against Qwen2.5-VL's own chat template."""

import json
import os

import pytest

from ftloop.loss import IGNORE_INDEX
from ftloop.data.encode import encode_chat, expand_vision, render_chat
from ftloop.data.rows import IMAGE_PLACEHOLDER

DEFAULT_SYSTEM = "You are a helpful assistant."  # what the official template inserts when a row has none
QWEN2_VOCAB = "/work/shared/qwen2-tokenizer"

SINGLE_IMAGE = [
    {"role": "user", "content": "<image>\nWhat color is the shape?"},
    {"role": "assistant", "content": "red"},
]
MULTI_TURN = [
    {"role": "user", "content": "<image>\nWhat shape is it?"},
    {"role": "assistant", "content": "A circle."},
    {"role": "user", "content": "And this one? <image> Compare it with <image>."},
    {"role": "assistant", "content": "The first is a square, the second a triangle."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
]
TEXT_ONLY = [
    {"role": "user", "content": "What is 4 plus 5?"},
    {"role": "assistant", "content": "9"},
]
OWN_SYSTEM = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "<image>\nWhat color is the shape?"},
    {"role": "assistant", "content": "blue"},
]
ROWS = {"single_image": SINGLE_IMAGE, "multi_turn": MULTI_TURN, "text_only": TEXT_ONLY, "own_system": OWN_SYSTEM}


def num_images(messages):
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)


def list_form(messages):
    """Messages as the HF processor passes them to the template: content lists of image / text parts."""
    out = []
    for m in messages:
        parts = []
        for k, piece in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if k:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


def segments(messages, counts, system_prompt):
    """The rendered conversation as (text, supervised) pieces, built independently of render_chat."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    counts, pieces = list(counts), []
    for m in messages:
        content = m["content"]
        while IMAGE_PLACEHOLDER in content:
            n = counts.pop(0)
            content = content.replace(IMAGE_PLACEHOLDER, "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>", 1)
        sup = m["role"] == "assistant"
        pieces += [(f"<|im_start|>{m['role']}\n", False), (content, sup), ("<|im_end|>", sup), ("\n", False)]
    assert not counts
    return pieces


def expected_ids_labels(tokenizer, messages, counts, system_prompt=DEFAULT_SYSTEM):
    ids, labels = [], []
    for text, sup in segments(messages, counts, system_prompt):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if sup else [IGNORE_INDEX] * len(piece)
    return ids, labels


def supervised_runs(labels):
    """Maximal runs of consecutive supervised positions, as lists of label ids."""
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("name", sorted(ROWS))
def test_render_matches_official_template(tokenizer, name):
    messages = ROWS[name]
    text, _ = render_chat(messages, [1] * num_images(messages), DEFAULT_SYSTEM)
    assert text == tokenizer.apply_chat_template(list_form(messages), tokenize=False)


def test_render_does_not_mutate_messages():
    messages = json.loads(json.dumps(MULTI_TURN))
    render_chat(messages, [2, 3, 4], DEFAULT_SYSTEM)
    assert messages == MULTI_TURN


def test_render_spans_cover_assistant_content_and_im_end(tokenizer):
    text, spans = render_chat(MULTI_TURN, [1, 2, 3], DEFAULT_SYSTEM)
    replies = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert [text[a:b] for a, b in spans] == [r + "<|im_end|>" for r in replies]
    for a, b in spans:
        assert text[a - len("<|im_start|>assistant\n"):a] == "<|im_start|>assistant\n"
        assert text[b] == "\n"


def test_render_no_system_prompt_when_empty_and_row_system_kept():
    text, _ = render_chat(TEXT_ONLY, [], "")
    assert text == "<|im_start|>user\nWhat is 4 plus 5?<|im_end|>\n<|im_start|>assistant\n9<|im_end|>\n"
    text, _ = render_chat(OWN_SYSTEM, [1], "Something else entirely.")
    assert "Something else entirely." not in text
    assert text.startswith("<|im_start|>system\nAnswer with one word.<|im_end|>\n<|im_start|>user\n")
    text, _ = render_chat(TEXT_ONLY, [], "Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_encode_ids_and_labels_exact(tokenizer, name):
    messages = ROWS[name]
    counts = [3, 1, 5][: num_images(messages)]
    input_ids, labels = encode_chat(messages, counts, tokenizer, DEFAULT_SYSTEM)
    want_ids, want_labels = expected_ids_labels(tokenizer, messages, counts)
    assert len(input_ids) == len(labels)
    assert input_ids == want_ids
    assert labels == want_labels


def test_labels_are_assistant_content_plus_im_end_only(tokenizer):
    input_ids, labels = encode_chat(MULTI_TURN, [4, 4, 4], tokenizer, DEFAULT_SYSTEM)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    replies = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    runs = supervised_runs(labels)
    # every assistant turn is supervised, each as one run that ends with its <|im_end|>
    assert len(runs) == len(replies) == 3
    for run, reply in zip(runs, replies):
        assert run[-1] == im_end
        assert tokenizer.decode(run[:-1]) == reply
    # supervised labels equal the input ids at the same position (no shift inside the data layer)
    assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(labels, input_ids))
    # the "\n" after each supervised <|im_end|> is not supervised, nor is the "assistant\n" header
    for i, (label, tok) in enumerate(zip(labels, input_ids)):
        if tok == im_end and label == im_end:
            assert [input_ids[i + 1]] == newline and labels[i + 1] == IGNORE_INDEX
    # only 3 of the 7 <|im_end|> tokens (system, 3 user, 3 assistant) are supervised
    assert input_ids.count(im_end) == 7 and labels.count(im_end) == 3
    # no special token other than the assistant <|im_end|> is supervised
    specials = set(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|image_pad|>", "<|vision_start|>",
                                                    "<|vision_end|>"]))
    assert not specials & set(labels)


def test_system_and_user_text_never_supervised(tokenizer):
    # reply text that also occurs in the system and user turns must only be supervised in the reply
    messages = [
        {"role": "system", "content": "red red red"},
        {"role": "user", "content": "<image>\nred?"},
        {"role": "assistant", "content": "red"},
    ]
    input_ids, labels = encode_chat(messages, [2], tokenizer, DEFAULT_SYSTEM)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    red = tokenizer("red", add_special_tokens=False)["input_ids"]
    assert [x for x in labels if x != IGNORE_INDEX] == red + [im_end]
    last_im_end = len(input_ids) - 1 - input_ids[::-1].index(im_end)
    assert labels[last_im_end] == im_end
    assert all(x == IGNORE_INDEX for x in labels[: last_im_end - len(red)])


def test_reply_with_inner_whitespace_is_fully_supervised(tokenizer):
    reply = "line one\n\n  two  \n x"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    _, labels = encode_chat(messages, [], tokenizer, DEFAULT_SYSTEM)
    (run,) = supervised_runs(labels)
    assert tokenizer.decode(run) == reply + "<|im_end|>"


def test_image_expansion_counts_in_order(tokenizer):
    counts = [2, 5, 3]
    input_ids, labels = encode_chat(MULTI_TURN, counts, tokenizer, DEFAULT_SYSTEM)
    assert len(input_ids) == len(labels)
    start, end, pad = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    blocks, i = [], 0
    while i < len(input_ids):
        if input_ids[i] == start:
            j = input_ids.index(end, i)
            assert set(input_ids[i + 1:j]) == {pad}
            blocks.append(j - i - 1)
            i = j
        i += 1
    assert blocks == counts
    assert input_ids.count(pad) == sum(counts)
    assert input_ids.count(start) == input_ids.count(end) == 3


def test_expand_images_string():
    text = expand_vision("a<image>b<image>c", [1, 3])
    assert text == ("a<|vision_start|><|image_pad|><|vision_end|>b"
                    "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>c")
    assert expand_vision("no images", []) == "no images"


def test_each_pad_is_one_token(tokenizer):
    input_ids, _ = encode_chat(SINGLE_IMAGE, [7], tokenizer, DEFAULT_SYSTEM)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    run = [i for i, t in enumerate(input_ids) if t == pad]
    assert len(run) == 7 and run == list(range(run[0], run[0] + 7))


def _qwen2_tokenizer():
    """The real Qwen2 byte-level BPE with Qwen2.5-VL's special tokens at their official ids."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from ftloop.demo.bundle import CHAT_TEMPLATE, SPECIAL_TOKENS

    with open(os.path.join(QWEN2_VOCAB, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    with open(os.path.join(QWEN2_VOCAB, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().splitlines() if line and not line.startswith("#")]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS}, replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.skipif(not os.path.isfile(os.path.join(QWEN2_VOCAB, "merges.txt")),
                    reason="real Qwen2 vocabulary not available")
def test_real_qwen2_vocabulary():
    tok = _qwen2_tokenizer()
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|image_pad|>"]) == [151644, 151645, 151655]
    for name in sorted(ROWS):
        messages = ROWS[name]
        text, _ = render_chat(messages, [1] * num_images(messages), DEFAULT_SYSTEM)
        assert text == tok.apply_chat_template(list_form(messages), tokenize=False), name
        counts = [3, 1, 5][: num_images(messages)]
        input_ids, labels = encode_chat(messages, counts, tok, DEFAULT_SYSTEM)
        want_ids, want_labels = expected_ids_labels(tok, messages, counts)
        assert (input_ids, labels) == (want_ids, want_labels), name
        assert input_ids[:3] == [151644, *tok("system", add_special_tokens=False)["input_ids"], 198][:3]
        assert input_ids.count(151655) == sum(counts)
    reply = "Line one.\n\n  Two:  \n x 中文 🙂"
    _, labels = encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}], [], tok,
                            DEFAULT_SYSTEM)
    (run,) = supervised_runs(labels)
    assert tok.decode(run) == reply + "<|im_end|>"


# ------------------------------------------------------------------------------------------------ videos

WITH_VIDEOS = [
    {"role": "user", "content": "<video>\nWhat happens? Compare with <image> and <video>."},
    {"role": "assistant", "content": "The ball rolls away."},
    {"role": "user", "content": "And here? <image>"},
    {"role": "assistant", "content": "A cat."},
]


def video_list_form(messages):
    """Content lists of image / video / text parts, in placeholder order (independent of chat.py's regex)."""
    out = []
    for m in messages:
        parts, rest = [], m["content"]
        while rest:
            hits = [(rest.find(tag), tag) for tag in ("<image>", "<video>") if tag in rest]
            if not hits:
                parts.append({"type": "text", "text": rest})
                break
            at, tag = min(hits)
            if at:
                parts.append({"type": "text", "text": rest[:at]})
            parts.append({"type": tag[1:-1]})
            rest = rest[at + len(tag):]
        out.append({"role": m["role"], "content": parts})
    return out


def test_render_with_videos_matches_official_template(tokenizer):
    # With one pad per block the template's text is ours; Qwen's processor then repeats each pad.
    text, _ = render_chat(WITH_VIDEOS, [1, 1], DEFAULT_SYSTEM, [1, 1])
    assert text == tokenizer.apply_chat_template(video_list_form(WITH_VIDEOS), tokenize=False)
    assert text.count("<|video_pad|>") == 2 and text.count("<|image_pad|>") == 2


def test_video_expansion_counts_in_order(tokenizer):
    image_counts, video_counts = [3, 5], [8, 2]
    input_ids, labels = encode_chat(WITH_VIDEOS, image_counts, tokenizer, DEFAULT_SYSTEM, video_counts)
    start, end, image_pad, video_pad = tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    blocks, i = [], 0
    while i < len(input_ids):
        if input_ids[i] == start:
            j = input_ids.index(end, i)
            (pad,) = set(input_ids[i + 1:j])
            blocks.append(("video" if pad == video_pad else "image", j - i - 1))
            i = j
        i += 1
    # placeholder order: video, image, video (first user turn), image (second)
    assert blocks == [("video", 8), ("image", 3), ("video", 2), ("image", 5)]
    assert input_ids.count(video_pad) == 10 and input_ids.count(image_pad) == 8
    assert video_pad not in labels and image_pad not in labels
    replies = [m["content"] for m in WITH_VIDEOS if m["role"] == "assistant"]
    assert [tokenizer.decode(run[:-1]) for run in supervised_runs(labels)] == replies


def test_expand_vision_string_with_videos():
    assert expand_vision("<video>a<image>b<video>", [2], [1, 3]) == (
        "<|vision_start|><|video_pad|><|vision_end|>a<|vision_start|><|image_pad|><|image_pad|><|vision_end|>b"
        "<|vision_start|><|video_pad|><|video_pad|><|video_pad|><|vision_end|>")
