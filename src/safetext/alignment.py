"""The SafeText alignment loop: fine-tune a text encoder so unsafe prompts move and safe prompts stay.

Read `align` top to bottom: prepare the data, claim the output folder, load the tokenizers and text encoders (never
the UNet, transformer or VAE), cache the frozen reference conditioning once, train with Accelerate, measure, export.

With `adversarial_epsilon` above 0 each step first lets an adversary (`safetext.adversarial`) find the perturbation
of the unsafe prompts' hidden states that brings them back, and pushes from there as well.

Every pipeline family (`safetext.families`) goes through the same loop: the trained object is the family's text
encoders as one module (`TextEncoders`), whose output is what the denoiser receives, a token sequence and, for
SDXL, SD3 and FLUX, a pooled vector; both enter the objective. Encoders outside `train_encoders` stay frozen and
contribute their constant part.
"""

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safetext.adversarial import HiddenStatePerturbation, transformer_layers, worst_case_deltas
from safetext.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_json_atomic,
)
from safetext.conditioning import TextEncoders
from safetext.config import AlignmentConfig
from safetext.errors import SafeTextError
from safetext.families import Conditioning, Tokens, encode_tokens
from safetext.loading import load_text_encoder
from safetext.lora import ADAPTER_SUFFIX, add_lora_adapter, encoder_sha256, resolve_target_modules
from safetext.losses import safetext_loss, unsafe_effectiveness
from safetext.metrics import embedding_metrics
from safetext.prompts import PromptSet, remove_overlap, split_heldout
from safetext.provenance import Stopwatch, device_description, git_commit, package_versions, peak_memory_bytes

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
RECORD_FILE = "safetext.json"
LOG_FILE = "logs/train_log.jsonl"
# What an output folder of ours may hold; --overwrite removes exactly these and nothing else.
RUN_ARTIFACTS = (
    RUN_FILE,
    RECORD_FILE,
    "README.md",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "text_encoder_lora",
    "text_encoder_2_lora",
    "text_encoder_3_lora",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "checkpoints",
    "logs",
    "pipeline",
)
# Settings that change how long a run lasts or how it reports, not what it learns: a run resumed with other
# values of these is still the same run.
RUN_LENGTH_SETTINGS = (
    "num_train_epochs",
    "max_train_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "log_every",
    "eval_batch_size",
    # recomputing activations changes memory and time, not the gradients
    "gradient_checkpointing",
)


@dataclass
class AlignmentResult:
    """What `align` produced.

    Attributes:
        output_dir: the exported folder (every trained encoder under its component name, every tokenizer,
            `safetext.json`, `README.md`).
        record: the content of `safetext.json`.
    """

    output_dir: Path
    record: dict = field(default_factory=dict)

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]


@dataclass
class _Group:
    """The prompts of one side (unsafe or safe) and one split (train or held-out), with their set names."""

    prompts: list[str]
    set_names: list[str]
    tokens: Tokens | None = None
    mask: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    pooled_reference: torch.Tensor | None = None


def _split_sets(sets: dict[str, PromptSet], fraction: float, seed: int) -> tuple[_Group, _Group, dict]:
    train, heldout, summary, seen = _Group([], []), _Group([], []), {}, set()
    for name, prompt_set in sets.items():
        # A prompt listed in two files of the same side is trained and measured once, under the first file.
        keep = [i for i, p in enumerate(prompt_set.prompts) if p not in seen]
        prompt_set = prompt_set.subset(keep)
        seen.update(prompt_set.prompts)
        train_set, heldout_set = split_heldout(prompt_set, fraction, seed)
        for group, part in ((train, train_set), (heldout, heldout_set)):
            group.prompts += part.prompts
            group.set_names += [name] * len(part)
        # The hash of the prompts actually used identifies in-memory sets too, which have no file to hash.
        prompts_sha256 = hashlib.sha256("\n".join(prompt_set.prompts).encode()).hexdigest()
        summary[name] = dict(
            prompt_set.source, prompts_sha256=prompts_sha256, train=len(train_set), heldout=len(heldout_set)
        )
    return train, heldout, summary


