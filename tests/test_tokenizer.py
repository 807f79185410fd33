"""The embedded mini-sd tokenizer behaves like Stable Diffusion 1.x's (openai/clip-vit-large-patch14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import CLIPTokenizer, CLIPTokenizerFast  # type: ignore[attr-defined]  # absent from 5.x stubs

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "lab" / "dvar_lab" / "assets" / "mini-sd" / "tokenizer"
BOS, EOS = 49406, 49407

# (text, ids without BOS/EOS) as the SD 1.x tokenizer gives them.
KNOWN = [
    ("a", [320]),
    ("photo", [1125]),
    ("sks", [48136]),
    ("ktn", [74, 7248]),  # not a single token in CLIP's vocabulary: "k" + "tn</w>"
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("a photo of sks dog", [320, 1125, 539, 48136, 1929]),
    ("hello world", [3306, 1002]),
    ("A Photo of a CAT!", [320, 1125, 539, 320, 2368, 256]),  # lower-cased; "!" is its own token
    ("Hello,   world!", [3306, 267, 1002, 256]),  # runs of spaces collapse
]

# Both classes when the installed transformers has a separate fast tokenizer (4.x);
# from 5.0 on they are one class, tested once.
CLASSES = list(dict.fromkeys([CLIPTokenizer, CLIPTokenizerFast]))


@pytest.fixture(scope="module", params=CLASSES, ids=lambda cls: cls.__name__)
def tokenizer(request: pytest.FixtureRequest) -> CLIPTokenizer:
    return request.param.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def test_folder_holds_exactly_the_files_from_pretrained_needs() -> None:
    names = {p.name for p in TOKENIZER_DIR.iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}


def test_vocab_and_merges_have_clip_sizes_and_layout() -> None:
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text("utf-8"))
    merges = (TOKENIZER_DIR / "merges.txt").read_text("utf-8").splitlines()
    assert len(vocab) == 49408 == len(set(vocab.values()))
    assert sorted(vocab.values()) == list(range(49408))
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (
        0,
        256,
        BOS,
        EOS,
    )
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + 48894
    assert merges[1:3] == ["i n", "t h"]


def test_special_tokens_and_max_length(tokenizer: CLIPTokenizer) -> None:
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|startoftext|>", BOS)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", EOS)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", EOS)
    assert tokenizer.unk_token == "<|endoftext|>"


@pytest.mark.parametrize(("text", "ids"), KNOWN, ids=[t for t, _ in KNOWN])
def test_known_prompts_give_sd_token_ids(tokenizer: CLIPTokenizer, text: str, ids: list[int]) -> None:
    assert tokenizer(text).input_ids == [BOS, *ids, EOS]


def test_pads_to_77_with_endoftext_and_truncates_long_prompts(tokenizer: CLIPTokenizer) -> None:
    padded = tokenizer(
        "a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length
    ).input_ids
    assert len(padded) == 77
    assert padded[:7] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert padded[7:] == [EOS] * 70

    long = tokenizer("cat " * 100, truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[0] == BOS and long[-1] == EOS


def test_decode_inverts_encode(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("a photo of sks dog").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of sks dog"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_adding_a_placeholder_token_gives_it_the_next_id(cls: type[CLIPTokenizer]) -> None:
    tokenizer = cls.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    assert tokenizer.add_tokens("<my-cat>") == 1
    assert tokenizer.convert_tokens_to_ids("<my-cat>") == 49408
    assert len(tokenizer) == 49409
    assert tokenizer("a photo of <my-cat>").input_ids == [BOS, 320, 1125, 539, 49408, EOS]
