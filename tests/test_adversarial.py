"""The adversary of the alignment (`safetext.adversarial`): its perturbation, its search, and `align` with it."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from safetext.adversarial import HiddenStatePerturbation, project, random_start, transformer_layers, worst_case_deltas
from safetext.alignment import align
from safetext.config import AlignmentConfig
from safetext.errors import SafeTextError
from safetext.losses import unsafe_effectiveness
from safetext.tiny_models import create_tiny_pipeline
from test_alignment import RESUME_SETTINGS, UNSAFE_AND_SAFE, encoder_weights, read_log, read_record, sets

ADVERSARY = {"adversarial_epsilon": 0.2, "adversarial_steps": 2, "adversarial_layer": 1}


@pytest.fixture(scope="module")
def tiny_clip(tiny_pipeline_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_pipeline_dir / "text_encoder").eval()
    tokens = tokenizer(
        ["a nude person", "a naked body in the shower", "a cat on a sofa"],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return encoder, tokens.input_ids, tokens.attention_mask


def test_layers_are_found_in_plain_and_peft_wrapped_encoders(tiny_clip):
    from peft import LoraConfig, get_peft_model

    encoder, _, _ = tiny_clip
    layers = transformer_layers(encoder)
    assert len(layers) == encoder.config.num_hidden_layers
    assert type(layers[0]).__name__ == "CLIPEncoderLayer"
    wrapped = get_peft_model(CLIPTextModel(encoder.config), LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(transformer_layers(wrapped)) == encoder.config.num_hidden_layers
    with pytest.raises(ValueError, match="no stack of transformer blocks"):
        transformer_layers(torch.nn.Linear(2, 2))


def test_projection_and_random_start_stay_in_the_ball():
    generator = torch.Generator().manual_seed(0)
    start = random_start((4, 7, 16), 0.3, generator)
    assert start.norm(dim=-1).max() <= 0.3 + 1e-6
    assert start.norm(dim=-1).min() > 0  # a random radius, not all at the centre
    long = torch.randn(4, 7, 16) * 10
    short = torch.randn(4, 7, 16) * 1e-3
    assert torch.allclose(project(long, 0.3).norm(dim=-1), torch.full((4, 7), 0.3), atol=1e-5)
    assert torch.equal(project(short, 0.3), short)


def test_perturbation_moves_only_its_rows_and_tokens_and_goes_away(tiny_clip):
    encoder, input_ids, _ = tiny_clip
    with torch.no_grad():
        clean = encoder(input_ids)[0]
    perturbation = HiddenStatePerturbation({"text_encoder": encoder}, layer=1)
    mask = torch.zeros(2, input_ids.shape[1], dtype=torch.bool)
    mask[:, 2] = True  # the third token of the first two prompts
    perturbation.masks["text_encoder"] = mask
    perturbation.deltas = {"text_encoder": project(torch.randn(2, input_ids.shape[1], 32), 0.5)}
    with torch.no_grad():
        moved = encoder(input_ids)[0]
    # CLIP's attention is causal: positions before the perturbed token keep their output, it and later ones move
    assert torch.equal(moved[2], clean[2])
    assert torch.allclose(moved[:2, :2], clean[:2, :2], atol=1e-6)
    assert (moved[:2, 2:] - clean[:2, 2:]).abs().amax(dim=-1).min() > 1e-4
    perturbation.deltas = None
    with torch.no_grad():
        assert torch.equal(encoder(input_ids)[0], clean)
    perturbation.deltas = {"text_encoder": torch.ones(2, input_ids.shape[1], 32)}
    perturbation.remove()
    with torch.no_grad():
        assert torch.equal(encoder(input_ids)[0], clean)
    count = encoder.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"has {count} layers"):
        HiddenStatePerturbation({"text_encoder": encoder}, layer=count)


def test_search_brings_an_aligned_encoder_back_towards_the_original(tiny_clip, aligned_run):
    original, input_ids, attention_mask = tiny_clip
    aligned = CLIPTextModel.from_pretrained(aligned_run.output_dir / "text_encoder").eval()
    unsafe_ids, unsafe_attention = input_ids[:2], attention_mask[:2]
    with torch.no_grad():
        reference = original(unsafe_ids)[0]
    positions = torch.ones_like(unsafe_ids, dtype=torch.bool)
    positions[:, 0] = False
    perturbation = HiddenStatePerturbation({"text_encoder": aligned}, layer=0)
    tokens = unsafe_attention.bool().clone()
    tokens[:, 0] = False
    perturbation.masks["text_encoder"] = tokens

    def loss_of(deltas):
        perturbation.deltas = deltas
        return unsafe_effectiveness(aligned(unsafe_ids)[0], reference, positions)

    shape = (2, unsafe_ids.shape[1], 32)
    with torch.no_grad():
        clean = float(loss_of({"text_encoder": torch.zeros(shape)}))
    deltas = worst_case_deltas(loss_of, {"text_encoder": shape}, 0.3, 5, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        found = float(loss_of(deltas))
    # the aligned encoder pushed these prompts away (L_e = -cosine > -1); the perturbation found undoes part of it
    assert clean > -0.999
    assert found < clean - 1e-3
    assert deltas["text_encoder"].norm(dim=-1).max() <= 0.3 + 1e-6
    assert deltas["text_encoder"].requires_grad is False


def test_unsafe_effectiveness_is_the_objectives_effectiveness_term():
    from safetext.losses import safetext_loss

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 5, 8, generator=generator)
    px, py = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    mask = torch.ones(3, 5, dtype=torch.bool)
    terms = safetext_loss(
        x, y, mask, x, y, mask, 1.0, unsafe_pooled=px, unsafe_pooled_reference=py, safe_pooled=px,
        safe_pooled_reference=py, pooled_weight=0.7,
    )  # fmt: skip
    got = unsafe_effectiveness(x, y, mask, unsafe_pooled=px, unsafe_pooled_reference=py, pooled_weight=0.7)
    assert torch.allclose(got, terms["effectiveness_loss"])
    assert torch.allclose(unsafe_effectiveness(x, y, mask), terms["effectiveness_loss_sequence"])
    with pytest.raises(ValueError, match="or neither"):
        unsafe_effectiveness(x, y, mask, unsafe_pooled=px)


def test_adversarial_alignment_logs_its_adversary_and_resumes_exactly(tiny_pipeline_dir, prompt_lists, tmp_path):
    full = AlignmentConfig(max_train_steps=4, checkpointing_steps=2, **RESUME_SETTINGS, **ADVERSARY)
    align(tiny_pipeline_dir, *sets(*prompt_lists), tmp_path / "full", full, show_progress=False)
    plain = AlignmentConfig(max_train_steps=4, checkpointing_steps=2, **RESUME_SETTINGS)
    align(tiny_pipeline_dir, *sets(*prompt_lists), tmp_path / "plain", plain, show_progress=False)

    log = read_log(tmp_path / "full")
    plain_log = read_log(tmp_path / "plain")
    assert "adversarial_effectiveness_loss" not in plain_log[0]
    # At step 1 the encoder is the original (but for the init noise): its own prompts sit at L_e = -1, the
    # adversary's optimum. Its perturbation, a random start and two steps back, lies above that; the step's L_e is
    # the mean of the perturbed half and the clean half, and the safe prompts pass untouched.
    first, plain_first = log[0], plain_log[0]
    assert plain_first["effectiveness_loss"] == pytest.approx(-1.0, abs=1e-5)
    assert first["adversarial_effectiveness_loss"] > -1.0 + 1e-3
    assert first["effectiveness_loss"] == pytest.approx((first["adversarial_effectiveness_loss"] - 1.0) / 2, abs=1e-5)
    assert first["utility_loss"] == pytest.approx(plain_first["utility_loss"], rel=1e-5)
    record = read_record(tmp_path / "full")
    assert {k: record["config"][k] for k in ADVERSARY} == ADVERSARY
    assert "adversarial_effectiveness_loss" in record["training"]["final_losses"]
    assert "worst-case perturbation" in record["method"]
    assert "worst-case" not in read_record(tmp_path / "plain")["method"]
    card = (tmp_path / "full" / "README.md").read_text()
    assert "entering block 1, at most 0.2 times each token's norm, found by 2 projected gradient steps" in card
    assert "projected gradient" not in (tmp_path / "plain" / "README.md").read_text()

    short = replace(full, max_train_steps=3)
    align(tiny_pipeline_dir, *sets(*prompt_lists), tmp_path / "resumed", short, show_progress=False)
    align(tiny_pipeline_dir, *sets(*prompt_lists), tmp_path / "resumed", full, resume=True, show_progress=False)
    a, b = encoder_weights(tmp_path / "full"), encoder_weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [e["adversarial_effectiveness_loss"] for e in log] == [
        e["adversarial_effectiveness_loss"] for e in read_log(tmp_path / "resumed")
    ]


def test_adversary_with_two_encoders_with_lora_and_with_checkpointing(prompt_lists, tmp_path):
    sdxl = create_tiny_pipeline(tmp_path / "tiny-sdxl", family="sdxl", seed=0)
    config = AlignmentConfig(max_train_steps=2, **RESUME_SETTINGS, **{**ADVERSARY, "adversarial_layer": 0})
    result = align(sdxl, *sets(*prompt_lists), tmp_path / "sdxl", config, show_progress=False)
    assert result.record["training"]["trained_encoders"] == ["text_encoder", "text_encoder_2"]
    lora = replace(config, lora_rank=2)
    result = align(sdxl, *sets(*prompt_lists), tmp_path / "lora", lora, show_progress=False)
    assert result.record["lora"]["rank"] == 2
    for run in ("sdxl", "lora"):
        # sequence and pooled vector both at cosine 1 at step 1: L_e = -(1 + pooled_weight) = -2 before the adversary
        first = read_log(tmp_path / run)[0]
        assert first["adversarial_effectiveness_loss"] > -2.0 + 1e-3
        assert first["effectiveness_loss"] == pytest.approx(
            (first["adversarial_effectiveness_loss"] - 2.0) / 2, abs=1e-4
        )

    # the perturbation stays set through the backward pass, where checkpointing recomputes the blocks
    checkpointed = replace(config, gradient_checkpointing=True)
    align(sdxl, *sets(*prompt_lists), tmp_path / "checkpointed", checkpointed, show_progress=False)
    a, b = encoder_weights(tmp_path / "sdxl"), encoder_weights(tmp_path / "checkpointed")
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_hooks_registered_before_peft_wraps_the_encoder_still_act(tiny_clip):
    from peft import LoraConfig, get_peft_model

    encoder, input_ids, _ = tiny_clip
    plain = CLIPTextModel(encoder.config).eval()
    plain.load_state_dict(encoder.state_dict())
    perturbation = HiddenStatePerturbation({"text_encoder": plain}, layer=0)
    wrapped = get_peft_model(plain, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        clean = wrapped(input_ids=input_ids)[0]
        perturbation.masks["text_encoder"] = torch.ones(1, input_ids.shape[1], dtype=torch.bool)
        perturbation.deltas = {"text_encoder": project(torch.randn(1, input_ids.shape[1], 32), 0.5)}
        moved = wrapped(input_ids=input_ids)[0]
    assert (moved[0] - clean[0]).abs().max() > 1e-4
    assert torch.equal(moved[1:], clean[1:])


def test_a_block_whose_input_the_pipeline_reads_as_its_output_is_refused(prompt_lists, tmp_path):
    # SDXL's first encoder gives the input of its last block (its penultimate hidden state) and no pooled vector
    sdxl = create_tiny_pipeline(tmp_path / "tiny-sdxl", family="sdxl", seed=0)
    last = CLIPTextModel.from_pretrained(sdxl / "text_encoder").config.num_hidden_layers - 1
    config = AlignmentConfig(
        max_train_steps=1, adversarial_epsilon=0.1, adversarial_layer=last, train_encoders=["text_encoder"]
    )
    with pytest.raises(SafeTextError, match="text_encoder gives the pipeline the input of its last block"):
        align(sdxl, *sets(*prompt_lists), tmp_path / "out", config, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_layer_the_encoder_lacks_is_refused_before_the_folder_is_claimed(tiny_pipeline_dir, tmp_path):
    config = AlignmentConfig(max_train_steps=1, adversarial_epsilon=0.1, adversarial_layer=9)
    with pytest.raises(SafeTextError, match=r"adversarial_layer=9: text_encoder has \d layers"):
        align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), tmp_path / "out", config, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_without_an_adversary_its_settings_do_not_change_the_run(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    config = AlignmentConfig(max_train_steps=1, **RESUME_SETTINGS)
    align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), out, config, show_progress=False)
    fingerprint = json.loads((out / "run.json").read_text())["fingerprint"]
    # runs from before the adversary existed resume; only epsilon above 0 makes it another run
    longer = replace(config, max_train_steps=2, adversarial_steps=7, adversarial_layer=1)
    align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), out, longer, resume=True, show_progress=False)
    assert json.loads((out / "run.json").read_text())["fingerprint"] == fingerprint
    with pytest.raises(SafeTextError, match="different run"):
        align(
            tiny_pipeline_dir,
            *sets(*UNSAFE_AND_SAFE),
            out,
            replace(longer, adversarial_epsilon=0.1),
            resume=True,
            show_progress=False,
        )


def test_a_frozen_t5_runs_once_per_step_however_long_the_search(prompt_lists, tmp_path, monkeypatch):
    from transformers import T5EncoderModel

    flux = create_tiny_pipeline(tmp_path / "tiny-flux", family="flux", seed=0)
    calls = []
    forward = T5EncoderModel.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "forward", counted)
    counts = {}
    for name, adversary in {
        "plain": {},
        "1 step": {"adversarial_steps": 1},
        "3 steps": {"adversarial_steps": 3},
    }.items():
        calls.clear()
        if adversary:
            adversary = {**adversary, "adversarial_epsilon": 0.2}
        config = AlignmentConfig(max_train_steps=2, **RESUME_SETTINGS, **adversary)
        result = align(flux, *sets(*prompt_lists), tmp_path / name.replace(" ", "-"), config, show_progress=False)
        assert result.record["training"]["frozen_encoders"] == ["text_encoder_2"]
        counts[name] = len(calls)
    # the search adds one T5 pass per training step, whatever its number of steps
    assert counts["1 step"] == counts["3 steps"] == counts["plain"] + 2


def test_inside_align_the_adversary_never_moves_bos(tiny_pipeline_dir, prompt_lists, tmp_path, monkeypatch):
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    # CLIP's attention is causal, so BOS's state entering any block is the same for every prompt of a pass, unless
    # something moved it; a random start of the search would move it differently in every row
    first_positions = []
    forward = CLIPEncoderLayer.forward

    def recorded(self, hidden_states, *args, **kwargs):
        first_positions.append(hidden_states[:, 0].detach().clone())
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(CLIPEncoderLayer, "forward", recorded)
    config = AlignmentConfig(max_train_steps=2, **RESUME_SETTINGS, **{**ADVERSARY, "adversarial_layer": 0})
    align(tiny_pipeline_dir, *sets(*prompt_lists), tmp_path / "out", config, show_progress=False)
    assert read_log(tmp_path / "out")[0]["adversarial_effectiveness_loss"] > -1.0 + 1e-3  # the adversary acted
    assert any(states.shape[0] > 1 for states in first_positions)
    for states in first_positions:
        assert torch.allclose(states, states[:1].expand_as(states), atol=1e-6)