def _fingerprint(loaded_source: dict, family: str, config: AlignmentConfig, groups: dict[str, _Group]) -> str:
    settings = {k: v for k, v in config.to_dict().items() if k not in RUN_LENGTH_SETTINGS}
    if not config.adversarial_epsilon:
        # without an adversary its other settings change nothing: runs from before they existed stay resumable
        settings = {k: v for k, v in settings.items() if not k.startswith("adversarial_")}
    data = {name: hashlib.sha256("\n".join(g.prompts).encode()).hexdigest() for name, g in groups.items()}
    payload = {"model": loaded_source["text_encoder_sha256"], "family": family, "settings": settings, "data": data}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_output_dir(output_dir: Path, fingerprint: str, resume: bool, overwrite: bool) -> None:
    """Decides whether this run may write into output_dir; refuses anything that would lose other work.

    Only reads: every process runs it, so that all of them stop together on a refusal.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise SafeTextError(f"{output_dir}: exists and is not a folder")
    contents = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    run_file = output_dir / RUN_FILE
    if not contents:
        return
    if not run_file.is_file():
        raise SafeTextError(f"{output_dir}: not empty and holds no safetext run; choose an empty or new folder")
    if overwrite:
        return
    previous = json.loads(run_file.read_text()).get("fingerprint")
    if previous != fingerprint:
        raise SafeTextError(
            f"{output_dir}: holds a different run (other model, data or settings); "
            "pass --overwrite to replace it or choose another folder"
        )
    if not resume:
        raise SafeTextError(f"{output_dir}: already holds this run; pass --resume to continue it or --overwrite")


def _clear_previous_run(output_dir: Path) -> None:
    for name in RUN_ARTIFACTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _batch(
    permutations: dict,
    n: int,
    batch_size: int,
    epoch: int,
    step_in_epoch: int,
    seed: int,
    salt: int,
    rank: int,
    world: int,
) -> torch.Tensor:
    """Indices of this process's share of a global batch; the smaller set cycles through its permutation."""
    key = (salt, epoch)
    if key not in permutations:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + salt)
        permutations.clear()  # one epoch at a time
        permutations[key] = torch.randperm(n, generator=generator)
    start = step_in_epoch * batch_size * world + rank * batch_size
    return permutations[key][torch.arange(start, start + batch_size) % n]


def _measure(groups: dict[str, _Group], conditionings: dict[str, Conditioning]) -> dict:
    """Metrics per split: overall, per prompt file, over the whole sequence tensor, and of the pooled vector."""
    result = {}
    for split in ("heldout", "train"):
        unsafe, safe = groups[f"{split}_unsafe"], groups[f"{split}_safe"]
        e_unsafe, e_safe = conditionings[f"{split}_unsafe"].sequence, conditionings[f"{split}_safe"].sequence
        split_metrics = embedding_metrics(
            (e_unsafe, unsafe.reference, unsafe.mask), (e_safe, safe.reference, safe.mask)
        )
        full = embedding_metrics(
            (e_unsafe, unsafe.reference, torch.ones_like(unsafe.mask)),
            (e_safe, safe.reference, torch.ones_like(safe.mask)),
        )
        by_set = {}
        for side, group, emb in (("unsafe", unsafe, e_unsafe), ("safe", safe, e_safe)):
            for name in dict.fromkeys(group.set_names):
                idx = torch.tensor([i for i, n in enumerate(group.set_names) if n == name], dtype=torch.long)
                triple = (emb[idx], group.reference[idx], group.mask[idx])
                by_set[f"{side}:{name}"] = embedding_metrics(*((triple, None) if side == "unsafe" else (None, triple)))
        result[split] = {**split_metrics, "full_tensor": full, "by_set": by_set}
        if unsafe.pooled_reference is not None:
            # the pooled vector is one position: [n, dim] -> [n, 1, dim], that position counted
            p_unsafe, p_safe = conditionings[f"{split}_unsafe"].pooled, conditionings[f"{split}_safe"].pooled
            result[split]["pooled"] = embedding_metrics(
                (p_unsafe.unsqueeze(1), unsafe.pooled_reference.unsqueeze(1), torch.ones(len(p_unsafe), 1).bool()),
                (p_safe.unsqueeze(1), safe.pooled_reference.unsqueeze(1), torch.ones(len(p_safe), 1).bool()),
            )
    return result


