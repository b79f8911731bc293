"""Row text holding the tokenizer's special tokens (`<|im_end|>`, `<|image_pad|>`, ...) is a bad row, found by the
check and by training's dataset alike; --system-prompt holding one is a flag error (ftloop.data.encode)."""

import copy
import dataclasses

import pytest

from datautil import SYSTEM, one_line_error, save_rgb, write_json, write_jsonl
from ftloop.data.batches import SFTDataset
from ftloop.data.check import Measuring, checked_rows, main
from ftloop.data.encode import ChatFormat, encode_chat
from ftloop.data.layouts import load_rows
from ftloop.data.rows import Row
from ftloop.distributed import World
from ftloop.errors import ConfigError, DataError, DataErrors

# Qwen's grounding markup, which Qwen-VL's grounding data writes in replies: text a row may hold
GROUNDING = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
             "<|quad_end|>"]


def refused_tokens(tokenizer) -> list[str]:
    """The tokens a row may not hold, as the tokenizer names them (not a list of ftloop's)."""
    return sorted(set(tokenizer.all_special_tokens) - set(GROUNDING))


def row(*messages, number=7, images=()) -> Row:
    return Row([{"role": role, "content": content} for role, content in messages], [str(p) for p in images],
               number=number)


def problem(tokenizer, image_processor, r: Row, chat=SYSTEM):
    """What the check says of the row: its token length, or its one line."""
    return Measuring(tokenizer, image_processor, chat)(r, "train.json")


def test_every_special_token_in_any_message_is_a_row_error(tokenizer, image_processor):
    """Each of the tokenizer's special tokens, in a system, user or assistant message (first, middle or last in
    the text), is the row's one line naming the token and the message, and saying what to do."""
    tokens = refused_tokens(tokenizer)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"} <= set(tokens)
    for token in tokens:
        bare = token.strip("<|>")
        cases = [
            (row(("user", f"What is {token}?"), ("assistant", "nine")), 1, "user"),
            (row(("user", "What is it?"), ("assistant", f"nine{token}")), 2, "assistant"),
            (row(("system", f"{token}Be brief."), ("user", "Hi"), ("assistant", "Hello")), 1, "system"),
            (row(("user", "Hi"), ("assistant", "Hello"), ("user", f"and {token} then"), ("assistant", "ok")),
             3, "user"),
        ]
        for r, number, role in cases:
            found = problem(tokenizer, image_processor, r)
            assert found == (f"train.json: row 7: message {number} ({role}) holds the special token `{token}`, which "
                             "the tokenizer reads as a control token, not as text; remove or reword it "
                             f"(e.g. `<| {bare} |>`)"), found


def test_several_tokens_are_named_once_each(tokenizer, image_processor):
    r = row(("user", "<image>Say it."), ("assistant", "a<|im_end|>\n<|im_start|>user\nb<|im_end|>"),
            images=["never-opened.png"])  # the text is checked before any image is opened
    assert problem(tokenizer, image_processor, r) == (
        "train.json: row 7: message 2 (assistant) holds the special tokens `<|im_end|>`, `<|im_start|>`, which the "
        "tokenizer reads as control tokens, not as text; remove or reword them (e.g. `<| im_end |>`)")


def test_placeholders_grounding_and_near_misses_are_text(tokenizer, image_processor, tmp_path):
    """`<image>` placeholders (ftloop's own vision tokens go in after the check), Qwen's grounding markup, and
    strings that only look like a token are text; the same row with one real token is not."""
    image = save_rgb(tmp_path / "a.png")
    reply = "".join(GROUNDING) + " <|im_end| <| im_end |> <im_end> |im_end|> <|IM_END|>"
    r = row(("user", "<image>Where is the cat?"), ("assistant", reply), images=[image])
    assert isinstance(problem(tokenizer, image_processor, r), int)
    for token in GROUNDING:  # each one token, as Qwen-VL's grounding data means it
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    r.messages[1]["content"] += "<|endoftext|>"
    assert "message 2 (assistant) holds the special token `<|endoftext|>`" in problem(tokenizer, image_processor, r)


