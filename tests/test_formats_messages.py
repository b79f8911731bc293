"""The messages layout (OpenAI / TRL / Qwen), LLaVA videos, layout detection and --data-format: every row
becomes the same normal form, and every bad row one line naming file and row."""

import os

import pytest

from datautil import one_line_error, save_rgb, turns, write_json, write_jsonl
from ftloop.data.encode import ChatFormat
from ftloop.data.layouts import load_rows
from ftloop.data.rows import Row
from ftloop.errors import DataError


@pytest.fixture
def data_dir(tmp_path):
    for name in ("a.png", "b.png", "c.png", "f1.png", "f2.png", "f3.png"):
        save_rgb(tmp_path / name)
    return tmp_path


def text(t):
    return {"type": "text", "text": t}


def image(path=None):
    return {"type": "image", "image": path} if path else {"type": "image"}


def video(frames=None):
    return {"type": "video", "video": frames} if frames else {"type": "video"}


def msg(role, content):
    return {"role": role, "content": content}


# The same three rows in LLaVA, messages-with-paths and TRL (bare parts + top-level images) layouts.
LLAVA = [
    {"image": "a.png", "conversations": turns(("human", "<image>What color?"), ("gpt", "red"))},
    {"image": ["b.png", "c.png"], "conversations": turns(
        ("system", "Be brief."), ("human", "<image> and <image>: same?"), ("gpt", "yes"), ("human", "sure?"),
        ("gpt", "sure"))},
    {"conversations": turns(("human", "hi"), ("gpt", "hello"))},
]
MESSAGES = [
    {"messages": [msg("user", [image("a.png"), text("What color?")]), msg("assistant", "red")]},
    {"messages": [msg("system", "Be brief."), msg("user", [image("b.png"), text(" and "), image("c.png"),
                                                           text(": same?")]),
                  msg("assistant", [text("yes")]), msg("user", "sure?"), msg("assistant", "sure")]},
    {"messages": [msg("user", "hi"), msg("assistant", "hello")]},
]
TRL = [
    {"images": ["a.png"], "messages": [msg("user", [image(), text("What color?")]), msg("assistant", "red")]},
    {"images": ["b.png", "c.png"], "messages": [
        msg("system", [text("Be brief.")]), msg("user", [image(), text(" and "), image(), text(": same?")]),
        msg("assistant", [text("yes")]), msg("user", [text("sure?")]), msg("assistant", [text("sure")])]},
    {"images": [], "messages": [msg("user", [text("hi")]), msg("assistant", [text("hello")])]},
]


def test_three_layouts_give_identical_rows(data_dir):
    llava = load_rows(write_json(data_dir / "llava.json", LLAVA))
    messages = load_rows(write_jsonl(data_dir / "messages.jsonl", MESSAGES))
    trl = load_rows(write_json(data_dir / "trl.json", TRL))
    assert llava == messages == trl
    assert llava[1] == Row(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image> and <image>: same?"},
         {"role": "assistant", "content": "yes"}, {"role": "user", "content": "sure?"},
         {"role": "assistant", "content": "sure"}],
        [os.path.join(str(data_dir), "b.png"), os.path.join(str(data_dir), "c.png")], [], number=2)
    assert llava[2].images == [] and llava[2].videos == []


def test_messages_string_placeholders_take_top_level_images_and_file_scheme(data_dir, tmp_path):
    rows = [{"images": ["a.png"], "messages": [msg("user", "<image>What color?"), msg("assistant", "red")]},
            {"image": "a.png", "messages": [msg("user", [image(), text("What color?")]), msg("assistant", "red")]},
            {"messages": [msg("user", [image("file://" + str(data_dir / "a.png")), text("What color?")]),
                          msg("assistant", "red")]}]
    got = load_rows(write_json(data_dir / "d.json", rows))
    assert [r.messages[0]["content"] for r in got] == ["<image>What color?"] * 3
    assert [r.images for r in got] == [[str(data_dir / "a.png")]] * 3
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    save_rgb(folder / "a.png")
    (moved,) = load_rows(write_json(data_dir / "e.json", rows[:1]), str(folder))
    assert moved.images == [str(folder / "a.png")]


