"""How each text-to-image pipeline family turns prompts into the conditioning its denoiser receives.

SafeText aligns a text encoder so that unsafe prompts stop producing the conditioning that draws unsafe images, so
it must compute exactly the tensors the denoiser sees. Those differ by family in which encoders run, which of
their hidden states is read, and how the pieces are put together:

| family | pipeline class              | sequence (token features the denoiser attends to)       | pooled vector      |
|--------|-----------------------------|---------------------------------------------------------|--------------------|
| `sd`   | `StableDiffusionPipeline`   | CLIP's last hidden state after its final layer norm     | none               |
| `sdxl` | `StableDiffusionXLPipeline` | CLIP-L and bigG penultimate states side by side         | bigG `text_embeds` |
| `sd3`  | `StableDiffusion3Pipeline`  | CLIP-L and bigG penultimate states side by side, zero-  | CLIP-L and bigG    |
|        |                             | padded to T5's width, then T5's tokens appended         | `text_embeds`      |
| `flux` | `FluxPipeline`              | T5's last hidden state                                  | CLIP-L pooled      |

Each family is described by data (`PipelineFamily`, one `EncoderSpec` per text encoder) and one function, `encode`,
reads that description; it reproduces the pipeline's own `encode_prompt` for positive prompts (diffusers 0.42),
with gradients flowing so that the result can be trained on.
"""

from dataclasses import dataclass

import torch

from safetext.errors import SafeTextError

# The pipelines refuse a longer T5 window (their `check_inputs`).
MAX_SEQUENCE_LENGTH = 512

