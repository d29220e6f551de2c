import json
import sys

import pytest
from transformers import CLIPTokenizer

from safetext.clip_tokenizer import build_clip_tokenizer
from safetext.errors import SafeTextError

# Token ids that Stable Diffusion v1.x's published tokenizer gives (its tokenizer/vocab.json and merges.txt).
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_vocabulary_and_special_tokens_match_sd(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 49407
    # The byte alphabet comes first (printable bytes in order), then the same with the end-of-word marker.
    assert tokenizer.convert_ids_to_tokens([0, 255, 256, 320, 511]) == ["!", "Ń", "!</w>", "a</w>", "Ń</w>"]


def test_known_prompts_give_sd_token_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer("a photo of an astronaut riding a horse on mars").input_ids == ASTRONAUT_IDS
    # CLIP lowercases and collapses whitespace before BPE.
    assert tokenizer("A  Photo\tof a CAT").input_ids == CAT_IDS


def test_padding_to_max_length_uses_endoftext(tokenizer):
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert ids == CAT_IDS + [49407] * (77 - len(CAT_IDS))


def test_long_prompt_is_truncated_to_77_tokens_ending_in_eos(tokenizer):
    prompt = "a photo of a cat " * 40
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:6] == CAT_IDS[1:-1]


def test_written_files_are_the_hugging_face_layout(tmp_path):
    build_clip_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + 48894
    assert merges[1] == "i n"
    # Every merge produces the token that sits 512 ids after the 256 + 256 byte tokens.
    assert vocab["in"] == 512
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_save_pretrained_round_trip_keeps_ids_and_max_length(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 77
    assert reloaded.pad_token_id == 49407
    assert reloaded("a photo of a cat").input_ids == CAT_IDS
    assert reloaded.get_vocab() == tokenizer.get_vocab()


def test_custom_model_max_length(tmp_path):
    tokenizer = build_clip_tokenizer(tmp_path, model_max_length=16)
    ids = tokenizer("a photo of a cat " * 10, truncation=True).input_ids
    assert len(ids) == 16 and ids[-1] == 49407


def test_missing_open_clip_raises_with_install_hint(tmp_path, monkeypatch):
    # A None entry in sys.modules is how Python marks a package as unimportable; find_spec then returns None.
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(SafeTextError, match="pip install --no-deps open_clip_torch==3.3.0"):
        build_clip_tokenizer(tmp_path)
