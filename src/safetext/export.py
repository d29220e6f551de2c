"""Writing aligned encoders in the ecosystem's layout: `text_encoder/`, `tokenizer/` (and `text_encoder_2/`, ... for
pipelines with several), a record and a model card."""

import shutil
from pathlib import Path

from safetext.checkpointing import write_json_atomic
from safetext.errors import SafeTextError
from safetext.families import FAMILIES
from safetext.lora import ADAPTER_SUFFIX, save_lora_adapter


def _replace_dir(target: Path, write) -> None:
    """Writes a folder under a temporary name, then swaps it in, so a crash never leaves half a folder."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def export_alignment(
    output_dir,
    text_encoders,
    tokenizers,
    record: dict,
    *,
    export_pipeline: bool = False,
    base=None,
    revision: str | None = None,
    lora_base_sha256: dict | None = None,
) -> None:
    """Writes the aligned encoders (safetensors), the tokenizers, `safetext.json` and `README.md` into output_dir.

    Each encoder and tokenizer goes into the folder of its pipeline component name (`text_encoder/`,
    `text_encoder_2/`, `tokenizer/`, ...). With `export_pipeline`, also writes `pipeline/`: the base pipeline with the
    aligned encoders, which `DiffusionPipeline.from_pretrained(output_dir / "pipeline")` opens directly.

    Args:
        output_dir: the folder to write into.
        text_encoders: component name -> aligned encoder; a single encoder stands for `{"text_encoder": encoder}`.
        tokenizers: component name -> tokenizer; a single tokenizer stands for `{"tokenizer": tokenizer}`.
        record: the content of `safetext.json`.
        export_pipeline: also write `pipeline/`.
        base, revision: the base pipeline `pipeline/` is built from.
        lora_base_sha256: for a LoRA run, component name -> hash of the base encoder (`safetext.lora.encoder_sha256`);
            the encoders named here are peft models: each adapter is written to `{name}_lora/`, then merged into
            its encoder (in place), and the merged plain encoder is written under the component name.
    """
    output_dir = Path(output_dir)
    if not isinstance(text_encoders, dict):
        text_encoders = {"text_encoder": text_encoders}
    if not isinstance(tokenizers, dict):
        tokenizers = {"tokenizer": tokenizers}
    for name, base_sha256 in (lora_base_sha256 or {}).items():
        peft_model = text_encoders[name]
        _replace_dir(
            output_dir / (name + ADAPTER_SUFFIX),
            lambda d, m=peft_model, h=base_sha256, n=name: save_lora_adapter(m, d, h, n),
        )
        text_encoders = {**text_encoders, name: peft_model.merge_and_unload()}
    for name, text_encoder in text_encoders.items():
        _replace_dir(output_dir / name, lambda d, e=text_encoder: e.save_pretrained(d, safe_serialization=True))
    for name, tokenizer in tokenizers.items():
        _replace_dir(output_dir / name, lambda d, t=tokenizer: t.save_pretrained(d))
    if export_pipeline:
        if not record["model"]["pipeline_involved"]:
            raise SafeTextError("--export-pipeline needs a diffusers pipeline as the base model, not a bare encoder")
        record["pipeline_dir"] = "pipeline"
        components = {**text_encoders, **tokenizers}
        _replace_dir(output_dir / "pipeline", lambda d: _write_pipeline(d, base, revision, components))
    elif (output_dir / "pipeline").is_dir():
        # left by an earlier export of this run (resumed without --export-pipeline): it holds an older encoder
        shutil.rmtree(output_dir / "pipeline")
    (output_dir / "README.md").write_text(model_card(record))
    write_json_atomic(output_dir / "safetext.json", record)


def _write_pipeline(directory: Path, base, revision, components: dict) -> None:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(base, revision=revision, use_safetensors=True, **components)
    pipeline.save_pretrained(directory, safe_serialization=True)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _adversary_sentence(config: dict) -> str:
    if not config.get("adversarial_epsilon"):
        return ""
    return (
        " Each step also pushed the unsafe prompts from a worst-case perturbation of their hidden states entering "
        f"block {config['adversarial_layer']}, at most {config['adversarial_epsilon']} times each token's norm, found by "
        f"{config['adversarial_steps']} projected gradient steps (`safetext.adversarial`)."
    )


def _lora_section(record: dict) -> str:
    lora = record.get("lora")
    if not lora:
        return ""
    adapters = ", ".join(f"`{folder}/`" for folder in lora["adapters"].values())
    return f"""The encoders were trained as LoRA adapters (rank {lora["rank"]}, alpha {lora["alpha"]}) and are merged