def test_videos_in_messages_and_llava(data_dir):
    frames = ["f1.png", "f2.png", "f3.png"]
    absolute = [str(data_dir / f) for f in frames]
    messages = [
        {"messages": [msg("user", [video(frames), text("What happens?")]), msg("assistant", "it moves")]},
        {"videos": [frames, frames[:1]], "messages": [
            msg("user", [video(), text("then"), video(), image("a.png")]), msg("assistant", "x")]},
    ]
    llava = [
        {"video": frames, "conversations": turns(("human", "<video>What happens?"), ("gpt", "it moves"))},
        {"video": [frames, frames[:1]], "image": "a.png",
         "conversations": turns(("human", "<video>then<video><image>"), ("gpt", "x"))},
    ]
    a = load_rows(write_json(data_dir / "m.json", messages))
    b = load_rows(write_json(data_dir / "l.json", llava))
    assert a == b
    assert a[0].videos == [absolute] and a[0].images == []
    assert a[0].messages[0]["content"] == "<video>What happens?"
    assert a[1].videos == [absolute, absolute[:1]] and a[1].images == [str(data_dir / "a.png")]
    assert a[1].messages[0]["content"] == "<video>then<video><image>"


def user_image(path=None):
    return [msg("user", [image(path), text("What?")]), msg("assistant", "red")]