def _before_after(before: dict, after: dict) -> dict:
    if isinstance(before, dict):
        return {key: _before_after(before[key], after[key]) for key in before}
    return {"before": before, "after": after}


@torch.no_grad()
def _add_init_noise(trained: torch.nn.Module, scale: float, seed: int) -> None:
    """Adds seeded Gaussian noise to the trainable weights, `scale` times each tensor's RMS (`scale` itself for an
    all-zero tensor such as LoRA's B).

    SafeText starts where its objective is stationary: the aligned embeddings equal the reference, where the
    utility distance is at its minimum and the cosine the effectiveness term pushes down is at its maximum, so the
    exact gradient is zero. The first steps would then follow rounding noise, which Adam scales up to full-size
    updates and which differs between machines, BLAS builds and process counts: the same run moved on one machine
    and stayed put on another. A seeded perturbation gives every machine and every number of processes the same
    way out (the same noise in every process, drawn on the CPU).
    """
    generator = torch.Generator().manual_seed(seed)
    for _, parameter in sorted(trained.named_parameters()):
        if not parameter.requires_grad:
            continue
        rms = float(parameter.detach().float().pow(2).mean().sqrt())
        noise = torch.randn(parameter.shape, generator=generator) * (scale * rms if rms > 0 else scale)
        parameter.add_(noise.to(device=parameter.device, dtype=parameter.dtype))