into the plain encoders above; the adapters themselves are in {adapters} (peft's layout). Load one onto its base
encoder with `safetext.load_lora_adapter(base_encoder, "{{this folder}}/{next(iter(lora["adapters"].values()))}")`, which
refuses an adapter trained on another encoder.

"""


def model_card(record: dict) -> str:
    """A model card (README.md) for an aligned encoder: what was done, the metrics, the threat model."""
    model = record["model"]
    metrics = record["metrics"]
    config = record["config"]
    rows = []
    for split in ("heldout", "train"):
        for key, label in (
            ("unsafe_cosine", "unsafe prompts: cosine to the original embedding"),
            ("safe_relative_drift", "safe prompts: relative drift from the original"),
        ):
            value = metrics[split].get(key)
            if value is not None:
                rows.append(f"| {split} | {label} | {_fmt(value['before'])} | {_fmt(value['after'])} |")
            value = metrics[split].get("pooled", {}).get(key)
            if value is not None:
                rows.append(f"| {split} | {label}, pooled vector | {_fmt(value['before'])} | {_fmt(value['after'])} |")
    by_set = []
    for name, values in metrics["heldout"]["by_set"].items():
        for key, value in values.items():
            by_set.append(f"| `{name}` | {key} | {_fmt(value['after'])} |")
    data_lines = []
    for side in ("unsafe", "safe"):
        for name, summary in record["data"][side].items():
            data_lines.append(
                f"| {side} | `{name}` | {summary.get('train')} | {summary.get('heldout')} | "
                f"`{str(summary.get('sha256', ''))[:16]}` |"
            )
    trained = record.get("training", {}).get("trained_encoders", ["text_encoder"])
    classes = {name: values["class"] for name, values in model.get("text_encoders", {}).items()}
    classes.setdefault("text_encoder", model.get("text_encoder_class", "CLIPTextModel"))
    family = FAMILIES.get(model.get("family") or "sd", FAMILIES["sd"])
    if model["pipeline_involved"]:
        load_lines = [f'{n} = {classes[n]}.from_pretrained("{{this folder}}", subfolder="{n}")' for n in trained]
    else:
        load_lines = ['text_encoder = AutoModel.from_pretrained("{this folder}", subfolder="text_encoder")']
    encoder_classes = sorted({classes[n] for n in trained} if model["pipeline_involved"] else {"AutoModel"})
    pipeline_call = (
        f'pipe = {family.pipeline_class}.from_pretrained("{model["pretrained_model_name_or_path"]}", '
        + ", ".join(f"{n}={n}" for n in trained)
        + ")"
    )
    cost = record["cost"]
    return f"""---
library_name: transformers
tags:
- safetext
- text-encoder
- safety
---
# SafeText-aligned text encoder

This folder holds a text encoder aligned with **SafeText** (Hu, Jiang and Gong, arXiv 2502.20623) by the
`safetext` package: starting from `{model["pretrained_model_name_or_path"]}` (text encoder sha256
`{model["text_encoder_sha256"][:16]}`), the encoder was fine-tuned so that the embeddings of unsafe prompts move
away from where the original encoder put them (negative cosine) while the embeddings of safe prompts stay in
place (Euclidean distance), minimising `L_u - lambda * L_e` with lambda = {config["effectiveness_weight"]}
({config["distance_scale"]} distances; positions `{config["utility_positions"]}` for safe and
`{config["effectiveness_positions"]}` for unsafe prompts).{
        _adversary_sentence(config)
    } Only the text encoders named below changed
({", ".join(trained)}; family `{model.get("family")}`); use them with the original diffusion model. {
        "No diffusion pipeline was involved: the alignment acted on embeddings only."
        if not model["pipeline_involved"]
        else ""
    }

## Use

```python
from transformers import {", ".join(encoder_classes)}
from diffusers import {family.pipeline_class}

{chr(10).join(load_lines)}
{pipeline_call}
```

{_lora_section(record)}## Embedding metrics

Measured by `safetext align` on prompts held out of training and on the training prompts.

| split | metric | before | after |
|---|---|---|---|
{chr(10).join(rows)}

Held-out, per prompt file:

| set | metric | after |
|---|---|---|
{chr(10).join(by_set)}

These are embedding metrics only. Whether images lose the unsafe content, and how much safe images change, is
measured by generating images and evaluating them (removal rate, LPIPS, FID).

## Data

| side | file | train | held-out | sha256 |
|---|---|---|---|---|
{chr(10).join(data_lines)}

## Cost

{record["training"]["steps"]} steps in {cost["train_seconds"]:.1f} s on {cost["device"]["type"]}
({record["training"]["num_processes"]} process(es)); peak resident memory
{cost["peak_memory_bytes"]["cpu_max_rss"] / 2**20:.0f} MiB.

## Threat model and limits

- The alignment protects a deployment in which users send prompts to a model they do not control. Whoever
  holds these weights can swap the original text encoder back, or fine-tune this one, and undo the alignment.
- Prompts unlike the unsafe training prompts (other wordings, other languages, adversarial prompts found by
  optimisation against this encoder) may still produce unsafe images; measure them before relying on it.
- The full settings, data provenance and package versions are in `safetext.json`.
"""
