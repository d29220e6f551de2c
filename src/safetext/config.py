"""Configuration of a SafeText alignment run: every knob, with its paper symbol where it has one."""

import math
from dataclasses import asdict, dataclass, field, fields

DISTANCES = ("l2", "squared_l2", "cosine", "negcosine")
POSITIONS = ("all", "no_bos", "prompt")
DISTANCE_SCALES = ("relative", "absolute")
MIXED_PRECISION = ("no", "fp16", "bf16")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}")


def _check_range(name, value, low, high, low_inclusive=True, high_inclusive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive and math.isfinite(high) else ")"
        raise ValueError(f"{name}={value!r} is out of range; it must lie in {lo}{low}, {high}{hi}")


@dataclass
class AlignmentConfig:
    """Settings of one SafeText alignment run.

    The objective is `L_u - lambda * L_e` (SafeText, arXiv 2502.20623): L_u holds the embeddings of safe prompts
    where the original encoder put them, L_e pushes the embeddings of unsafe prompts away from theirs.

    Defaults were chosen by measurement on a real pretrained encoder (see `docs/defaults.md`).
    """

    effectiveness_weight: float = field(
        default=0.5,
        metadata={
            "help": "weight of the effectiveness term, lambda in the objective L_u - lambda * L_e. With "
            "distance_scale='relative' it is comparable across encoders."
        },
    )
    utility_distance: str = field(
        default="l2", metadata={"help": f"distance d_u of the utility term, one of {DISTANCES} (paper: l2)"}
    )
    effectiveness_distance: str = field(
        default="negcosine",
        metadata={"help": f"distance d_e of the effectiveness term, one of {DISTANCES} (paper: negcosine)"},
    )
    utility_positions: str = field(
        default="all",
        metadata={
            "help": "token positions of the 77 x d conditioning tensor that enter the utility distance d_u: 'all', "
            "'no_bos' (every position but BOS, whose output is the same for every prompt under CLIP's causal "
            "attention) or 'prompt' (the prompt's own tokens through EOS). 'all' holds everything the diffusion "
            "model attends to in place for safe prompts"
        },
    )
    effectiveness_positions: str = field(
        default="no_bos",
        metadata={
            "help": "token positions that enter the effectiveness distance d_e (same choices); BOS cannot tell an "
            "unsafe prompt from a safe one, so 'no_bos' spends the push where the prompt's content is"
        },
    )
    distance_scale: str = field(
        default="relative",
        metadata={
            "help": "'relative' divides l2 distances by the norm of the reference embedding, so that L_u is "
            "unit-free like a cosine and lambda carries over between encoders; 'absolute' is the paper's raw distance"
        },
    )
    pooled_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight w of the pooled vector's distances against the sequence's, in both terms (SDXL, SD3 and "
            "FLUX give the denoiser a pooled vector beside the token sequence; SD has none). The default 1 weighs the "
            "two inputs of the denoiser alike: with relative distances and the cosine, both terms are unit-free, so a "
            "10 percent move of the pooled vector counts as much as a 10 percent move of the sequence. For FLUX with T5 frozen "
            "the pooled vector is the only part that can move; a small w would leave its prompts nearly untouched"
        },
    )
    train_encoders: list[str] | None = field(
        default=None,
        metadata={
            "help": "component names of the text encoders to train, e.g. ['text_encoder', 'text_encoder_2']; None: "
            "every CLIP encoder of the family. T5 (SD3's text_encoder_3, FLUX's text_encoder_2) stays frozen unless "
            "named: T5-XXL has 4.7 B parameters, more than the rest of the text side together, and frozen encoders "
            "still give their unchanged part of the conditioning, inside both terms"
        },
    )
    lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "rank r of LoRA adapters (peft) trained in place of the encoders' weights; None: full fine-tuning "
            "of every weight of the trained encoders, the paper's method"
        },
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "LoRA scaling alpha (the update is alpha / r * B A); None: equal to lora_rank (scale 1)"},
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "dropout on the LoRA branch's input. The encoders stay in eval mode during training (the reference "
            "is deterministic), so a value above 0 puts only the LoRA dropout layers in training mode; such a run "
            "draws random masks, and a resumed run then differs from an uninterrupted one"
        },
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "names of the linear layers that get adapters, matched as the last part of a module's name, in "
            "every trained encoder; None: the attention projections (CLIP: q_proj, k_proj, v_proj, out_proj; T5: q, "
            "k, v, o; BERT: query, key, value)"
        },
    )
    train_embeddings: bool = field(
        default=True,
        metadata={
            "help": "in full fine-tuning, also train the encoders' embedding tables (token and position embeddings). "
            "False trains the transformer layers alone: a row of the token table belongs to one word, so training it "
            "can change the training prompts' own words and nothing else, while a layer sees every word in context. "
            "LoRA leaves the tables frozen either way"
        },
    )
    adversarial_epsilon: float = field(
        default=0.0,
        metadata={
            "help": "radius of the worst-case perturbation of the unsafe prompts' hidden states, as a multiple of each "
            "token's norm (`safetext.adversarial`): each step first finds, by projected gradient descent, the "
            "perturbation within this radius that brings the unsafe embeddings back towards the original ones, then "
            "pushes them away from there and from where they are, as adversarial unlearning (AdvUnlearn) does. 0: "
            "SafeText as in the paper, and the two settings below are ignored"
        },
    )
    adversarial_steps: int = field(
        default=3, metadata={"help": "projected gradient steps that find the perturbation (with adversarial_epsilon)"}
    )
    adversarial_layer: int = field(
        default=0,
        metadata={
            "help": "the transformer block whose input is perturbed (with adversarial_epsilon): 0 perturbs the token "
            "embeddings (with CLIP's position embeddings added), what a prompt's words can reach; a later block "
            "perturbs the words in context"
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute each encoder layer's activations in the backward pass instead of storing them (less "
            "memory, about one more forward pass of time); the gradients are the same"
        },
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    num_train_epochs: int = field(
        default=8, metadata={"help": "passes over the larger of the two training sets (the smaller one cycles)"}
    )
    max_train_steps: int | None = field(
        default=None, metadata={"help": "stop after this many optimizer steps; overrides num_train_epochs"}
    )
    train_batch_size: int = field(default=8, metadata={"help": "unsafe prompts per step and process"})
    safe_batch_size: int | None = field(
        default=None, metadata={"help": "safe prompts per step and process (default: train_batch_size)"}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the gradient to this global norm (None: no clipping)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the data order, the held-out split and init_noise"})
    init_noise: float = field(
        default=1e-4,
        metadata={
            "help": "seeded noise added to the trained weights before the first step, relative to each tensor's RMS "
            "(absolute for all-zero tensors such as LoRA's B), so that training leaves the objective's stationary "
            "starting point the same way on every machine; 0 turns it off"
        },
    )
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "share of each prompt set kept out of training for evaluation"}
    )
    mixed_precision: str = field(
        default="no", metadata={"help": f"one of {MIXED_PRECISION}; the reference embeddings stay float32"}
    )
    checkpointing_steps: int = field(
        default=500, metadata={"help": "save a resumable checkpoint every this many steps (0: only at the end)"}
    )
    checkpoints_total_limit: int | None = field(
        default=2, metadata={"help": "keep at most this many checkpoints (None: keep all)"}
    )
    log_every: int = field(default=1, metadata={"help": "write the loss terms to the JSONL log every N steps"})
    eval_batch_size: int = field(default=32, metadata={"help": "prompts per forward pass when computing embeddings"})

    def __post_init__(self):
        _check_range("effectiveness_weight", self.effectiveness_weight, 0.0, math.inf, high_inclusive=False)
        _check_choice("utility_distance", self.utility_distance, DISTANCES)
        _check_choice("effectiveness_distance", self.effectiveness_distance, DISTANCES)
        _check_choice("utility_positions", self.utility_positions, POSITIONS)
        _check_choice("effectiveness_positions", self.effectiveness_positions, POSITIONS)
        _check_choice("distance_scale", self.distance_scale, DISTANCE_SCALES)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_range("pooled_weight", self.pooled_weight, 0.0, math.inf, high_inclusive=False)
        if self.train_encoders is not None:
            names = self.train_encoders
            if isinstance(names, str) or not all(isinstance(name, str) for name in names) or not names:
                raise ValueError(
                    f"train_encoders={names!r} must be a non-empty list of component names, e.g. ['text_encoder']"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"train_encoders={names!r} names an encoder twice")
            self.train_encoders = list(names)
        if self.lora_rank is not None:
            _check_positive_int("lora_rank", self.lora_rank)
        if self.lora_alpha is not None:
            _check_range("lora_alpha", self.lora_alpha, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        _check_range("lora_dropout", self.lora_dropout, 0.0, 1.0, high_inclusive=False)
        if self.lora_target_modules is not None:
            names = self.lora_target_modules
            if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"lora_target_modules={names!r} must be a non-empty list of module names, e.g. ['q_proj', 'v_proj']"
                )
            self.lora_target_modules = list(names)
        if self.lora_rank is None:
            for name in ("lora_alpha", "lora_target_modules"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)!r} needs lora_rank (LoRA is off without a rank)")
            if self.lora_dropout:
                raise ValueError(f"lora_dropout={self.lora_dropout!r} needs lora_rank (LoRA is off without a rank)")
        if not isinstance(self.train_embeddings, bool):
            raise ValueError(f"train_embeddings={self.train_embeddings!r} must be true or false")
        _check_range("adversarial_epsilon", self.adversarial_epsilon, 0.0, math.inf, high_inclusive=False)
        _check_positive_int("adversarial_steps", self.adversarial_steps)
        layer = self.adversarial_layer
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(f"adversarial_layer={layer!r} must be a whole number >= 0")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing={self.gradient_checkpointing!r} must be true or false")
        _check_range("learning_rate", self.learning_rate, 0.0, 1.0, low_inclusive=False)
        _check_range("heldout_fraction", self.heldout_fraction, 0.0, 1.0, high_inclusive=False)
        _check_range("adam_beta1", self.adam_beta1, 0.0, 1.0, high_inclusive=False)
        _check_range("adam_beta2", self.adam_beta2, 0.0, 1.0, high_inclusive=False)
        _check_range("adam_epsilon", self.adam_epsilon, 0.0, 1.0, low_inclusive=False)
        _check_range("weight_decay", self.weight_decay, 0.0, math.inf, high_inclusive=False)
        for name in ("num_train_epochs", "train_batch_size", "log_every", "eval_batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_train_steps", "safe_batch_size", "checkpoints_total_limit"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not isinstance(self.checkpointing_steps, int) or self.checkpointing_steps < 0:
            raise ValueError(f"checkpointing_steps={self.checkpointing_steps!r} must be a whole number >= 0")
        if self.max_grad_norm is not None:
            _check_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf, low_inclusive=False)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a whole number >= 0")
        _check_range("init_noise", self.init_noise, 0.0, 1.0)

    @property
    def effective_safe_batch_size(self) -> int:
        return self.safe_batch_size or self.train_batch_size

    @property
    def effective_lora_alpha(self) -> float | None:
        return self.lora_alpha if self.lora_alpha is not None else self.lora_rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AlignmentConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown alignment settings: {', '.join(unknown)}")
        return cls(**values)


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a whole number >= 1")