def align(
    pretrained_model_name_or_path,
    unsafe_sets: dict[str, PromptSet],
    safe_sets: dict[str, PromptSet],
    output_dir,
    config: AlignmentConfig | None = None,
    *,
    revision: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    export_pipeline: bool = False,
    show_progress: bool = True,
    family: str | None = None,
) -> AlignmentResult:
    """Aligns the text encoders of a model with SafeText and exports them.

    Args:
        pretrained_model_name_or_path: a diffusers pipeline folder or Hub id, or a bare `transformers` encoder.
        unsafe_sets: named prompt sets whose embeddings are pushed away (D_u).
        safe_sets: named prompt sets whose embeddings are held in place (D_s).
        output_dir: the folder to write (the trained encoders under their component names, e.g. `text_encoder/`
            and `text_encoder_2/`, every tokenizer, `safetext.json`, `README.md`, checkpoints).
        config: the alignment settings (defaults: `AlignmentConfig()`).
        revision: Hub revision of the base model.
        resume: continue from the last checkpoint in `output_dir` (a new run if there is none).
        overwrite: replace a previous run in `output_dir`.
        export_pipeline: also write `output_dir/pipeline/`, a complete diffusers pipeline with the aligned encoders.
        show_progress: show a progress bar.
        family: force the pipeline family (`sd`, `sdxl`, `sd3`, `flux`) instead of reading it from
            `model_index.json`.

    Returns:
        An `AlignmentResult` with the exported folder and its record.

    Raises:
        SafeTextError: bad input (see the messages: an unsupported pipeline class, a `train_encoders` name the
            family does not have, ...), or a loss that became NaN (the last good checkpoint is kept).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    config = config or AlignmentConfig()
    stopwatch = Stopwatch()
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)

    # 1. Data: unsafe prompts never count as safe; each file is split into train and held-out on its own.
    if not unsafe_sets or not safe_sets:
        raise SafeTextError("alignment needs at least one unsafe and one safe prompt set")
    unsafe_union = {p for s in unsafe_sets.values() for p in s.prompts}
    overlap_removed = {}
    cleaned_safe = {}
    for name, prompt_set in safe_sets.items():
        cleaned, removed = remove_overlap(prompt_set, PromptSet(sorted(unsafe_union)))
        if not len(cleaned):
            raise SafeTextError(f"safe set {name!r}: every prompt is also an unsafe prompt")
        cleaned_safe[name], overlap_removed[name] = cleaned, len(removed)
        if removed:
            logger.warning("removed %d prompts of safe set %r that are also unsafe prompts", len(removed), name)
    train_unsafe, heldout_unsafe, unsafe_summary = _split_sets(unsafe_sets, config.heldout_fraction, config.seed)
    train_safe, heldout_safe, safe_summary = _split_sets(cleaned_safe, config.heldout_fraction, config.seed)
    groups = {
        "train_unsafe": train_unsafe,
        "train_safe": train_safe,
        "heldout_unsafe": heldout_unsafe,
        "heldout_safe": heldout_safe,
    }
    if not train_unsafe.prompts or not train_safe.prompts:
        raise SafeTextError("no training prompts left after the held-out split; give more prompts")

    # 2. The tokenizers and text encoders only; the encoders as loaded are the frozen reference tau.
    loaded = load_text_encoder(pretrained_model_name_or_path, revision=revision, family=family)
    if export_pipeline and loaded.bare:
        # Checked before training, not at export time, so that the refusal does not cost a whole run.
        raise SafeTextError("--export-pipeline needs a diffusers pipeline as the base model, not a bare encoder")
    pipeline_family = loaded.pipeline_family
    names = pipeline_family.text_encoder_names
    train_encoders = config.train_encoders or [
        s.text_encoder for s in pipeline_family.encoders if s.trained_by_default
    ]
    unknown = [name for name in train_encoders if name not in names]
    if unknown:
        raise SafeTextError(
            f"train_encoders: {', '.join(unknown)} is not a text encoder of the {pipeline_family.name} family; "
            f"choose from {', '.join(names)}"
        )
    # keep the family's order whatever order they were named in: it fixes the optimizer's parameter order
    train_encoders = [name for name in names if name in train_encoders]
    # checked here, before the output folder is claimed: a target that matches nothing must not cost a run
    lora_targets = {}
    if config.lora_rank is not None:
        lora_targets = {
            name: resolve_target_modules(loaded.text_encoders[name], config.lora_target_modules, name)
            for name in train_encoders
        }
    # the adversary's hooks sit on the encoders' own blocks, which LoRA wraps in place; a layer the encoders do not
    # have is refused here, before the output folder is claimed
    perturbation = None
    if config.adversarial_epsilon:
        try:
            perturbation = HiddenStatePerturbation(
                {name: loaded.text_encoders[name] for name in train_encoders}, config.adversarial_layer
            )
        except ValueError as error:
            raise SafeTextError(str(error)) from None
        for spec in pipeline_family.encoders:
            last = len(transformer_layers(loaded.text_encoders[spec.text_encoder])) - 1
            unread = spec.hidden_state == "penultimate" and spec.pooled is None and config.adversarial_layer >= last
            if spec.text_encoder in train_encoders and unread:
                raise SafeTextError(
                    f"adversarial_layer={config.adversarial_layer}: {spec.text_encoder} gives the pipeline the input "
                    f"of its last block (layer {last}), so a perturbation there never reaches the conditioning; "
                    f"choose a layer below {last}"
                )
    encoders = TextEncoders(pipeline_family, loaded.text_encoders, loaded.tokenizers)
    fingerprint = _fingerprint(loaded.source, pipeline_family.name, config, groups)
    _check_output_dir(output_dir, fingerprint, resume, overwrite)
    # An encoder whose last layer only some outputs read (SDXL's CLIP-L gives its penultimate state; a bare BERT's
    # pooler is never read) has parameters without gradients, which distributed training must be told about.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=pipeline_family.name != "sd")
    accelerator = Accelerator(mixed_precision=config.mixed_precision, kwargs_handlers=[ddp])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite:
            _clear_previous_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / RUN_FILE, {"fingerprint": fingerprint, "model": loaded.source})
    accelerator.wait_for_everyone()

    # 3. Reference conditioning (sequence and pooled vector), computed once with the untouched encoders and cached in
    # float32 on the CPU: the reference never changes, so no step needs a second forward pass through a frozen copy.
    encoders.to(accelerator.device)
    truncated = 0
    for name, group in groups.items():
        if not group.prompts:
            continue
        group.tokens = encoders.tokenize(group.prompts)
        truncated += int(group.tokens.truncated.sum())
        positions = config.effectiveness_positions if name.endswith("unsafe") else config.utility_positions
        group.mask = encoders.positions(group.tokens, positions)
        reference = encoders.encode_all(group.tokens, config.eval_batch_size)
        group.reference, group.pooled_reference = reference.sequence, reference.pooled
    for group in groups.values():
        if group.tokens is None:  # a split without prompts (no held-out prompts): empty tensors of the right width
            group.mask = train_safe.mask[:0]
            group.reference = train_safe.reference[:0]
            group.pooled_reference = None if train_safe.pooled_reference is None else train_safe.pooled_reference[:0]
    if truncated:
        logger.warning(
            "%d prompts are longer than a token window and were truncated, as the pipeline truncates them", truncated
        )
    reference_norm = float(
        torch.sqrt(((train_safe.reference * train_safe.mask.unsqueeze(-1)) ** 2).sum(dim=(1, 2))).mean()
    )

    # 4. The encoders tau_s being trained start as tau; the others stay frozen (T5 by default, see train_encoders).
    base_encoders = {name: encoders.text_encoders[name] for name in train_encoders}
    base_sha256 = {}
    for name, encoder in base_encoders.items():
        if config.lora_rank is None:
            encoder.requires_grad_(True)
            if not config.train_embeddings:
                for module in encoder.modules():
                    if isinstance(module, torch.nn.Embedding):
                        module.requires_grad_(False)
        else:
            # LoRA: the encoder's own weights stay frozen; peft adds trainable low-rank matrices beside the targets
            base_sha256[name] = encoder_sha256(encoder)
            encoders.text_encoders[name] = add_lora_adapter(
                encoder, lora_targets[name], config.lora_rank, config.effective_lora_alpha, config.lora_dropout
            )
    # All stay in eval mode (the adapters peft just created too): dropout would make the utility term noisy around a
    # deterministic reference, and without it a resumed run repeats an uninterrupted one exactly.
    encoders.eval()
    for name, encoder in base_encoders.items():
        if config.lora_dropout:
            _train_lora_dropout(encoders.text_encoders[name])
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(encoder, name)
    trainable_parameters = {
        name: sum(p.numel() for p in encoders.text_encoders[name].parameters() if p.requires_grad)
        for name in train_encoders
    }
    # the trained encoders alone: what checkpoints hold (a frozen T5-XXL would add 19 GB to each)
    trained = torch.nn.ModuleDict({name: encoders.text_encoders[name] for name in train_encoders})
    if config.init_noise > 0:
        _add_init_noise(trained, config.init_noise, config.seed)
    optimizer = torch.optim.AdamW(
        [p for p in encoders.parameters() if p.requires_grad],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
        # the fused kernel updates all parameters in one pass; the default per-tensor loop costs about a fifth
        # of a CPU step for an SD-sized encoder (benchmarks/align_throughput.py)
        fused=accelerator.device.type in ("cpu", "cuda"),
    )
    encoders, optimizer = accelerator.prepare(encoders, optimizer)

    safe_batch = config.effective_safe_batch_size
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = max(
        math.ceil(len(train_unsafe.prompts) / (config.train_batch_size * world)),
        math.ceil(len(train_safe.prompts) / (safe_batch * world)),
    )
    total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch

    checkpoints_dir = output_dir / "checkpoints"
    start_step = 0
    if resume and list_checkpoints(checkpoints_dir):
        last = list_checkpoints(checkpoints_dir)[-1]
        state = load_checkpoint(last, trained, optimizer, trainable_only=config.lora_rank is not None)
        if state.get("fingerprint") != fingerprint:
            raise SafeTextError(f"{last}: checkpoint of a different run; pass --overwrite to start again")
        start_step = state["step"]
        if start_step > total_steps:
            raise SafeTextError(
                f"{last}: the run is already at step {start_step}, beyond the {total_steps} steps asked for now"
            )
        logger.info("resuming from %s (step %d of %d)", last, start_step, total_steps)
    log_path = output_dir / LOG_FILE
    if accelerator.is_main_process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, start_step)

    # 5. Train.
    train_watch = Stopwatch()
    permutations_unsafe, permutations_safe = {}, {}
    progress = tqdm(
        total=total_steps,
        initial=start_step,
        desc="align",
        disable=not (show_progress and accelerator.is_local_main_process),
    )
    last_terms = {}
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        u_idx = _batch(
            permutations_unsafe,
            len(train_unsafe.prompts),
            config.train_batch_size,
            epoch,
            step_in_epoch,
            config.seed,
            0,
            rank,
            world,
        )
        s_idx = _batch(
            permutations_safe, len(train_safe.prompts), safe_batch, epoch, step_in_epoch, config.seed, 1, rank, world
        )
        if perturbation is not None:
            _perturb_unsafe(
                perturbation, accelerator, encoders, pipeline_family, train_encoders, train_unsafe, u_idx, config, step
            )
            # The unsafe prompts twice: perturbed (the first rows, where the hooks act), then as they are. L_e is the
            # mean of both: at the worst point alone the push would start where the adversary put the embedding
            # back, at cosine 1, where the cosine's gradient vanishes, and the encoder would never leave the start.
            u_idx = torch.cat([u_idx, u_idx])
        # One forward pass over unsafe and safe prompts together: larger matrix products run closer to peak.
        batch_tokens = Tokens.concatenate([train_unsafe.tokens.select(u_idx), train_safe.tokens.select(s_idx)])
        with accelerator.autocast():
            sequence, pooled = encoders(batch_tokens)
        unsafe_emb, safe_emb = sequence.split([len(u_idx), len(s_idx)])
        device = unsafe_emb.device
        pooled_terms = {}
        if pooled is not None:
            unsafe_pooled, safe_pooled = pooled.split([len(u_idx), len(s_idx)])
            pooled_terms = {
                "safe_pooled": safe_pooled,
                "safe_pooled_reference": train_safe.pooled_reference[s_idx].to(device),
                "unsafe_pooled": unsafe_pooled,
                "unsafe_pooled_reference": train_unsafe.pooled_reference[u_idx].to(device),
                "pooled_weight": config.pooled_weight,
            }
        unsafe_reference, unsafe_mask = train_unsafe.reference[u_idx].to(device), train_unsafe.mask[u_idx].to(device)
        terms = safetext_loss(
            safe_emb,
            train_safe.reference[s_idx].to(device),
            train_safe.mask[s_idx].to(device),
            unsafe_emb,
            unsafe_reference,
            unsafe_mask,
            effectiveness_weight=config.effectiveness_weight,
            utility_distance=config.utility_distance,
            effectiveness_distance=config.effectiveness_distance,
            relative=config.distance_scale == "relative",
            **pooled_terms,
        )
        if perturbation is not None:
            # for the log: L_e at the worst point the adversary found (the first, perturbed half of the unsafe rows)
            half = len(u_idx) // 2
            with torch.no_grad():
                terms["adversarial_effectiveness_loss"] = unsafe_effectiveness(
                    unsafe_emb[:half],
                    unsafe_reference[:half],
                    unsafe_mask[:half],
                    config.effectiveness_distance,
                    config.distance_scale == "relative",
                    unsafe_pooled=None if pooled is None else pooled_terms["unsafe_pooled"][:half],
                    unsafe_pooled_reference=None if pooled is None else pooled_terms["unsafe_pooled_reference"][:half],
                    pooled_weight=config.pooled_weight,
                )
        # One gather per step: every process sees every loss, so all of them stop together on a NaN.
        gathered = accelerator.gather(torch.stack([value.detach() for value in terms.values()]).unsqueeze(0))
        if not torch.isfinite(gathered).all():
            kept = list_checkpoints(checkpoints_dir)
            where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been written yet"
            raise SafeTextError(
                f"the loss became NaN or infinite at step {step + 1}; stopped, {where}; "
                "lower --learning-rate or use full precision"
            )
        accelerator.backward(terms["loss"])
        if perturbation is not None:
            perturbation.deltas = None
        grad_norm = None
        if config.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(encoders.parameters(), config.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        mean_terms = gathered.float().mean(dim=0).tolist()
        last_terms = dict(zip(terms, mean_terms))
        progress.update(1)
        progress.set_postfix(L_u=f"{mean_terms[0]:.4f}", L_e=f"{mean_terms[1]:.4f}", loss=f"{mean_terms[2]:.4f}")
        if accelerator.is_main_process and (done % config.log_every == 0 or done == total_steps):
            entry = {
                "step": done,
                "epoch": epoch,
                **last_terms,
                "grad_norm": grad_norm,
                "learning_rate": config.learning_rate,
                "seconds": round(train_watch.seconds(), 3),
            }
            with open(log_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        if (config.checkpointing_steps and done % config.checkpointing_steps == 0) or done == total_steps:
            if accelerator.is_main_process:
                save_checkpoint(
                    checkpoints_dir / f"checkpoint-{done}",
                    trained,
                    optimizer,
                    {"step": done, "fingerprint": fingerprint, "epoch": epoch},
                    # LoRA: the adapters alone, the frozen weights are the base model's
                    trainable_only=config.lora_rank is not None,
                )
                prune_checkpoints(checkpoints_dir, config.checkpoints_total_limit)
            accelerator.wait_for_everyone()
    progress.close()
    train_seconds = train_watch.seconds()
    if perturbation is not None:
        perturbation.remove()

    # 6. Measure: embeddings of every split after alignment against the cached reference.
    aligned = accelerator.unwrap_model(encoders)
    aligned.requires_grad_(False)
    before = {name: Conditioning(g.reference, g.pooled_reference) for name, g in groups.items()}
    after = {
        name: aligned.encode_all(g.tokens, config.eval_batch_size) if g.tokens is not None else before[name]
        for name, g in groups.items()
    }
    metrics = _before_after(_measure(groups, before), _measure(groups, after))
    metrics["positions"] = {"unsafe": config.effectiveness_positions, "safe": config.utility_positions}

    # 7. Export (main process only).
    record = {
        "format": "safetext.alignment/1",
        "method": "SafeText (arXiv 2502.20623)"
        + (", pushed from a worst-case perturbation as well (safetext.adversarial)" if perturbation else ""),
        "model": {**loaded.source, "family": loaded.family, "pipeline_involved": not loaded.bare},
        "config": config.to_dict(),
        "objective": {
            "effectiveness_weight": config.effectiveness_weight,
            "distance_scale": config.distance_scale,
            # lambda expressed in the paper's raw units: with relative l2 the utility term is divided by the
            # reference norm, so the same trade-off in absolute units is lambda times that norm.
            "effectiveness_weight_absolute_units": config.effectiveness_weight
            * (reference_norm if config.distance_scale == "relative" else 1.0),
            "mean_reference_norm": reference_norm,
        },
        "data": {
            "unsafe": unsafe_summary,
            "safe": safe_summary,
            "safe_prompts_removed_as_unsafe": overlap_removed,
            "truncated_prompts": truncated,
            "heldout_fraction": config.heldout_fraction,
        },
        "metrics": metrics,
        "training": {
            "steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "resumed_from_step": start_step,
            "final_losses": last_terms,
            "num_processes": world,
            "trained_encoders": train_encoders,
            "frozen_encoders": [name for name in names if name not in train_encoders],
            "trainable_parameters": trainable_parameters,
            "gradient_checkpointing": config.gradient_checkpointing,
        },
        "lora": None
        if config.lora_rank is None
        else {
            "rank": config.lora_rank,
            "alpha": config.effective_lora_alpha,
            "dropout": config.lora_dropout,
            "target_modules": lora_targets,
            "adapters": {name: name + ADAPTER_SUFFIX for name in train_encoders},
            "base_encoder_sha256": base_sha256,
        },
        "cost": {
            "wall_seconds": None,
            "train_seconds": train_seconds,
            "seconds_per_step": train_seconds / max(total_steps - start_step, 1),
            "peak_memory_bytes": peak_memory_bytes(accelerator.device),
            "device": device_description(accelerator.device),
        },
        "versions": package_versions(),
        "git_commit": git_commit(),
        "fingerprint": fingerprint,
    }
    if accelerator.is_main_process:
        from safetext.export import export_alignment

        record["cost"]["wall_seconds"] = stopwatch.seconds()
        export_alignment(
            output_dir,
            {name: aligned.text_encoders[name] for name in train_encoders},
            loaded.tokenizers,
            record,
            lora_base_sha256=base_sha256,
            export_pipeline=export_pipeline,
            base=pretrained_model_name_or_path,
            revision=revision,
        )
    accelerator.wait_for_everyone()
    return AlignmentResult(output_dir=output_dir, record=record)


class _RunOnce:
    """Stands in for a frozen encoder: runs it on the first call and returns that output again on every later one
    (the adversary's search calls it with the same prompts each time). Attributes are the encoder's."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.output = None

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def __call__(self, *args, **kwargs):
        if self.output is None:
            with torch.no_grad():
                self.output = self.encoder(*args, **kwargs)
        return self.output


def _perturb_unsafe(
    perturbation: HiddenStatePerturbation,
    accelerator,
    encoders,
    pipeline_family,
    train_encoders: list[str],
    train_unsafe: _Group,
    u_idx: torch.Tensor,
    config: AlignmentConfig,
    step: int,
) -> None:
    """Finds the worst-case perturbation of this step's unsafe prompts and leaves it set on `perturbation`."""
    model = accelerator.unwrap_model(encoders)  # the search's passes are not training passes: no DDP wrapper
    tokens = train_unsafe.tokens.select(u_idx)
    spec_of = {spec.text_encoder: spec for spec in pipeline_family.encoders}
    shapes = {}
    for name in train_encoders:
        spec = spec_of[name]
        moved = tokens.attention_mask[spec.tokenizer].bool().clone()
        if spec.starts_with_bos:
            moved[:, 0] = False  # BOS is the same for every prompt: only the prompt's own tokens move
        perturbation.masks[name] = moved
        width = model.text_encoders[name].get_input_embeddings().embedding_dim
        shapes[name] = (len(u_idx), moved.shape[1], width)
    device = accelerator.device
    reference = train_unsafe.reference[u_idx].to(device)
    mask = train_unsafe.mask[u_idx].to(device)
    pooled_reference = None
    if train_unsafe.pooled_reference is not None:
        pooled_reference = train_unsafe.pooled_reference[u_idx].to(device)

    # a frozen encoder's part of the conditioning does not depend on the perturbation: it runs once per step, not
    # once per search step (SD3's and FLUX's T5 is most of the text side's compute)
    stand_ins = {
        name: encoder if name in train_encoders else _RunOnce(encoder) for name, encoder in model.text_encoders.items()
    }

    def unsafe_loss(deltas):
        perturbation.deltas = deltas
        with accelerator.autocast():
            conditioning = encode_tokens(pipeline_family, stand_ins, tokens)
        return unsafe_effectiveness(
            conditioning.sequence,
            reference,
            mask,
            config.effectiveness_distance,
            config.distance_scale == "relative",
            unsafe_pooled=conditioning.pooled,
            unsafe_pooled_reference=pooled_reference,
            pooled_weight=config.pooled_weight,
        )

    # seeded by step and process, so that a resumed run draws the same starting points as an uninterrupted one
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009 + accelerator.process_index + 7)
    perturbation.deltas = worst_case_deltas(
        unsafe_loss, shapes, config.adversarial_epsilon, config.adversarial_steps, generator, device
    )


