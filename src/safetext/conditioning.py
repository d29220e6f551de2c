"""How prompts become the conditioning tensor a diffusion model consumes, and which positions of it count.

`TextEncoders` computes the conditioning of any pipeline family (`safetext.families`: SD, SDXL, SD3, FLUX, or a
bare encoder) from prompts tokenized once; it is what the alignment trains. `TextConditioner` is the single-encoder
form of the same computation for SD-style pipelines and bare encoders, kept for code that holds one encoder.

For SD v1.x/v2.x the conditioning is the text encoder's last hidden state for the prompt tokenized with padding
to the tokenizer's `model_max_length` (77) and truncation, exactly what `StableDiffusionPipeline.encode_prompt`
computes; the attention mask is passed only when the encoder's config asks for it (`use_attention_mask`), as the
pipeline does. A bare encoder (no pipeline) is padded and truncated to 77 tokens the same way and, like any
`transformers` encoder, receives its attention mask.
"""

from dataclasses import dataclass

import torch

from safetext.families import Conditioning, PipelineFamily, Tokens, encode_tokens, sequence_positions, tokenize

SD_MAX_LENGTH = 77


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor  # [n, tokens]
    attention_mask: torch.Tensor  # [n, tokens], 1 from BOS through EOS
    truncated: int  # prompts longer than the window, cut as the pipeline cuts them

    def __len__(self):
        return self.input_ids.shape[0]

    def select(self, indices) -> "TokenizedPrompts":
        return TokenizedPrompts(self.input_ids[indices], self.attention_mask[indices], truncated=0)

    @staticmethod
    def concatenate(parts: list["TokenizedPrompts"]) -> "TokenizedPrompts":
        return TokenizedPrompts(
            torch.cat([p.input_ids for p in parts]),
            torch.cat([p.attention_mask for p in parts]),
            truncated=sum(p.truncated for p in parts),
        )


class TextConditioner:
    """Turns prompts into conditioning tensors with a given text encoder.

    Args:
        tokenizer: the pipeline's tokenizer.
        pass_attention_mask: give the encoder the attention mask (bare encoders, or CLIP configs with
            `use_attention_mask`); SD pipelines do not.
        max_length: the token window (SD: 77).
    """

    def __init__(self, tokenizer, pass_attention_mask: bool = False, max_length: int = SD_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.pass_attention_mask = pass_attention_mask
        self.max_length = max_length

    @classmethod
    def for_encoder(cls, tokenizer, text_encoder, bare: bool) -> "TextConditioner":
        if bare:
            return cls(tokenizer, pass_attention_mask=True, max_length=SD_MAX_LENGTH)
        use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        return cls(tokenizer, pass_attention_mask=use_mask, max_length=tokenizer.model_max_length)

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        # verbose=False: lengths beyond the window are expected here, they are what is being counted.
        full_lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        truncated = sum(length > self.max_length for length in full_lengths)
        return TokenizedPrompts(batch["input_ids"], batch["attention_mask"], truncated)

    def encode(self, text_encoder, tokens: TokenizedPrompts) -> torch.Tensor:
        """The conditioning tensor [n, tokens, dim]; gradients flow when the caller allows them."""
        device = text_encoder.device if hasattr(text_encoder, "device") else tokens.input_ids.device
        input_ids = tokens.input_ids.to(device)
        attention_mask = tokens.attention_mask.to(device) if self.pass_attention_mask else None
        return text_encoder(input_ids, attention_mask=attention_mask)[0]

    @torch.no_grad()
    def encode_all(self, text_encoder, tokens: TokenizedPrompts, batch_size: int) -> torch.Tensor:
        """Encodes many prompts in batches without gradients; returns float32 on the CPU."""
        outputs = []
        for start in range(0, len(tokens), batch_size):
            chunk = tokens.select(slice(start, start + batch_size))
            outputs.append(self.encode(text_encoder, chunk).float().cpu())
        return torch.cat(outputs)


def position_mask(attention_mask: torch.Tensor, positions: str, bos_positions: tuple[int, ...] = (0,)) -> torch.Tensor:
    """Boolean mask [n, tokens] of the positions that enter the SafeText distances.

    `all`: every position of the padded window; `no_bos`: all but the BOS positions, whose output is the same for
    every prompt under CLIP's causal attention; `prompt`: the prompt's own tokens through EOS, BOS excluded.

    Args:
        attention_mask: [n, tokens], 1 on the prompt's tokens.
        positions: `all`, `no_bos` or `prompt`.
        bos_positions: where the sequence holds a BOS token: position 0 of a CLIP window; SD3's sequence has one
            (its CLIP window, then T5 tokens, which have none), FLUX's T5 sequence none.
    """
    if positions == "all":
        mask = torch.ones_like(attention_mask, dtype=torch.bool)
    elif positions == "no_bos":
        mask = torch.ones_like(attention_mask, dtype=torch.bool)
    elif positions == "prompt":
        mask = attention_mask.bool().clone()
    else:
        raise ValueError(f"positions={positions!r} is not supported; choose one of all, no_bos, prompt")
    if positions != "all":
        mask[:, list(bos_positions)] = False
    return mask


class TextEncoders(torch.nn.Module):
    """The text encoders of a pipeline family as one module: tokenized prompts in, the denoiser's conditioning out.

    One module, so that Accelerate prepares (and under several processes wraps) all encoders at once and the
    training loop reads like the single-encoder loop it generalises. Frozen encoders sit inside too: their part of
    the conditioning is constant but belongs to what the denoiser receives.

    Args:
        family: the pipeline family (`safetext.families`).
        text_encoders: component name -> encoder, every encoder of the family.
        tokenizers: component name -> tokenizer, every tokenizer of the family.
    """

    def __init__(self, family: PipelineFamily, text_encoders: dict, tokenizers: dict):
        super().__init__()
        self.family = family
        self.text_encoders = torch.nn.ModuleDict(text_encoders)
        self.tokenizers = tokenizers

    def tokenize(self, prompts: list[str]) -> Tokens:
        return tokenize(self.family, self.tokenizers, prompts)

    def positions(self, tokens: Tokens, positions: str) -> torch.Tensor:
        """The position mask (see `position_mask`) of the conditioning sequence of tokenized prompts."""
        attention_mask, bos_positions = sequence_positions(self.family, tokens)
        return position_mask(attention_mask, positions, bos_positions)

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sequence [n, tokens, dim] and the pooled vector [n, dim] (None for SD); gradients flow."""
        conditioning = encode_tokens(self.family, dict(self.text_encoders.items()), tokens)
        return conditioning.sequence, conditioning.pooled

    @torch.no_grad()
    def encode_all(self, tokens: Tokens, batch_size: int) -> Conditioning:
        """Encodes many prompts in batches without gradients; returns float32 on the CPU."""
        sequences, pooled = [], []
        for start in range(0, len(tokens), batch_size):
            sequence, pooled_part = self(tokens.select(slice(start, start + batch_size)))
            sequences.append(sequence.float().cpu())
            if pooled_part is not None:
                pooled.append(pooled_part.float().cpu())
        return Conditioning(torch.cat(sequences), torch.cat(pooled) if pooled else None)