HIDDEN_STATES = ("last", "penultimate")
POOLED_OUTPUTS = ("pooler_output", "text_embeds")
ATTENTION_MASKS = ("never", "if_configured", "required")
SEQUENCE_LAYOUTS = ("features", "features_then_tokens")


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder of a pipeline and what the pipeline takes from it.

    Args:
        text_encoder: component name of the encoder in the pipeline (`model_index.json`), e.g. `"text_encoder_2"`.
        tokenizer: component name of its tokenizer, e.g. `"tokenizer_2"`.
        max_length: fixed token window, as the pipelines' `max_sequence_length` default sets it for T5 (SD3: 256,
            FLUX: 512); None: the window is the `model_max_length` of the tokenizer named by `window_from`.
        window_from: tokenizer whose `model_max_length` is the window when `max_length` is None; None: this
            encoder's own tokenizer. SD3 and FLUX pad every CLIP prompt to the first tokenizer's length.
        hidden_state: which hidden state forms the sequence: `"last"`, the encoder's output after its final layer
            norm (SD, T5); `"penultimate"`, the input of the last layer without the final layer norm (SDXL, SD3);
            None: the sequence is not used (FLUX's CLIP).
        clip_skip: whether the pipeline's `clip_skip` moves this encoder's hidden state `clip_skip` layers
            earlier (CLIP encoders of SD, SDXL and SD3; never T5).
        pooled: which pooled output joins the pooled vector: `"text_embeds"`, the projected end-of-text feature of
            a `CLIPTextModelWithProjection` (SDXL, SD3); `"pooler_output"`, the unprojected end-of-text feature of a
            `CLIPTextModel` (FLUX); None: the encoder gives no pooled vector.
        attention_mask: `"never"`: padding is attended to, as in every pipeline here; `"if_configured"`: the mask is
            passed when the encoder's config sets `use_attention_mask`, as `StableDiffusionPipeline` does;
            `"required"`: the mask is always passed (a bare `transformers` encoder, `BARE_FAMILY`).
        dtype_from: component whose dtype the sequence is cast to; None: this encoder's. SDXL casts both CLIP
            sequences to `text_encoder_2`'s dtype, SD3 both to `text_encoder`'s.
        starts_with_bos: the tokenizer puts a BOS token first (CLIP's `<|startoftext|>`, BERT's `[CLS]`); T5 puts
            none. The alignment's `no_bos` and `prompt` positions leave that first position out.
        trained_by_default: SafeText trains this encoder unless told otherwise: the CLIP encoders, not T5 (T5-XXL,
            4.7 B parameters, is larger than the rest of the pipeline's text side together).
    """

    text_encoder: str
    tokenizer: str
    max_length: int | None = None
    window_from: str | None = None
    hidden_state: str | None = "last"
    clip_skip: bool = False
    pooled: str | None = None
    attention_mask: str = "never"
    dtype_from: str | None = None
    starts_with_bos: bool = True
    trained_by_default: bool = True

    def __post_init__(self):
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length={self.max_length} must be positive (or None for the tokenizer's length)")
        if self.max_length is not None and self.window_from is not None:
            raise ValueError(f"give max_length={self.max_length} or window_from={self.window_from!r}, not both")
        if self.hidden_state is not None and self.hidden_state not in HIDDEN_STATES:
            raise ValueError(
                f"hidden_state={self.hidden_state!r} is not supported; choose one of {', '.join(HIDDEN_STATES)} or None"
            )
        if self.pooled is not None and self.pooled not in POOLED_OUTPUTS:
            raise ValueError(
                f"pooled={self.pooled!r} is not supported; choose one of {', '.join(POOLED_OUTPUTS)} or None"
            )
        if self.hidden_state is None and self.pooled is None:
            raise ValueError(f"{self.text_encoder} gives neither a sequence nor a pooled vector")
        if self.clip_skip and self.hidden_state is None:
            raise ValueError(f"clip_skip=True needs a hidden_state: {self.text_encoder} gives no sequence")
        if self.attention_mask not in ATTENTION_MASKS:
            raise ValueError(
                f"attention_mask={self.attention_mask!r} is not supported; choose one of {', '.join(ATTENTION_MASKS)}"
            )


@dataclass(frozen=True)
class PipelineFamily:
    """A pipeline family: its class, its text encoders in the pipeline's order, and how their outputs combine.

    Args:
        name: short name (`sd`, `sdxl`, `sd3`, `flux`).
        pipeline_class: the `_class_name` of its `model_index.json`.
        denoiser: component name of the model that receives the conditioning (`unet` or `transformer`).
        encoders: the text encoders, in the order their sequences and pooled vectors are concatenated.
        sequence_layout: `"features"`: the sequences are concatenated on the feature axis (one encoder: SD, FLUX;
            two: SDXL's 768 + 1280 = 2048); `"features_then_tokens"`: the sequences of all encoders but the last are
            concatenated on the feature axis, zero-padded on it to the last encoder's width, and the last encoder's
            sequence is appended on the token axis (SD3: 77 CLIP tokens 2048 wide padded to 4096, then 256 T5
            tokens). Pooled vectors are always concatenated on the feature axis.
    """

    name: str
    pipeline_class: str
    denoiser: str
    encoders: tuple[EncoderSpec, ...]
    sequence_layout: str = "features"

    def __post_init__(self):
        if not self.encoders:
            raise ValueError(f"family {self.name!r} has no text encoders")
        if self.sequence_layout not in SEQUENCE_LAYOUTS:
            raise ValueError(
                f"sequence_layout={self.sequence_layout!r} is not supported; "
                f"choose one of {', '.join(SEQUENCE_LAYOUTS)}"
            )
        with_sequence = [spec for spec in self.encoders if spec.hidden_state is not None]
        if not with_sequence:
            raise ValueError(f"family {self.name!r}: no encoder gives a sequence")
        if self.sequence_layout == "features_then_tokens" and (
            len(with_sequence) < 2 or self.encoders[-1].hidden_state is None
        ):
            raise ValueError(
                f"family {self.name!r}: features_then_tokens needs a sequence from the last encoder and at least one other"
            )
        names = [spec.text_encoder for spec in self.encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r} names a text encoder twice: {', '.join(names)}")

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(spec.text_encoder for spec in self.encoders)

    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        return tuple(spec.tokenizer for spec in self.encoders)


@dataclass
class Conditioning:
    """What a pipeline's denoiser receives from the prompts.

    Args:
        sequence: token features [n, tokens, dim] (the UNet's `encoder_hidden_states`, the transformers'
            `encoder_hidden_states`).
        pooled: one vector per prompt [n, dim] (SDXL's `text_embeds`, SD3's and FLUX's `pooled_projections`), or
            None for families without one (SD).
    """

    sequence: torch.Tensor
    pooled: torch.Tensor | None = None

    def __post_init__(self):
        if self.sequence.ndim != 3:
            raise ValueError(f"sequence must be [n, tokens, dim], got shape {tuple(self.sequence.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != self.sequence.shape[0]):
            raise ValueError(
                f"pooled must be [n, dim] with n = {self.sequence.shape[0]}, got shape {tuple(self.pooled.shape)}"
            )


FAMILIES: dict[str, PipelineFamily] = {
    family.name: family
    for family in (
        PipelineFamily(
            name="sd",
            pipeline_class="StableDiffusionPipeline",
            denoiser="unet",
            encoders=(
                EncoderSpec(
                    "text_encoder", "tokenizer", hidden_state="last", clip_skip=True, attention_mask="if_configured"
                ),
            ),
        ),
        PipelineFamily(
            name="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            denoiser="unet",
            encoders=(
                EncoderSpec(
                    "text_encoder",
                    "tokenizer",
                    hidden_state="penultimate",
                    clip_skip=True,
                    dtype_from="text_encoder_2",
                ),
                EncoderSpec(
                    "text_encoder_2", "tokenizer_2", hidden_state="penultimate", clip_skip=True, pooled="text_embeds"
                ),
            ),
        ),
        PipelineFamily(
            name="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            denoiser="transformer",
            encoders=(
                EncoderSpec(
                    "text_encoder", "tokenizer", hidden_state="penultimate", clip_skip=True, pooled="text_embeds"
                ),
                EncoderSpec(
                    "text_encoder_2",
                    "tokenizer_2",
                    window_from="tokenizer",
                    hidden_state="penultimate",
                    clip_skip=True,
                    pooled="text_embeds",
                    dtype_from="text_encoder",
                ),
                EncoderSpec(
                    "text_encoder_3",
                    "tokenizer_3",
                    max_length=256,
                    hidden_state="last",
                    starts_with_bos=False,
                    trained_by_default=False,
                ),
            ),
            sequence_layout="features_then_tokens",
        ),
        PipelineFamily(
            name="flux",
            pipeline_class="FluxPipeline",
            denoiser="transformer",
            encoders=(
                EncoderSpec("text_encoder", "tokenizer", hidden_state=None, pooled="pooler_output"),
                EncoderSpec(
                    "text_encoder_2",
                    "tokenizer_2",
                    max_length=512,
                    hidden_state="last",
                    starts_with_bos=False,
                    trained_by_default=False,
                ),
            ),
        ),
    )
}


BARE_FAMILY = PipelineFamily(
    name="bare",
    pipeline_class="",
    denoiser="",
    encoders=(
        EncoderSpec("text_encoder", "tokenizer", max_length=77, hidden_state="last", attention_mask="required"),
    ),
)
"""A stand-alone `transformers` encoder, aligned on embeddings only: its last hidden state over a 77-token window
(SD's), with the attention mask, as any `transformers` encoder expects. Not a pipeline: `detect_family` never
returns it."""


def _supported_classes() -> str:
    return ", ".join(f"{family.pipeline_class} ({name})" for name, family in FAMILIES.items())


def detect_family(model_index: dict) -> PipelineFamily:
    """The family of a pipeline, from the `_class_name` of its `model_index.json`.

    Args:
        model_index: the parsed `model_index.json` of a diffusers pipeline folder.

    Returns:
        `PipelineFamily`: the family whose `pipeline_class` is the pipeline's class.

    Raises:
        `SafeTextError`: the index names no class, or a class of no supported family.
    """
    class_name = model_index.get("_class_name")
    if not class_name:
        raise SafeTextError(f"model_index.json has no _class_name: expected one of {_supported_classes()}")
    for family in FAMILIES.values():
        if family.pipeline_class == class_name:
            return family
    raise SafeTextError(f"unsupported pipeline class {class_name!r}: supported are {_supported_classes()}")


def _resolve_family(family: PipelineFamily | str) -> PipelineFamily:
    if isinstance(family, PipelineFamily):
        return family
    if family not in FAMILIES:
        raise SafeTextError(f"unknown pipeline family {family!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _select_hidden_state(text_encoder, output, spec: EncoderSpec, skip: int) -> torch.Tensor:
    if spec.hidden_state == "last" and skip == 0:
        return output.last_hidden_state
    # hidden_states holds the embeddings' output, then each layer's output (the last one before the final norm).
    index = -(skip + 1) if spec.hidden_state == "last" else -(skip + 2)
    if -index > len(output.hidden_states):
        layers = len(output.hidden_states) - 1
        raise SafeTextError(f"clip_skip={skip} reaches below the first layer of {spec.text_encoder} ({layers} layers)")
    hidden = output.hidden_states[index]
    if spec.hidden_state == "last":
        # An earlier layer's output still goes through the final layer norm, as the last one does (SD's clip_skip).
        # transformers 5 keeps that norm on CLIPTextModel itself; CLIPTextModelWithProjection (and CLIPTextModel in
        # transformers 4) keep it on their inner `text_model`.
        text_model = getattr(text_encoder, "text_model", text_encoder)
        hidden = text_model.final_layer_norm(hidden)
    return hidden


@dataclass
class Tokens:
    """Prompts tokenized for every tokenizer of a family, as the pipeline tokenizes them.

    Args:
        input_ids: tokenizer component name -> token ids [n, window].
        attention_mask: tokenizer component name -> [n, window], 1 on the prompt's tokens (BOS through EOS).
        truncated: per prompt, whether some tokenizer's window cut it.
    """

    input_ids: dict[str, torch.Tensor]
    attention_mask: dict[str, torch.Tensor]
    truncated: torch.Tensor

    def __len__(self) -> int:
        return len(self.truncated)

    def select(self, indices) -> "Tokens":
        return Tokens(
            {name: ids[indices] for name, ids in self.input_ids.items()},
            {name: mask[indices] for name, mask in self.attention_mask.items()},
            self.truncated[indices],
        )

    @staticmethod
    def concatenate(parts: list["Tokens"]) -> "Tokens":
        names = parts[0].input_ids
        return Tokens(
            {name: torch.cat([p.input_ids[name] for p in parts]) for name in names},
            {name: torch.cat([p.attention_mask[name] for p in parts]) for name in names},
            torch.cat([p.truncated for p in parts]),
        )


def _check_components(family: PipelineFamily, text_encoders: dict | None, tokenizers: dict | None) -> None:
    missing = [name for name in family.text_encoder_names if text_encoders is not None and name not in text_encoders]
    missing += [name for name in family.tokenizer_names if tokenizers is not None and name not in tokenizers]
    if missing:
        raise SafeTextError(f"the {family.name} family needs {', '.join(missing)}, which were not given")


def tokenize(
    family: PipelineFamily | str, tokenizers: dict, prompts: list[str], *, max_sequence_length: int | None = None
) -> Tokens:
    """Tokenize prompts with every tokenizer of `family`: each pads and truncates to its window, as the pipeline does.

    Args:
        family: a `PipelineFamily` or the name of one in `FAMILIES`.
        tokenizers: component name -> tokenizer, holding at least the family's `tokenizer_names`.
        prompts: the prompts.
        max_sequence_length: see `encode`.

    Returns:
        `Tokens`, on the CPU.

    Raises:
        `SafeTextError`: unknown family, missing tokenizers, no prompts or an out-of-range `max_sequence_length`.
    """
    family = _resolve_family(family)
    if isinstance(prompts, str) or not prompts:
        raise SafeTextError(f"encode needs a non-empty list of prompts, got {prompts!r}")
    if max_sequence_length is not None and not 0 < max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise SafeTextError(f"max_sequence_length={max_sequence_length} must be between 1 and {MAX_SEQUENCE_LENGTH}")
    _check_components(family, None, tokenizers)
    input_ids, attention_mask, truncated = {}, {}, torch.zeros(len(prompts), dtype=torch.bool)
    for spec in family.encoders:
        tokenizer = tokenizers[spec.tokenizer]
        if spec.max_length is not None:
            window = max_sequence_length or spec.max_length
        else:
            window = tokenizers[spec.window_from or spec.tokenizer].model_max_length
        batch = tokenizer(
            prompts,
            padding="max_length",
            max_length=window,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids[spec.tokenizer], attention_mask[spec.tokenizer] = batch.input_ids, batch.attention_mask
        # verbose=False: lengths beyond the window are expected here, they are what is being counted.
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        truncated |= torch.tensor([length > window for length in lengths], dtype=torch.bool)
    return Tokens(input_ids, attention_mask, truncated)


def sequence_positions(family: PipelineFamily | str, tokens: Tokens) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Which positions of the conditioning sequence hold prompt tokens, and which hold a BOS token.

    Sequences side by side on the feature axis share their token positions (SDXL's two CLIP encoders tokenize a
    prompt to the same number of tokens), so the first such encoder's mask stands for them; SD3's appended T5 tokens
    follow the CLIP window.

    Returns:
        The attention mask [n, sequence tokens] and the positions of BOS tokens in the sequence.
    """
    family = _resolve_family(family)
    with_sequence = [spec for spec in family.encoders if spec.hidden_state is not None]
    parts = [with_sequence[0]]
    if family.sequence_layout == "features_then_tokens":
        parts.append(with_sequence[-1])
    masks, bos_positions, offset = [], [], 0
    for spec in parts:
        mask = tokens.attention_mask[spec.tokenizer]
        if spec.starts_with_bos:
            bos_positions.append(offset)
        masks.append(mask)
        offset += mask.shape[1]
    return torch.cat(masks, dim=1), tuple(bos_positions)


def encode_tokens(
    family: PipelineFamily | str, text_encoders: dict, tokens: Tokens, *, clip_skip: int | None = None
) -> Conditioning:
    """Encode tokenized prompts into the conditioning a pipeline of `family` gives its denoiser (see `encode`)."""
    family = _resolve_family(family)
    skip = 0 if clip_skip is None else clip_skip
    if skip < 0:
        raise SafeTextError(f"clip_skip={clip_skip} must be zero or positive")
    _check_components(family, text_encoders, None)
    device = text_encoders[family.encoders[0].text_encoder].device
    sequences, pooled = [], []
    for spec in family.encoders:
        text_encoder = text_encoders[spec.text_encoder]
        input_ids = tokens.input_ids[spec.tokenizer].to(text_encoder.device)
        use_mask = spec.attention_mask == "required" or (
            spec.attention_mask == "if_configured" and getattr(text_encoder.config, "use_attention_mask", False)
        )
        attention_mask = tokens.attention_mask[spec.tokenizer].to(text_encoder.device) if use_mask else None
        output = text_encoder(
            input_ids,
            attention_mask=attention_mask,
            output_hidden_states=spec.hidden_state == "penultimate" or (spec.clip_skip and skip > 0),
        )
        if spec.hidden_state is not None:
            hidden = _select_hidden_state(text_encoder, output, spec, skip if spec.clip_skip else 0)
            dtype = text_encoders[spec.dtype_from or spec.text_encoder].dtype
            sequences.append(hidden.to(device=device, dtype=dtype))
        if spec.pooled is not None:
            pooled.append(getattr(output, spec.pooled).to(device))

    if family.sequence_layout == "features":
        sequence = torch.cat(sequences, dim=-1)
    else:
        side_by_side, appended = torch.cat(sequences[:-1], dim=-1), sequences[-1]
        padding = appended.shape[-1] - side_by_side.shape[-1]
        if padding < 0:
            raise SafeTextError(
                f"the {family.name} family pads its CLIP features ({side_by_side.shape[-1]} wide) to the width of "
                f"{family.encoders[-1].text_encoder} ({appended.shape[-1]}), which is narrower"
            )
        sequence = torch.cat([torch.nn.functional.pad(side_by_side, (0, padding)), appended], dim=-2)
    return Conditioning(sequence=sequence, pooled=torch.cat(pooled, dim=-1) if pooled else None)


def encode(
    family: PipelineFamily | str,
    text_encoders: dict,
    tokenizers: dict,
    prompts: list[str],
    *,
    clip_skip: int | None = None,
    max_sequence_length: int | None = None,
) -> Conditioning:
    """Encode prompts into the conditioning a pipeline of `family` gives its denoiser.

    Equals the pipeline's `encode_prompt` for the same prompts with one image per prompt, no classifier-free
    guidance, no LoRA scale and every prompt slot (`prompt_2`, `prompt_3`) left to `prompt`: each tokenizer pads and
    truncates to its window, each encoder runs on its own device (no attention mask unless its spec says so), the
    chosen hidden states and pooled outputs are cast and combined as the family says. Gradients flow: wrap the call
    in `torch.no_grad()` when none are needed. `tokenize` then `encode_tokens` do the same in two steps.

    Args:
        family: a `PipelineFamily` or the name of one in `FAMILIES`.
        text_encoders: component name -> text encoder, holding at least the family's `text_encoder_names`.
        tokenizers: component name -> tokenizer, holding at least the family's `tokenizer_names`.
        prompts: the prompts, one conditioning row each.
        clip_skip: layers to skip in the CLIP encoders whose spec allows it, as the pipelines' `clip_skip`.
        max_sequence_length: token window of the encoders with a fixed window (T5), as the pipelines'
            `max_sequence_length`; None keeps the family's default (SD3: 256, FLUX: 512).

    Returns:
        `Conditioning`: the sequence [n, tokens, dim] and the pooled vector [n, dim] (None for SD), on the device of
        the family's first text encoder.

    Raises:
        `SafeTextError`: unknown family, missing components, no prompts, an out-of-range `clip_skip` or
            `max_sequence_length`, or CLIP sequences wider than the T5 sequence they are padded to (SD3).
    """
    family = _resolve_family(family)
    _check_components(family, text_encoders, tokenizers)
    if clip_skip is not None and clip_skip < 0:
        raise SafeTextError(f"clip_skip={clip_skip} must be zero or positive")
    tokens = tokenize(family, tokenizers, prompts, max_sequence_length=max_sequence_length)
    return encode_tokens(family, text_encoders, tokens, clip_skip=clip_skip)
