"""A model folder that agrees with itself, checked before anything loads; and the tokenizer and image processor a
checkpoint was trained with, checked again when a run resumes from it.

Each file of a Hugging Face folder loads on its own, and transformers does not compare them: without tokenizer
files it builds a tokenizer of one token from config.json alone (every row then measures 0 tokens), a
preprocessor_config.json of another model cuts images into patches the vision tower does not read, a config.json
whose `image_token_id` is not the tokenizer's `<|image_pad|>` finds no image in any row. Each of these used to pass
the check before training and fail at step 1 (or never: a model trained on nothing). Here:

- `load_processing`: the tokenizer and the image processor (with the run's pixel limits), as ftloop.data.encode
  loads them; a folder without tokenizer files or without preprocessor_config.json, or a file that does not load,
  is one ConfigError line naming the file.
- `check_model_folder`: the tokenizer reads config.json's special token ids (`image_token_id`, `video_token_id`,
  `vision_start_token_id`, `vision_end_token_id`: the names of all three families, ftloop.family) as the tokens
  ftloop writes for them, holds the ChatML tokens, and has no more tokens than the embedding has rows; the image
  processor's patch, merge and temporal sizes are the vision config's. Each disagreement is one ConfigError line:
  the folder, the files, the field, both values, what to do. Pure: it reads only the loaded objects (and, to name a
  file, which of them the folder holds), so every rank reaches the same verdict with no collective.
- `read_config`: config.json, one line when it cannot be read, when transformers rejects a field (a
  `num_hidden_layers` that disagrees with `layer_types`, a field of the wrong type) or its family is not trained.
- `read_model_folder`: config, tokenizer and image processor, loaded and checked (`python -m ftloop.data.check`).
- `input_fingerprints` / `check_same_inputs`: what a checkpoint's trainer_state.json records of the tokenizer and
  image processor (ftloop.policies.Saver writes it), and the resume's refusal of others: a checkpoint trained on
  one tokenizer's ids and continued with another's (two ids swapped) would train on nonsense without an error.
"""

from __future__ import annotations

import json
import os

from transformers import AutoConfig, PretrainedConfig

from ftloop.data.check_cache import tokenizer_fingerprint
from ftloop.data.encode import (IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START,
                                load_tokenizer_and_processor)
from ftloop.errors import ConfigError, one_line
from ftloop.family import check_supported

# config.json's special token ids (the same names in Qwen2-VL, Qwen2.5-VL and Qwen3-VL) and the token each must be
CONFIG_TOKENS = {"image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD, "vision_start_token_id": VISION_START,
                 "vision_end_token_id": VISION_END}
CHAT_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)  # what ftloop.data.encode writes
# (the image processor's attribute, the vision config's field): how images are cut into patches and tokens
PROCESSOR_SIZES = (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                   ("temporal_patch_size", "temporal_patch_size"))
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # any one: a tokenizer's vocabulary
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # the latter may nest the image processor's
SAME_CHECKPOINT = "take config.json, the tokenizer files and preprocessor_config.json from the same checkpoint"