BAD_MESSAGES = {
    "unknown role": ({"messages": [msg("robot", "beep"), msg("assistant", "x")]}, "unknown role 'robot'"),
    "missing messages": ({"images": ["a.png"]}, "`messages`"),
    "empty messages": ({"messages": []}, "`messages`"),
    "no assistant": ({"messages": [msg("user", "hi"), msg("user", "again")]}, "no assistant turn"),
    "no content": ({"messages": [msg("user", None), msg("assistant", "x")]}, "no `content`"),
    "unknown part": ({"messages": [msg("user", [{"type": "table"}]), msg("assistant", "x")]},
                     "unknown content part 'table'"),
    "audio part": ({"messages": [msg("user", [{"type": "audio", "audio": "a.wav"}]), msg("assistant", "x")]},
                   "an audio part: Qwen-VL models have no audio input"),
    "audios (ms-swift)": ({"audios": ["a.wav"], "messages": [msg("user", "What is said?"), msg("assistant", "x")]},
                          "the row has audio (`audios`): Qwen-VL models have no audio input"),
    "audio placeholder": ({"messages": [msg("user", "<audio>What?"), msg("assistant", "x")]},
                          "an `<audio>` placeholder: Qwen-VL models have no audio input"),
    "every reply loss false": ({"messages": [msg("user", "hi"), dict(msg("assistant", "x"), loss=False)]},
                               "every assistant turn has `loss`: false, so nothing to learn from"),
    "loss not a bool": ({"messages": [msg("user", "hi"), dict(msg("assistant", "x"), loss="no")]},
                        "a message's `loss` is 'no'; give true, false or leave it out"),
    "loss on a user turn": ({"messages": [dict(msg("user", "hi"), loss=True), msg("assistant", "x")]},
                            "a user message has `loss`: true; only assistant replies are learnt"),
    "text part without text": ({"messages": [msg("user", [{"type": "text"}]), msg("assistant", "x")]},
                               "string `text`"),
    "too few images": ({"images": ["a.png"], "messages": [msg("user", [image(), image()]),
                                                          msg("assistant", "x")]},
                       "2 bare image parts or `<image>` placeholders but 1 entries in `images`"),
    "too many images": ({"images": ["a.png", "b.png"], "messages": user_image()},
                        "1 bare image parts or `<image>` placeholders but 2 entries in `images`"),
    "images without parts": ({"images": ["a.png"], "messages": [msg("user", "hi"), msg("assistant", "x")]},
                             "0 bare image parts"),
    "paths and top-level images": ({"images": ["a.png"], "messages": user_image("a.png")},
                                   "also has a top-level `images`"),
    "paths and bare parts": ({"messages": [msg("user", [image("a.png"), image()]), msg("assistant", "x")]},
                             "some image parts carry a path and others"),
    "image missing": ({"messages": user_image("gone.png")}, "image not found"),
    "top-level image missing": ({"images": ["gone.png"], "messages": user_image()}, "image not found"),
    "image in assistant turn": ({"messages": [msg("user", "hi"), msg("assistant", [image("a.png")])]},
                                "`<image>` placeholders belong in user turns"),
    "image not a path": ({"messages": user_image({"bytes": "..."})}, "must be a path"),
    "image url": ({"messages": user_image("https://example.com/a.png")}, "local files only"),
    "images not paths": ({"images": [3], "messages": user_image()}, "`images` must be a list of paths"),
    "video file missing": ({"messages": [msg("user", [video("clip.mp4")]), msg("assistant", "x")]},
                           "video not found"),
    "video neither file nor frames": ({"messages": [msg("user", [video(3)]), msg("assistant", "x")]},
                                      "must be a video file or a non-empty list of frame paths"),
    "bare video without videos": ({"messages": [msg("user", [video()]), msg("assistant", "x")]},
                                  "1 bare video parts or `<video>` placeholders but 0 entries in `videos`"),
    "videos not lists": ({"videos": ["f1.png"], "messages": [msg("user", [video()]), msg("assistant", "x")]},
                         "video 1 of `videos` is an image"),
    "frame missing": ({"messages": [msg("user", [video(["f1.png", "gone.png"])]), msg("assistant", "x")]},
                      "video 1 frame not found"),
    "video in system turn": ({"videos": [["f1.png"]], "messages": [msg("system", [video()]), msg("user", "hi"),
                                                                   msg("assistant", "x")]},
                             "`<video>` placeholders belong in user turns"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_messages_row_is_one_line_naming_file_and_row(data_dir, case):
    bad, needle = BAD_MESSAGES[case]
    good = MESSAGES[0]
    path = write_jsonl(data_dir / "d.jsonl", [good, good, bad])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    one_line_error(excinfo, path, "row 3", needle)
    errors = []
    assert len(load_rows(path, errors=errors)) == 2 and len(errors) == 1 and "row 3" in errors[0]


def test_llama_factory_sharegpt_images_and_ms_swift_roles_read_as_llava(data_dir):
    """LLaMA-Factory's default sharegpt rows list their images in `images`; ms-swift's `conversations` use
    user/assistant/system: both are the LLaVA row they stand for (before, the first was "1 `<image>` placeholders
    but 0 images")."""
    llama_factory = {"conversations": turns(("human", "<image>What color?"), ("gpt", "red")), "images": ["a.png"]}
    ms_swift = {"conversations": turns(("system", "Be brief."), ("user", "<image> and <image>: same?"),
                                       ("assistant", "yes"), ("user", "sure?"), ("assistant", "sure")),
                "images": ["b.png", "c.png"]}
    assert load_rows(write_json(data_dir / "lf.json", [llama_factory, ms_swift])) == \
        load_rows(write_json(data_dir / "llava.json", LLAVA[:2]))
    both = dict(llama_factory, image="a.png")
    with pytest.raises(DataError) as excinfo:
        load_rows(write_json(data_dir / "both.json", [both]))
    one_line_error(excinfo, str(data_dir / "both.json"), "row 1", "both `image` and `images`")


@pytest.mark.parametrize("layout", ["messages", "llava"])
def test_a_reply_marked_loss_false_is_context_and_not_learnt(data_dir, tokenizer, layout):
    """ms-swift's per-message `"loss": false`: that reply is rendered as before and none of its tokens is
    supervised; the other replies are learnt as before."""
    from ftloop.data.encode import encode_chat
    from ftloop.loss import IGNORE_INDEX

    def row(loss):
        first = {"loss": False} if not loss else {}
        if layout == "messages":
            return {"messages": [msg("user", "Say one."), dict(msg("assistant", "one"), **first),
                                 msg("user", "Say two."), msg("assistant", "two")]}
        return {"conversations": [{"from": "human", "value": "Say one."}, {"from": "gpt", "value": "one", **first},
                                  {"from": "human", "value": "Say two."}, {"from": "gpt", "value": "two"}]}

    learnt, context = load_rows(write_json(data_dir / "r.json", [row(True), row(False)]))
    ids, labels = encode_chat(learnt.messages, [], tokenizer, "")
    same_ids, context_labels = encode_chat(context.messages, [], tokenizer, "")
    assert same_ids == ids
    changed = [i for i, (a, b) in enumerate(zip(labels, context_labels)) if a != b]
    assert tokenizer.decode([ids[i] for i in changed]) == "one<|im_end|>"  # the first reply and its end token
    assert all(context_labels[i] == IGNORE_INDEX for i in changed)
    assert tokenizer.decode([t for t in context_labels if t != IGNORE_INDEX]) == "two<|im_end|>"


def test_openai_and_llama_factory_v1_blocks_read_as_ours(data_dir):
    """OpenAI's `image_url` blocks (`{"url": ...}` or a bare string, `file://` URIs) and LLaMA-Factory v1's
    `{"type": ..., "value": ...}` blocks are the parts they stand for (before: "unknown content part")."""
    def openai(path, bare=False):
        return {"type": "image_url", "image_url": path if bare else {"url": path}}

    def v1(kind, value):
        return {"type": kind, "value": value}

    absolute = "file://" + str(data_dir / "b.png")
    rows = [
        {"messages": [msg("user", [openai("a.png"), text("What color?")]), msg("assistant", "red")]},
        {"messages": [msg("system", "Be brief."), msg("user", [openai(absolute), v1("text", " and "),
                                                               openai("c.png", bare=True), v1("text", ": same?")]),
                      msg("assistant", [v1("text", "yes")]), msg("user", "sure?"), msg("assistant", "sure")]},
        {"messages": [msg("user", [v1("text", "hi")]), msg("assistant", [v1("text", "hello")])]},
    ]
    assert load_rows(write_json(data_dir / "o.json", rows)) == load_rows(write_json(data_dir / "m.json", MESSAGES))
    v1_rows = [{"messages": [msg("user", [v1("image_url", "a.png"), v1("text", "What color?")]),
                             msg("assistant", [v1("text", "red")])]}]
    assert load_rows(write_json(data_dir / "v1.json", v1_rows)) == load_rows(write_json(data_dir / "m1.json",
                                                                                         MESSAGES[:1]))


def test_a_data_uri_image_is_decoded_in_memory(data_dir):
    """OpenAI's and ms-swift's `data:image/...;base64,...` images: decoded when the row is read, opened as the
    same pixels as the file they were made from, carried to the loader workers (pickled) intact, and named in
    one line when broken."""
    import base64
    import pickle

    from ftloop.data.check_cache import rows_digest
    from ftloop.data.media import open_rgb
    from ftloop.data.sources import InlineImage

    def row_with(path):
        uri = "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()
        return {"messages": [msg("user", [{"type": "image_url", "image_url": {"url": uri}}, text("What color?")]),
                             msg("assistant", "red")]}

    blue = save_rgb(data_dir / "blue.png", size=(28, 42), color=(0, 0, 200))
    [row] = load_rows(write_json(data_dir / "d.json", [row_with(blue)]))
    [red_row] = load_rows(write_json(data_dir / "r.json", [row_with(data_dir / "a.png")]))
    [image] = row.images
    assert isinstance(image, InlineImage) and pickle.loads(pickle.dumps(image)) == image
    pixels = open_rgb(image, "w")
    assert pixels.size == (28, 42) and pixels.tobytes() == open_rgb(blue, "w").tobytes()
    # the check's cache key: the same for the same bytes, another for other bytes
    assert rows_digest([row]) == rows_digest(load_rows(str(data_dir / "d.json"))) != rows_digest([red_row])
    for bad, needle in [("data:image/png;base64,{base64_encoded}", "is not valid base64"),
                        ("data:image/png,rawbytes", "must be `data:<type>;base64,<data>`")]:
        path = write_json(data_dir / "bad.json", [{"messages": user_image(bad)}])
        with pytest.raises(DataError) as excinfo:
            load_rows(path)
        one_line_error(excinfo, path, "row 1", needle)


def test_ms_swift_query_rows_are_the_conversations_they_stand_for(data_dir):
    """ms-swift's query/response/history rows and its `conversation` pairs are conversations; `<img>path</img>`
    (Qwen-VL's tags) places an image; images beyond the `<image>` tags get theirs at the start of the first
    query, as ms-swift does."""
    query = [
        {"query": "What color?", "response": "red", "images": ["a.png"]},  # no tag: added
        {"system": "Be brief.", "history": [["<img>b.png</img> and <img>c.png</img>: same?", "yes"]],
         "query": "sure?", "response": "sure"},
        {"conversation": [{"human": "hi", "assistant": "hello"}]},
    ]
    assert load_rows(write_jsonl(data_dir / "q.jsonl", query)) == load_rows(write_json(data_dir / "m.json", MESSAGES))
    tagged = [{"query": "<image>What color?", "response": "red", "images": ["a.png"]}]
    assert load_rows(write_jsonl(data_dir / "t.jsonl", tagged)) == load_rows(write_json(data_dir / "m1.json",
                                                                                        MESSAGES[:1]))
    assert load_rows(write_jsonl(data_dir / "f.jsonl", query), data_format="query")[2].messages[1]["content"] == \
        "hello"
    for bad, needle in [({"query": "q", "response": "r", "history": [["only one"]]}, "[query, response] pairs"),
                        ({"query": "q", "response": None}, "every query and response must be text"),
                        ({"query": "<img>a.png</img>", "response": "r", "images": ["a.png"]}, "in one of the two"),
                        ({"conversation": []}, "`conversation` must be a non-empty list")]:
        path = write_jsonl(data_dir / "bad.jsonl", [query[0], bad])
        with pytest.raises(DataError) as excinfo:
            load_rows(path)
        one_line_error(excinfo, path, "row 2", needle)


def test_llama_factory_dataset_info_entries_are_read_as_llama_factory_reads_them(data_dir, tmp_path):
    """`--train-data DIR/dataset_info.json:NAME`: the entry's file, formatting, columns and tags, media relative to
    DIR (LLaMA-Factory's media_dir), whatever folder the file itself lies in."""
    os.makedirs(data_dir / "sets")
    sharegpt = [{"chat": [{"speaker": "person", "text": "<image>What color?"}, {"speaker": "bot", "text": "red"}],
                 "pictures": ["a.png"]},
                {"chat": [{"speaker": "person", "text": "hi"}, {"speaker": "bot", "text": "hello"}], "pictures": []}]
    alpaca = [{"instruction": "Say hi.", "input": "Politely.", "output": "Hello.", "history": [["Ready?", "Yes."]],
               "sys": "Be brief."}]
    write_json(data_dir / "sets" / "share.json", sharegpt)
    write_json(data_dir / "sets" / "alpaca.json", alpaca)
    table = data_dir / "dataset_info.json"
    write_json(table, {
        "share": {"file_name": "sets/share.json", "formatting": "sharegpt",
                  "columns": {"messages": "chat", "images": "pictures"},
                  "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot"}},
        "plain": {"file_name": "sets/alpaca.json", "columns": {"history": "history", "system": "sys"}},
        "remote": {"hf_hub_url": "org/set"}, "gone": {"file_name": "sets/gone.json"}})
    assert load_rows(f"{table}:share") == load_rows(write_json(data_dir / "m.json", [MESSAGES[0], MESSAGES[2]]))
    [row] = load_rows(f"{table}:plain")
    assert row.messages == [msg("system", "Be brief."), msg("user", "Ready?"), msg("assistant", "Yes."),
                            msg("user", "Say hi.\nPolitely."), msg("assistant", "Hello.")]
    for name, needle in [("nope", "no data set named 'nope' (it names: gone, plain, remote, share)"),
                         ("remote", "its `hf_hub_url` is a download")]:
        with pytest.raises(DataError) as excinfo:
            load_rows(f"{table}:{name}")
        one_line_error(excinfo, str(table), needle)
    # the flag is checked before anything loads; the check's cache knows the entry (its file changes: another key)
    from ftloop.config import DataArgs
    from ftloop.data.check_cache import source_fingerprint
    from ftloop.data.sources import check_sources
    from ftloop.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^--train-data .*dataset_info.json:nope: no data set named 'nope'"):
        check_sources(DataArgs(train_data=f"{table}:nope"))
    with pytest.raises(ConfigError, match=r"^--train-data .*:gone: its data file .*sets/gone.json is not found$"):
        check_sources(DataArgs(train_data=f"{table}:gone"))
    check_sources(DataArgs(train_data=f"{table}:share"))
    before = source_fingerprint(f"{table}:share")
    assert before is not None and before != source_fingerprint(f"{table}:plain")
    bad = write_json(data_dir / "sets" / "share.json", [sharegpt[0], {"chat": [{"speaker": "tool", "text": "x"}]}])
    assert source_fingerprint(f"{table}:share") != before
    with pytest.raises(DataError) as excinfo:
        load_rows(f"{table}:share")
    one_line_error(excinfo, bad, "row 2", "role 'tool' is none of dataset_info.json's tags")


def test_a_mixture_file_reads_each_source_with_its_own_media_folder_and_weight(data_dir, tmp_path, tokenizer,
                                                                             image_processor):
    """`--train-data mix.yaml`: several sources, each in its own layout and with its own media folder, its rows
    `weight` times, in the file's order; every message about a row names the row's own file."""
    from ftloop.config import DataArgs
    from ftloop.data.check import Measuring
    from ftloop.data.encode import ChatFormat
    from ftloop.data.sources import check_sources
    from ftloop.errors import ConfigError

    other = tmp_path / "other"
    os.makedirs(other / "pictures")
    save_rgb(other / "pictures" / "a.png")
    llava = write_json(data_dir / "l.json", LLAVA)
    messages = write_jsonl(other / "m.jsonl", [dict(MESSAGES[0]), {"messages": [msg("user", "<|im_end|>hi"),
                                                                               msg("assistant", "x")]}])
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"- path: {llava}\n  weight: 2\n- path: other/m.jsonl\n  image_folder: other/pictures\n")
    rows = load_rows(str(mix))
    alone = load_rows(messages, str(other / "pictures"))
    assert rows == load_rows(llava) * 2 + alone and [r.source for r in rows] == [llava] * 6 + [str(messages)] * 2
    assert rows[6].images == [str(other / "pictures" / "a.png")]
    measuring = Measuring(tokenizer, image_processor, ChatFormat())
    assert measuring(rows[7], str(mix)).startswith(f"{messages}: row 2: message 1 (user) holds the special token")
    from ftloop.data.batches import SFTDataset
    with pytest.raises(DataError, match=f"^{messages}: row 2: message 1"):  # as a loader worker would meet it
        SFTDataset(rows, tokenizer, image_processor, 2048, ChatFormat(), str(mix))[7]
    for text, needle in [("- path: x.json\n  weight: 0\n", "source 1's weight 0: the times its rows go into"),
                         ("- path: x.json\n  folder: y\n", "source 1 must be `path` (text) with optional "
                                                              "`image_folder` and `weight`; unknown: folder"),
                         ("path: x.json\n", "a mixture file is a list of sources"),
                         ("- path: [x.json\n", "not valid YAML")]:
        mix.write_text(text)
        with pytest.raises(DataError) as excinfo:
            load_rows(str(mix))
        one_line_error(excinfo, str(mix), needle)
    mix.write_text("- path: gone.json\n")
    with pytest.raises(ConfigError, match=r"^--train-data .*mix.yaml: its source .*gone.json: file not found$"):
        check_sources(DataArgs(train_data=str(mix)))


