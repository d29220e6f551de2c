"""The CLIP tokenizer of Stable Diffusion v1.x, derived offline from OpenAI's BPE file.

No tokenizer can be downloaded here, but `open_clip_torch` ships OpenAI's byte-pair-encoding file
(`bpe_simple_vocab_16e6.txt.gz`). The Hugging Face `vocab.json` + `merges.txt` built from it the way OpenAI's
`SimpleTokenizer` builds its vocabulary are the ones every SD v1.x checkpoint carries in `tokenizer/`.
"""

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

from safetext.errors import SafeTextError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408

# OpenAI's SimpleTokenizer keeps merges[1 : 49152 - 256 - 2 + 1] of the file: the first line is a header, and
# 49152 - 256 - 2 merges fill the vocabulary up to 49,152 minus the two special tokens (the 256 byte tokens
# appear twice, with and without "</w>", which is why the total ends up at 49,408).
_NUM_MERGES = 49152 - 256 - 2
_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"


def _find_bpe_file() -> Path:
    # find_spec does not execute open_clip/__init__.py, which imports torchvision (absent beside the CPU torch).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SafeTextError(
            "the CLIP tokenizer is derived from open_clip's BPE file: run `pip install --no-deps open_clip_torch==3.3.0`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _BPE_FILENAME
        if path.is_file():
            return path
    raise SafeTextError(
        f"open_clip is installed but has no {_BPE_FILENAME}: run `pip install --no-deps open_clip_torch==3.3.0`"
    )


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the other bytes are shifted to
    # code points from 256 upwards so that no token contains whitespace or control characters. The dict
    # order (printable bytes first) is the order of the first 256 vocabulary ids.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _read_merges(bpe_file: Path) -> list[tuple[str, str]]:
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise SafeTextError(f"{bpe_file} is not OpenAI's CLIP BPE file: expected {_NUM_MERGES} merge pairs")
    return merges


def _build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise SafeTextError(f"derived CLIP vocabulary has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab


def build_clip_tokenizer(save_directory: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write the Stable Diffusion v1.x CLIP tokenizer into a folder and load it from there.

    The vocabulary (49,408 tokens, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407) and merges are derived
    from OpenAI's BPE file that `open_clip_torch` ships; padding uses `<|endoftext|>`, as SD v1.4's tokenizer
    does. The folder holds `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json`,
    so `CLIPTokenizer.from_pretrained(save_directory)` loads it again.

    Args:
        save_directory (`str` or `pathlib.Path`):
            Folder to write the tokenizer files into; created if missing, files of the same name are replaced.
        model_max_length (`int`, *optional*, defaults to 77):
            Longest sequence the text encoder accepts (its `max_position_embeddings`). Pipelines pad and
            truncate prompts to this length, so it must not exceed the text encoder's.

    Returns:
        `transformers.CLIPTokenizer`: the tokenizer loaded from `save_directory`.

    Raises:
        `SafeTextError`: if `open_clip_torch` (the source of the BPE file) is not installed.
    """
    merges = _read_merges(_find_bpe_file())
    vocab = _build_vocab(merges)

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    (save_directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (save_directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special_tokens,
    }
    (save_directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    (save_directory / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2), encoding="utf-8")

    # Passing model_max_length again guards against a config that lost it: without it transformers falls back
    # to a huge default, prompts are not truncated, and the text encoder's position embeddings overflow.
    return CLIPTokenizer.from_pretrained(save_directory, model_max_length=model_max_length)