def _train_lora_dropout(peft_model) -> None:
    # eval mode turned every dropout off; LoRA's own dropout layers alone go back to training mode
    for name, module in peft_model.named_modules():
        if name.endswith("lora_dropout"):
            module.train()


def _enable_gradient_checkpointing(text_encoder, name: str) -> None:
    """Turns on the encoder's own activation checkpointing (transformers), in eval mode.

    transformers checkpoints a layer (a `GradientCheckpointingLayer`: CLIP's encoder layer, T5's block) only while it
    is in training mode, and the alignment keeps the encoders in eval mode (no dropout). So those layer modules, and
    they alone, are set to training mode: their attention and dropout sublayers stay in eval mode (T5's attention,
    which also carries a checkpointing flag, would otherwise turn its dropout on), and the gradients equal those
    computed without checkpointing.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        raise SafeTextError(
            "gradient_checkpointing needs a newer transformers (one with modeling_layers.GradientCheckpointingLayer)"
        ) from None
    if not getattr(text_encoder, "supports_gradient_checkpointing", False):
        raise SafeTextError(f"{name} ({type(text_encoder).__name__}) does not support gradient checkpointing")
    # non-reentrant: with the embeddings frozen (LoRA), the reentrant form would see no input needing gradients
    kwargs = {"use_reentrant": False}
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # the name in transformers 5
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in text_encoder.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Drops log lines past the step a run resumes from, so the log reads like one uninterrupted run."""
    if not log_path.is_file():
        return
    kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    log_path.write_text("".join(line + "\n" for line in kept))