BAD_LLAVA_VIDEOS = {
    "too few videos": ({"video": ["f1.png"], "conversations": turns(("human", "<video><video>"), ("gpt", "x"))},
                       "2 `<video>` placeholders but 1 videos"),
    "video without placeholder": ({"video": [["f1.png"]], "conversations": turns(("human", "hi"), ("gpt", "x"))},
                                  "0 `<video>` placeholders but 1 videos"),
    "placeholder in gpt turn": ({"video": ["f1.png"], "conversations": turns(("human", "hi"), ("gpt", "<video>"))},
                                "`<video>` placeholders belong in human turns"),
    "frame missing": ({"video": [["f1.png"], ["gone.png"]], "conversations": turns(("human", "<video><video>"),
                                                                                   ("gpt", "x"))},
                      "video 2 frame not found"),
    "empty video": ({"video": [["f1.png"], []], "conversations": turns(("human", "<video><video>"), ("gpt", "x"))},
                    "video 2 of `video` must be a video file or a non-empty list"),
    "video file missing": ({"video": "clip.mp4", "conversations": turns(("human", "<video>"), ("gpt", "x"))},
                           "video not found"),
    "video files and frames": ({"video": ["clip.mp4", "f1.png"], "conversations": turns(("human", "<video>"),
                                                                                         ("gpt", "x"))},
                               "mixes video files and frame images"),
}


