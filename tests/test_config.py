import json
import math

import pytest

from safetext.config import DISTANCE_SCALES, DISTANCES, MIXED_PRECISION, POSITIONS, AlignmentConfig


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("utility_positions", "everything", POSITIONS),
        ("effectiveness_positions", "everything", POSITIONS),
        ("utility_distance", "l1", DISTANCES),
        ("effectiveness_distance", "dot", DISTANCES),
        ("distance_scale", "log", DISTANCE_SCALES),
        ("mixed_precision", "fp8", MIXED_PRECISION),
    ],
)
def test_bad_choice_names_the_value_and_the_allowed_ones(name, value, allowed):
    with pytest.raises(ValueError) as error:
        AlignmentConfig(**{name: value})
    message = str(error.value)
    assert f"{name}={value!r}" in message
    assert all(option in message for option in allowed)


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("learning_rate", 0.0, "(0.0, 1.0]"),
        ("learning_rate", -1e-4, "(0.0, 1.0]"),
        ("learning_rate", 2.0, "(0.0, 1.0]"),
        ("learning_rate", math.nan, "(0.0, 1.0]"),
        ("effectiveness_weight", -0.5, "[0.0, inf)"),
        ("effectiveness_weight", math.inf, "[0.0, inf)"),
        ("heldout_fraction", 1.0, "[0.0, 1.0)"),
        ("heldout_fraction", -0.1, "[0.0, 1.0)"),
        ("adam_beta1", 1.0, "[0.0, 1.0)"),
        ("adam_beta2", -0.1, "[0.0, 1.0)"),
        ("adam_epsilon", 0.0, "(0.0, 1.0]"),
        ("weight_decay", -1.0, "[0.0, inf)"),
        ("max_grad_norm", 0.0, "(0.0, inf"),
        ("num_train_epochs", 0, ">= 1"),
        ("train_batch_size", 0, ">= 1"),
        ("train_batch_size", 2.5, ">= 1"),
        ("train_batch_size", True, ">= 1"),
        ("max_train_steps", 0, ">= 1"),
        ("safe_batch_size", -3, ">= 1"),
        ("checkpoints_total_limit", 0, ">= 1"),
        ("log_every", 0, ">= 1"),
        ("eval_batch_size", 0, ">= 1"),
        ("checkpointing_steps", -1, ">= 0"),
        ("seed", -1, ">= 0"),
        ("adversarial_epsilon", -0.1, "[0.0, inf)"),
        ("adversarial_epsilon", math.nan, "[0.0, inf)"),
        ("adversarial_steps", 0, ">= 1"),
        ("adversarial_layer", -1, ">= 0"),
        ("adversarial_layer", 1.5, ">= 0"),
    ],
)
def test_bad_number_names_the_value_and_the_allowed_range(name, value, allowed):
    with pytest.raises(ValueError) as error:
        AlignmentConfig(**{name: value})
    message = str(error.value)
    assert f"{name}={value!r}" in message
    assert allowed in message


def test_optional_settings_accept_none():
    config = AlignmentConfig(
        max_train_steps=None, safe_batch_size=None, checkpoints_total_limit=None, max_grad_norm=None
    )
    assert config.effective_safe_batch_size == config.train_batch_size


def test_safe_batch_size_defaults_to_the_unsafe_one():
    assert AlignmentConfig(train_batch_size=4).effective_safe_batch_size == 4
    assert AlignmentConfig(train_batch_size=4, safe_batch_size=6).effective_safe_batch_size == 6


def test_dict_round_trip_through_json():
    config = AlignmentConfig(
        effectiveness_weight=0.3,
        utility_distance="squared_l2",
        effectiveness_distance="cosine",
        utility_positions="no_bos",
        effectiveness_positions="prompt",
        distance_scale="absolute",
        learning_rate=2e-4,
        max_train_steps=7,
        safe_batch_size=3,
        max_grad_norm=None,
        seed=11,
    )
    values = json.loads(json.dumps(config.to_dict()))
    assert AlignmentConfig.from_dict(values) == config
    assert AlignmentConfig.from_dict(AlignmentConfig().to_dict()) == AlignmentConfig()


def test_unknown_keys_are_refused_by_name():
    values = dict(AlignmentConfig().to_dict(), lr=1e-3, batch=4)
    with pytest.raises(ValueError, match="unknown alignment settings: batch, lr"):
        AlignmentConfig.from_dict(values)


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="effectiveness_positions='middle'"):
        AlignmentConfig.from_dict({"effectiveness_positions": "middle"})


def test_every_field_has_help_text():
    from dataclasses import fields

    missing = [f.name for f in fields(AlignmentConfig) if not f.metadata.get("help")]
    assert missing == []


def test_pooled_weight_and_train_encoders_are_validated():
    with pytest.raises(ValueError, match=r"pooled_weight=-1\.0 .*\[0\.0, inf\)"):
        AlignmentConfig(pooled_weight=-1.0)
    for bad in ("text_encoder", [], ["text_encoder", 2]):
        with pytest.raises(ValueError, match="train_encoders=.*must be a non-empty list of component names"):
            AlignmentConfig(train_encoders=bad)
    with pytest.raises(ValueError, match="names an encoder twice"):
        AlignmentConfig(train_encoders=["text_encoder", "text_encoder"])
    # a tuple is kept as a list, so that the record's JSON gives back an equal config
    config = AlignmentConfig(train_encoders=("text_encoder", "text_encoder_2"))
    assert config.train_encoders == ["text_encoder", "text_encoder_2"]
    assert AlignmentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_lora_settings_are_validated():
    assert AlignmentConfig().lora_rank is None  # full fine-tuning by default
    assert AlignmentConfig(lora_rank=8).effective_lora_alpha == 8  # alpha defaults to the rank: scale 1
    assert AlignmentConfig(lora_rank=8, lora_alpha=16).effective_lora_alpha == 16
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="lora_rank=.* must be a whole number >= 1"):
            AlignmentConfig(lora_rank=bad)
    with pytest.raises(ValueError, match=r"lora_alpha=0 is out of range; it must lie in \(0.0, inf\)"):
        AlignmentConfig(lora_rank=4, lora_alpha=0)
    with pytest.raises(ValueError, match=r"lora_dropout=1.0 is out of range; it must lie in \[0.0, 1.0\)"):
        AlignmentConfig(lora_rank=4, lora_dropout=1.0)
    for bad in ("q_proj", [], ["q_proj", ""]):
        with pytest.raises(ValueError, match="lora_target_modules=.* must be a non-empty list of module names"):
            AlignmentConfig(lora_rank=4, lora_target_modules=bad)
    # LoRA settings without a rank would be silently ignored: refused instead
    for settings in ({"lora_alpha": 8}, {"lora_target_modules": ["q_proj"]}, {"lora_dropout": 0.1}):
        with pytest.raises(ValueError, match="needs lora_rank"):
            AlignmentConfig(**settings)
    with pytest.raises(ValueError, match="gradient_checkpointing='yes' must be true or false"):
        AlignmentConfig(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="train_embeddings=0 must be true or false"):
        AlignmentConfig(train_embeddings=0)
    config = AlignmentConfig(lora_rank=4, lora_target_modules=("q_proj", "v_proj"), gradient_checkpointing=True)
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert AlignmentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