INPUTS = "inputs"  # trainer_state.json's record of the tokenizer and image processor (`input_fingerprints`)
# The image processor's settings that decide the pixel values and token counts of an image. Not its class (PIL or
# torchvision backend, whichever is installed: the same output) nor its pixel limits (--min-pixels / --max-pixels
# may change on resume like any data flag; ftloop.fsdp.checkpoint refuses changed lengths where they decide which
# rows share a step).
PROCESSOR_SETTINGS = ("patch_size", "merge_size", "temporal_patch_size", "do_resize", "resample", "do_rescale",
                      "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _has_any(folder: str, names: tuple[str, ...]) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in names)


def read_config(name_or_path: str, flag: str = "--model-name-or-path") -> PretrainedConfig:
    """config.json of a folder or hub id, refused in one line when it cannot be read or fetched, when transformers
    rejects its fields, or when ftloop does not train its family (ftloop.family)."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{flag} {name_or_path}: cannot load its config ({one_line(err)}); "
            "give a local Qwen2-VL, Qwen2.5-VL or Qwen3-VL folder, or a hub id with network access or a filled HF "
            "cache"
        ) from None
    except Exception as err:  # noqa: BLE001 - a field transformers' config classes reject (huggingface_hub's
        # StrictDataclass validation errors, which carry the reason as their cause), or of a type they cannot use
        reason = err.__cause__ if err.__cause__ is not None and type(err).__module__.startswith("huggingface_hub") \
            else err
        raise ConfigError(f"{flag} {name_or_path}: transformers rejects its config.json ({one_line(reason, True)}); "
                          "correct that field, or take config.json from the checkpoint its weights were saved "
                          "with") from None
    check_supported(config.model_type, f"{flag} {name_or_path}")
    return config


def load_processing(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                    flag: str = "--model-name-or-path"):
    """(tokenizer, image processor) of a folder or hub id, as ftloop.data.encode.load_tokenizer_and_processor loads
    them, with one ConfigError line instead of a traceback or an empty tokenizer: a local folder without tokenizer
    files or preprocessor_config.json is said before anything loads, and any other failure to load is quoted."""
    if os.path.isdir(name_or_path):
        if not _has_any(name_or_path, TOKENIZER_FILES):
            raise ConfigError(f"{flag} {name_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:-1])} and "
                              "merges.txt), without which transformers builds a tokenizer of one token from "
                              "config.json alone; copy them from the checkpoint the model was trained from")
        if not _has_any(name_or_path, PROCESSOR_FILES):
            raise ConfigError(f"{flag} {name_or_path}: no {PROCESSOR_FILES[0]} (the image processor: patch, merge and "
                              "temporal sizes, pixel limits, normalisation); copy it from the checkpoint the model was "
                              "trained from")
    try:
        return load_tokenizer_and_processor(name_or_path, min_pixels, max_pixels)
    except ConfigError:  # --min-pixels / --max-pixels against the checkpoint's
        raise
    except Exception as err:  # noqa: BLE001 - a file that does not parse, a hub id offline, ...
        raise ConfigError(f"{flag} {name_or_path}: cannot load its tokenizer and image processor "
                          f"({one_line(err, with_type=True)}); check its tokenizer files and {PROCESSOR_FILES[0]}, "
                          "or copy them from the checkpoint the model was trained from") from None


def _token_of(tokenizer, token_id) -> str | None:
    """The token `token_id` stands for in `tokenizer`; None when it stands for none."""
    if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < len(tokenizer):
        return None
    try:
        token = tokenizer.convert_ids_to_tokens(token_id)
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        return None
    return token if isinstance(token, str) else None


def _id_of(tokenizer, token: str) -> int | None:
    """The id of `token` as one token of `tokenizer`; None when it has no such token (no id, or the unknown token's)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id if _token_of(tokenizer, token_id) == token else None


def check_model_folder(name_or_path: str, hf_config, tokenizer, image_processor,
                       flag: str = "--model-name-or-path") -> None:
    """One ConfigError line for the first way the folder's config.json, tokenizer and image processor disagree (see
    the module's docstring); nothing when they agree. The same verdict on every rank: no collective."""
    where = f"{flag} {name_or_path}"
    tokenizer_file = next((name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(name_or_path, name))),
                          "no tokenizer file" if os.path.isdir(name_or_path) else TOKENIZER_FILES[0])
    size = len(tokenizer)
    for field, token in CONFIG_TOKENS.items():
        token_id = getattr(hf_config, field, None)
        if token_id is None:
            continue
        found = _token_of(tokenizer, token_id)
        if found == token:
            continue
        own = _id_of(tokenizer, token)
        has = f"its {token} is id {own}" if own is not None else f"it has no {token}"
        if found is None:
            raise ConfigError(f"{where}: config.json's {field} is {token_id}, which is no token of its tokenizer "
                              f"({tokenizer_file}: {size} tokens; {has}): the tokenizer is another model's, or "
                              f"incomplete; {SAME_CHECKPOINT}")
        raise ConfigError(f"{where}: config.json's {field} is {token_id}, which its tokenizer ({tokenizer_file}) "
                          f"reads as {found}, not {token} ({has}); {SAME_CHECKPOINT}")
    for token in CHAT_TOKENS:
        if _id_of(tokenizer, token) is None:
            raise ConfigError(f"{where}: its tokenizer ({tokenizer_file}, {size} tokens) has no {token} token, which "
                              f"ftloop writes in every row (Qwen's chat format); give a Qwen-VL checkpoint's tokenizer "
                              "files")
    vocab_size = getattr(hf_config.get_text_config(), "vocab_size", None)
    if isinstance(vocab_size, int) and size > vocab_size:
        raise ConfigError(f"{where}: its tokenizer ({tokenizer_file}) has {size} tokens, more than config.json's "
                          f"vocab_size {vocab_size} (the embedding's rows): the ids past it have no embedding; "
                          f"{SAME_CHECKPOINT}")
    vision = hf_config.vision_config
    for attribute, field in PROCESSOR_SIZES:
        have, want = getattr(image_processor, attribute, None), getattr(vision, field, None)
        if have != want:
            raise ConfigError(f"{where}: {PROCESSOR_FILES[0]}'s {attribute} is {have}, config.json's "
                              f"vision_config.{field} {want}: the image processor would cut images into patches the "
                              f"vision tower does not read; {SAME_CHECKPOINT}")


def read_model_folder(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                      flag: str = "--model-name-or-path"):
    """(config, tokenizer, image processor) of a folder or hub id, each loaded in one line or refused in one, and
    checked to agree (`check_model_folder`); an unknown family is refused too (`read_config`)."""
    hf_config = read_config(name_or_path, flag)
    tokenizer, image_processor = load_processing(name_or_path, min_pixels, max_pixels, flag)
    check_model_folder(name_or_path, hf_config, tokenizer, image_processor, flag)
    return hf_config, tokenizer, image_processor


# ---- the inputs a checkpoint was trained with ------------------------------------------------------------------


def _canonical(value):
    """As it reads back from trainer_state.json (tuples become lists, enums their values)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def image_processor_fingerprint(image_processor) -> dict:
    """The image processor's settings that decide what an image becomes (PROCESSOR_SETTINGS)."""
    settings = image_processor.to_dict()
    return _canonical({key: settings.get(key) for key in PROCESSOR_SETTINGS})


def input_fingerprints(tokenizer, image_processor) -> dict:
    """What a checkpoint records of the tokenizer and image processor it was trained with, under trainer_state.json's
    INPUTS key: the tokenizer's size and the digest of its vocabulary, merges and added tokens (the row check's cache
    fingerprints it alike: ftloop.data.check_cache.tokenizer_fingerprint; not its class or folder, which a moved folder
    or another transformers version changes for the same ids), and `image_processor_fingerprint`."""
    identity = tokenizer_fingerprint(tokenizer)
    return _canonical({"tokenizer": {"size": identity["size"], "sha256": identity["sha256"]},
                       "image_processor": image_processor_fingerprint(image_processor)})


def _differences(then: dict, now: dict) -> str:
    return "; ".join(f"{key} {then.get(key)} then, {now.get(key)} now" for key in sorted(set(then) | set(now))
                     if then.get(key) != now.get(key))


def _tokenizer_said(identity: dict) -> str:
    return f"{identity.get('size')} tokens, vocabulary sha256 {str(identity.get('sha256'))[:12]}"


def check_same_inputs(path: str, saved_trainer_state: dict, tokenizer, image_processor) -> None:
    """One ConfigError line when checkpoint `path` (its trainer_state.json: `saved_trainer_state`) was saved with
    another tokenizer or image processor than this run loaded; a checkpoint that records none (an earlier ftloop's)
    is accepted."""
    then = saved_trainer_state.get(INPUTS)
    if not isinstance(then, dict):
        return
    now = input_fingerprints(tokenizer, image_processor)
    if "tokenizer" in then and then["tokenizer"] != now["tokenizer"]:
        raise ConfigError(f"--resume-from-checkpoint {path}: it was saved with another tokenizer "
                          f"({_tokenizer_said(then['tokenizer'])} then; {_tokenizer_said(now['tokenizer'])} now); "
                          "resume with the model folder it was trained with")
    if "image_processor" in then and then["image_processor"] != now["image_processor"]:
        raise ConfigError(f"--resume-from-checkpoint {path}: it was saved with another image processor "
                          f"({_differences(then['image_processor'], now['image_processor'])}); resume with the model "
                          "folder it was trained with")