@pytest.mark.parametrize("case", sorted(BAD_LLAVA_VIDEOS))
def test_bad_llava_video_row_is_one_line(data_dir, case):
    bad, needle = BAD_LLAVA_VIDEOS[case]
    path = write_json(data_dir / "d.json", [LLAVA[0], bad])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    one_line_error(excinfo, path, "row 2", needle)


def test_detection_and_data_format_override(data_dir):
    llava, messages = write_json(data_dir / "l.json", LLAVA), write_json(data_dir / "m.json", MESSAGES)
    neither = write_jsonl(data_dir / "n.jsonl", [{"prompt": "hi", "completion": "x"}] * 2)
    both = write_jsonl(data_dir / "b.jsonl", [dict(LLAVA[2], **MESSAGES[2])])
    assert load_rows(llava, data_format="llava") == load_rows(messages, data_format="messages")
    for path, needles in ((neither, ["none of `conversations`", "`messages`", "`query`", "completion, prompt"]),
                          (both, ["both", "--data-format"])):
        with pytest.raises(DataError) as excinfo:
            load_rows(path, errors=[])  # a layout problem is about the whole file: it raises even with errors=
        one_line_error(excinfo, path, *needles)
    assert load_rows(both, data_format="messages")[0].messages[1]["content"] == "hello"
    # Forcing the other layout: every row is bad, each said on its own line.
    errors = []
    assert load_rows(messages, errors=errors, data_format="llava") == []
    assert len(errors) == 3 and all("missing or empty `conversations`" in e for e in errors)
    errors = []
    assert load_rows(llava, errors=errors, data_format="messages") == []
    assert [e.split(": ")[1] for e in errors] == ["row 1", "row 2", "row 3"]
    assert all("missing or empty `messages`" in e for e in errors)
    with pytest.raises(ValueError):
        load_rows(llava, data_format="sharegpt")