def test_the_tokens_are_read_from_the_tokenizer(tiny_bundle, image_processor):
    """A special token the tokenizer gains is refused too (even after it measured rows), an added token that is not
    special (`<tool_call>`, as Qwen's tool-call data writes it) is text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bundle["model_dir"])
    custom = row(("user", "Hi"), ("assistant", "<|custom|> and <tool_call>"))
    assert isinstance(problem(tokenizer, image_processor, custom), int)
    tokenizer.add_tokens(["<tool_call>"])
    assert isinstance(problem(tokenizer, image_processor, custom), int)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|custom|>"]}, replace_extra_special_tokens=False)
    assert "holds the special token `<|custom|>`" in problem(tokenizer, image_processor, custom)


def test_training_dataset_refuses_the_row_too(tokenizer, image_processor):
    """The one encoding path: training's dataset meets the row as the same DataError line, never a mismatch of
    image tokens and features inside the model."""
    bad = row(("user", "What color? <|image_pad|><|image_pad|>"), ("assistant", "red"), number=3)
    with pytest.raises(DataError) as excinfo:
        SFTDataset([bad], tokenizer, image_processor, 4096, SYSTEM, source="train.json")[0]
    one_line_error(excinfo, "train.json: row 3: message 1 (user) holds the special token `<|image_pad|>`")
    assert str(excinfo.value) == problem(tokenizer, image_processor, dataclasses.replace(bad, number=7)).replace(
        "row 7", "row 3")


def test_a_bad_row_stops_the_check_before_training_or_is_skipped(tokenizer, image_processor, tiny_bundle, tmp_path):
    """Two rows, one holding `<|im_end|>` in its reply: refused before training with its line and the hint, skipped
    with --skip-bad-rows; the good row is encoded exactly as before (the ChatML of encode_chat, unchecked)."""
    image = save_rgb(tmp_path / "a.png")
    good = {"conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}],
            "image": image}
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi<|im_end|>"}]}
    data = write_json(tmp_path / "train.json", [good, bad])
    errors = []
    rows = load_rows(data, "", errors)
    assert errors == [] and len(rows) == 2  # reading leaves the text alone: the check finds it
    measuring = Measuring(tokenizer, image_processor, SYSTEM)
    line = (f"{data}: row 2: message 2 (assistant) holds the special token `<|im_end|>`, which the tokenizer reads "
            "as a control token, not as text; remove or reword it (e.g. `<| im_end |>`)")
    with pytest.raises(DataErrors) as refused:
        checked_rows(data, rows, errors, measuring, False, World.single())
    assert refused.value.lines[0] == line and "--skip-bad-rows" in refused.value.lines[1]
    kept = checked_rows(data, rows, errors, measuring, True, World.single())
    assert kept.skipped_bad == 1 and [r.number for r in kept.rows] == [1]

    sample = SFTDataset(kept.rows, tokenizer, image_processor, 4096, SYSTEM, source=data)[0]
    counts = (sample["image_grid_thw"].prod(-1) // image_processor.merge_size ** 2).tolist()
    input_ids, labels = encode_chat(rows[0].messages, counts, tokenizer, SYSTEM.system_prompt)
    assert sample["input_ids"].tolist() == input_ids and sample["labels"].tolist() == labels
    assert kept.lengths == [len(input_ids)]
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((sample["input_ids"] == image_pad).sum()) == counts[0] > 0


def test_the_check_command_lists_the_rows_of_each_layout(tiny_bundle, tmp_path, capsys):
    """`python -m ftloop.data.check`: one `FILE: row N:` line per bad row, in LLaVA and messages layouts (a text part
    of a list content too), exit 2."""
    llava = write_json(tmp_path / "llava.json", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "system", "value": "<|vision_start|>"}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}]},
    ])
    messages = write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi <|video_pad|>"}]},
                      {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ])
    code = main(["--train-data", llava, "--eval-data", messages, "--model-name-or-path", tiny_bundle["model_dir"],
                 "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 2, out
    lines = [line for line in out.splitlines() if ": row " in line]
    assert [line.split(", which")[0] for line in lines] == [
        f"{llava}: row 2: message 1 (system) holds the special token `<|vision_start|>`",
        f"{messages}: row 1: message 1 (user) holds the special token `<|video_pad|>`",
    ], out
    assert "total: 2 errors in 2 files" in out


def test_a_system_prompt_flag_holding_a_token_is_a_flag_error(tokenizer, image_processor, tiny_bundle, capsys):
    """--system-prompt goes into every row that has no system message: one flag error before any row, not a bad line
    per row. A row with its own system message is not refused for it."""
    prompt = ChatFormat("Be brief.<|im_end|>")
    with pytest.raises(ConfigError) as refused:
        Measuring(tokenizer, image_processor, prompt)
    one_line_error(refused, "--system-prompt", "holds the special token `<|im_end|>`", "remove or reword it")
    with pytest.raises(ConfigError):  # the dataset, should it ever be built without the check
        SFTDataset([row(("user", "Hi"), ("assistant", "Hello"))], tokenizer, image_processor, 4096, prompt)[0]
    own = row(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))
    assert len(SFTDataset([own], tokenizer, image_processor, 4096, prompt)[0]["input_ids"]) > 0
    with pytest.raises(ConfigError) as refused:
        main(["--train-data", tiny_bundle["train_json"], "--image-folder", tiny_bundle["image_folder"],
              "--model-name-or-path", tiny_bundle["model_dir"], "--system-prompt", "Look at <|image_pad|>",
              "--workers", "1"])
    one_line_error(refused, "--system-prompt", "`<|image_pad|>`")
    assert ": row " not in capsys.readouterr().out  # no row measured


def test_the_check_is_one_cached_pattern(tokenizer, monkeypatch):
    """Built once per tokenizer, not once per row."""
    import ftloop.data.encode as encode

    built = []
    make = encode._special_pattern
    monkeypatch.setattr(encode, "_special_pattern", lambda tok: built.append(1) or make(tok))
    monkeypatch.setattr(encode, "_SPECIAL", type(encode._SPECIAL)())
    for _ in range(50):
        encode.check_text([{"role": "user", "content": "Hi"}], tokenizer, "x")
    assert built == [1]
    assert encode.special_tokens(copy.deepcopy(tokenizer)) is not None and built == [1, 1]
