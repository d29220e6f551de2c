"""Our conditioning tensor against the pipeline's own `encode_prompt`, and the position masks."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from safetext.conditioning import TextConditioner, position_mask
from safetext.loading import load_text_encoder

PROMPTS = [
    "a photo of a cat",
    "",
    "A Painting Of A Lighthouse, by Turner!",
    # 120 words: longer than the 77-token window, cut by the pipeline and by us
    " ".join(["a red house beside a blue river"] * 17),
]


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dir):
    return load_text_encoder(tiny_pipeline_dir)


def test_encoding_equals_the_pipelines_encode_prompt(pipeline, loaded):
    conditioner = TextConditioner.for_encoder(loaded.tokenizer, loaded.text_encoder, bare=loaded.bare)
    assert conditioner.max_length == 77 and not conditioner.pass_attention_mask
    tokens = conditioner.tokenize(PROMPTS)
    ours = conditioner.encode_all(loaded.text_encoder, tokens, batch_size=3)
    with torch.no_grad():
        theirs, negative = pipeline.encode_prompt(
            PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert negative is None
    assert ours.shape == theirs.shape == (len(PROMPTS), 77, 32)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_gradient_encoding_equals_the_no_grad_one(loaded):
    conditioner = TextConditioner.for_encoder(loaded.tokenizer, loaded.text_encoder, bare=False)
    tokens = conditioner.tokenize(PROMPTS[:2])
    with torch.no_grad():
        direct = conditioner.encode(loaded.text_encoder, tokens)
    assert torch.equal(direct, conditioner.encode_all(loaded.text_encoder, tokens, batch_size=1))


def test_tokenize_counts_truncated_prompts(loaded):
    conditioner = TextConditioner.for_encoder(loaded.tokenizer, loaded.text_encoder, bare=False)
    tokens = conditioner.tokenize(PROMPTS)
    assert tokens.truncated == 1
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (4, 77)
    # the long prompt fills the window and ends with EOS, as the pipeline's truncation leaves it
    assert tokens.attention_mask[3].all() and tokens.input_ids[3, -1].item() == loaded.tokenizer.eos_token_id
    # "a photo of a cat": BOS, five words, EOS, then padding
    assert tokens.input_ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokens.attention_mask[0].tolist() == [1] * 7 + [0] * 70
    assert tokens.select([3]).truncated == 0 and len(tokens.select([0, 1])) == 2


def test_attention_mask_is_passed_when_the_config_asks(loaded):
    # `use_attention_mask` is how some SD 2.x-era configs ask for the mask; the pipeline follows it, so do we.
    loaded.text_encoder.config.use_attention_mask = True
    try:
        conditioner = TextConditioner.for_encoder(loaded.tokenizer, loaded.text_encoder, bare=False)
    finally:
        del loaded.text_encoder.config.use_attention_mask
    assert conditioner.pass_attention_mask


ATTENTION = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])


def test_position_mask_all():
    assert position_mask(ATTENTION, "all").tolist() == [[True] * 5] * 3


def test_position_mask_no_bos():
    assert position_mask(ATTENTION, "no_bos").tolist() == [[False] + [True] * 4] * 3


def test_position_mask_prompt():
    assert position_mask(ATTENTION, "prompt").tolist() == [
        [False, True, True, False, False],
        [False, True, True, True, True],
        [False, True, False, False, False],
    ]
    # the input is not modified
    assert ATTENTION[0, 0].item() == 1


def test_position_mask_refuses_unknown_positions():
    with pytest.raises(ValueError, match="positions='eos'.*all, no_bos, prompt"):
        position_mask(ATTENTION, "eos")


def test_prompt_positions_of_real_tokens(loaded):
    conditioner = TextConditioner.for_encoder(loaded.tokenizer, loaded.text_encoder, bare=False)
    tokens = conditioner.tokenize(["a photo of a cat"])
    mask = position_mask(tokens.attention_mask, "prompt")
    # positions 1..6: the five words and EOS
    assert mask[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5, 6]


def test_bare_encoder_pads_to_77_and_passes_its_attention_mask(tiny_bert_dir):
    bert = load_text_encoder(tiny_bert_dir)
    assert bert.bare
    conditioner = TextConditioner.for_encoder(bert.tokenizer, bert.text_encoder, bare=True)
    assert conditioner.pass_attention_mask and conditioner.max_length == 77
    tokens = conditioner.tokenize(["a photo of a cat", "a dog"])
    embeddings = conditioner.encode_all(bert.text_encoder, tokens, batch_size=2)
    with torch.no_grad():
        expected = bert.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert embeddings.shape == (2, 77, 32)
    assert torch.equal(embeddings, expected)