def test_video_fps_is_a_row_field_of_both_layouts(data_dir, tokenizer, image_processor):
    frames = ["f1.png", "f2.png"]
    ask = ("human", "<video>then<video>")
    llava = [
        {"video": [frames, frames], "video_fps": 4.0, "conversations": turns(ask, ("gpt", "x"))},  # one for all
        {"video": [frames, frames], "video_fps": [1.0, None], "conversations": turns(ask, ("gpt", "x"))},
        {"video": [frames, frames], "conversations": turns(ask, ("gpt", "x"))},  # Qwen's default
    ]
    messages = [
        {"messages": [msg("user", [dict(video(frames), fps=4.0), text("then"), dict(video(frames), fps=4.0)]),
                      msg("assistant", "x")]},
        {"videos": [frames, frames], "video_fps": [1.0, None],  # bare parts: the top-level list's rates
         "messages": [msg("user", [video(), text("then"), video()]), msg("assistant", "x")]},
        {"messages": [msg("user", [video(frames), text("then"), video(frames)]), msg("assistant", "x")]},
    ]
    a = load_rows(write_json(data_dir / "l.json", llava))
    b = load_rows(write_json(data_dir / "m.json", messages))
    assert a == b
    assert [r.video_fps for r in a] == [[4.0, 4.0], [1.0, None], None]
    # ... and it reaches the model: second_per_grid_ts = temporal_patch_size / fps (2.0 by default).
    from ftloop.data.batches import SFTDataset

    dataset = SFTDataset(a, tokenizer, image_processor, 4096, ChatFormat(""))
    assert [dataset[i]["second_per_grid_ts"].tolist() for i in range(3)] == [[0.5, 0.5], [2.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("row, needle", [
    ({"video": ["f1.png"], "video_fps": 0, "conversations": turns(("human", "<video>"), ("gpt", "x"))},
     "fps must be a positive number, got 0"),
    ({"video": ["f1.png"], "video_fps": [2.0, 2.0], "conversations": turns(("human", "<video>"), ("gpt", "x"))},
     "2 fps values for 1 videos"),
    ({"image": "a.png", "video_fps": 2.0, "conversations": turns(("human", "<image>"), ("gpt", "x"))},
     "`video_fps` is given but the row has no videos"),
    ({"video_fps": 2.0, "messages": [msg("user", [video(["f1.png"])]), msg("assistant", "x")]},
     "give each video part its `fps`"),
    ({"videos": [["f1.png"]], "messages": [msg("user", [dict(video(), fps=2.0)]), msg("assistant", "x")]},
     "a bare video part has an `fps`"),
])
def test_bad_video_fps_is_one_line_before_training(data_dir, tokenizer, image_processor, row, needle):
    from ftloop.data.check import Measuring

    path = write_json(data_dir / "fps.json", [row])
    try:  # reading, or the check before training that measures every row
        [problem] = [Measuring(tokenizer, image_processor, ChatFormat(""))(read, path) for read in load_rows(path)]
    except DataError as err:
        problem = str(err)
    assert "\n" not in problem and f"{path}: row 1" in problem and needle in problem, problem
