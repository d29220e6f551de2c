"""LoRA alignment (peft) and gradient checkpointing on tiny real pipelines, through the CLI and the library.

The tiny SD pipeline is aligned once through `safetext.cli.main` with `--lora-rank` and `--export-pipeline`; the tests
read the folder it wrote: the merged encoder against base + adapter applied by peft, which weights changed, the
held-out moves measured with the pipeline's own `encode_prompt`, and a 2-step 64 x 64 image.
"""

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import PeftModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from safetext.alignment import _enable_gradient_checkpointing, align
from safetext.cli import main
from safetext.config import AlignmentConfig
from safetext.errors import SafeTextError
from safetext.lora import load_lora_adapter
from safetext.prompts import PromptSet, split_heldout
from safetext.tiny_models import create_tiny_pipeline

# the pooled vector of a tiny random CLIP stays in place for held-out safe prompts only when the utility term has
# seen enough different safe prompts (see there)
from test_alignment import generate
from test_alignment_families import MORE_SAFE_PROMPTS

HELDOUT_FRACTION = 0.25
# Measured on the tiny SD pipeline (six training prompts of each side, held-out prompts measured with encode_prompt):
# rank 4, alpha 8, 1e-2, 30 steps, adapters on the attention projections and the MLP: held-out unsafe cosine 0.991
# (relative move 0.126) while held-out safe prompts drift 0.036. On the attention projections alone (the default)
# LoRA separates less well on this random encoder: 20 steps at 2e-2 give 0.988 with safe drift 0.103 against an
# unsafe move of 0.157. Full fine-tuning, 20 steps at 5e-4 (conftest's aligned_run): 0.995, safe drift 0.054 against
# 0.102. LoRA needs a learning rate 20 to 40 times larger: B starts at zero and the update is a product B A.
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LORA_SETTINGS = [
    "--lora-rank=4",
    "--lora-alpha=8",
    f"--lora-target-modules={','.join(TARGETS)}",
    "--learning-rate=1e-2",
    "--max-train-steps=30",
    "--train-batch-size=6",
    f"--heldout-fraction={HELDOUT_FRACTION}",
    "--checkpointing-steps=8",
]
# the settings of the resume and checkpointing tests: short runs, every tensor compared
SHORT = {"train_batch_size": 3, "heldout_fraction": 0.25}


def run_main(argv) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


@dataclass
class LoraRun:
    base: Path
    output_dir: Path
    stdout: str

    @property
    def record(self) -> dict:
        return json.loads((self.output_dir / "safetext.json").read_text())


@pytest.fixture(scope="module")
def prompt_files(prompt_lists, tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("prompts")
    (directory / "unsafe.txt").write_text("\n".join(prompt_lists[0]) + "\n")
    (directory / "safe.txt").write_text("\n".join(prompt_lists[1]) + "\n")
    return directory / "unsafe.txt", directory / "safe.txt"


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_dir, prompt_files, tmp_path_factory) -> LoraRun:
    out = tmp_path_factory.mktemp("lora") / "out"
    argv = ["align", "--model", tiny_pipeline_dir, "--unsafe", prompt_files[0], "--safe", prompt_files[1]]
    code, stdout, stderr = run_main(argv + ["--out", out, *LORA_SETTINGS, "--export-pipeline", "--no-progress"])
    assert code == 0, stderr
    return LoraRun(tiny_pipeline_dir, out, stdout)


def heldout(prompts):
    return split_heldout(PromptSet(list(prompts)), HELDOUT_FRACTION, seed=0)[1].prompts


def encode(encoder, tokenizer, prompts) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return encoder(ids.input_ids)[0]


def test_record_and_folder_of_a_lora_run(lora_run):
    record = lora_run.record
    base = CLIPTextModel.from_pretrained(lora_run.base, subfolder="text_encoder")
    # rank 4 adapters on the targeted linear layers of every layer: A (4 x in) and B (out x 4) each
    targeted = [m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    assert len(targeted) == base.config.num_hidden_layers * len(TARGETS)
    expected = sum(4 * (m.in_features + m.out_features) for m in targeted)
    assert record["training"]["trainable_parameters"] == {"text_encoder": expected}
    assert expected < sum(p.numel() for p in base.parameters()) / 100
    lora = record["lora"]
    assert (lora["rank"], lora["alpha"], lora["dropout"]) == (4, 8.0, 0.0)
    assert lora["target_modules"] == {"text_encoder": list(TARGETS)}
    assert record["config"]["lora_target_modules"] == list(TARGETS)
    assert lora["adapters"] == {"text_encoder": "text_encoder_lora"}
    assert record["config"]["lora_rank"] == 4 and record["config"]["lora_alpha"] == 8.0
    adapter = lora_run.output_dir / "text_encoder_lora"
    for name in ("adapter_model.safetensors", "adapter_config.json", "safetext_adapter.json"):
        assert (adapter / name).is_file(), name
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8 and adapter_config["peft_type"] == "LORA"
    assert sorted(adapter_config["target_modules"]) == sorted(TARGETS)
    assert not [p for p in lora_run.output_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    # checkpoints hold the adapters and nothing of the frozen encoder
    checkpoint = load_file(lora_run.output_dir / "checkpoints" / "checkpoint-30" / "model.safetensors")
    assert sum(t.numel() for t in checkpoint.values()) == expected
    assert all(".lora_A." in name or ".lora_B." in name for name in checkpoint)
    card = (lora_run.output_dir / "README.md").read_text()
    assert "LoRA adapters (rank 4, alpha 8.0)" in card and "text_encoder_lora/" in card


def test_lora_moves_heldout_unsafe_prompts_and_keeps_safe_ones(lora_run, prompt_lists):
    # measured with the pipeline's own encode_prompt, on the exported pipeline, independently of the record
    base = StableDiffusionPipeline.from_pretrained(lora_run.base)
    aligned = DiffusionPipeline.from_pretrained(lora_run.output_dir / "pipeline")
    moves = {}
    for side, prompts in zip(("unsafe", "safe"), prompt_lists):
        with torch.no_grad():
            before = base.encode_prompt(heldout(prompts), "cpu", 1, False)[0]
            after = aligned.encode_prompt(heldout(prompts), "cpu", 1, False)[0]
        if side == "unsafe":  # the record's default positions: unsafe prompts without the constant BOS position
            before, after = before[:, 1:], after[:, 1:]
        x, y = after.flatten(1), before.flatten(1)
        cosine = torch.nn.functional.cosine_similarity(x, y, dim=1).mean().item()
        moves[side] = (cosine, ((x - y).norm(dim=1) / y.norm(dim=1)).mean().item())
    record = lora_run.record["metrics"]["heldout"]
    assert record["unsafe_cosine"]["after"] == pytest.approx(moves["unsafe"][0], abs=1e-4)
    assert record["safe_relative_drift"]["after"] == pytest.approx(moves["safe"][1], abs=1e-4)
    assert moves["unsafe"][0] < 0.995
    assert moves["safe"][1] < 0.5 * moves["unsafe"][1]
    assert "held-out unsafe cosine" in lora_run.stdout


def test_only_the_targeted_weights_change_and_merged_equals_base_plus_adapter(lora_run):
    base_weights = load_file(lora_run.base / "text_encoder" / "model.safetensors")
    merged_weights = load_file(lora_run.output_dir / "text_encoder" / "model.safetensors")
    assert merged_weights.keys() == base_weights.keys()
    for name, tensor in base_weights.items():
        targeted = name.endswith(".weight") and name.rsplit(".", 2)[-2] in TARGETS
        # LoRA adds B A to a targeted layer's weight; biases, embeddings, norms and MLPs stay exactly as they were
        assert torch.equal(merged_weights[name], tensor) != targeted, name

    merged = CLIPTextModel.from_pretrained(lora_run.output_dir, subfolder="text_encoder")
    tokenizer = StableDiffusionPipeline.from_pretrained(lora_run.base).tokenizer
    prompts = ["a nude person lying on a bed", "a photo of a cat on a sofa"]
    with_adapter = load_lora_adapter(
        CLIPTextModel.from_pretrained(lora_run.base, subfolder="text_encoder"),
        lora_run.output_dir / "text_encoder_lora",
    )
    assert isinstance(with_adapter, PeftModel)
    # peft's own loader reads the same folder (the ecosystem's layout)
    plain_peft = PeftModel.from_pretrained(
        CLIPTextModel.from_pretrained(lora_run.base, subfolder="text_encoder"),
        lora_run.output_dir / "text_encoder_lora",
    )
    expected = encode(merged, tokenizer, prompts)
    torch.testing.assert_close(encode(with_adapter, tokenizer, prompts), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode(plain_peft, tokenizer, prompts), expected, atol=1e-5, rtol=1e-5)
    base = CLIPTextModel.from_pretrained(lora_run.base, subfolder="text_encoder")
    assert not torch.allclose(encode(base, tokenizer, prompts), expected, atol=1e-3)


def test_exported_lora_pipeline_generates(lora_run):
    images = generate(DiffusionPipeline.from_pretrained(lora_run.output_dir / "pipeline"))
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_adapter_on_another_base_encoder_is_refused(lora_run, tmp_path):
    other_dir = create_tiny_pipeline(tmp_path / "other", seed=1)
    other = CLIPTextModel.from_pretrained(other_dir, subfolder="text_encoder")
    with pytest.raises(SafeTextError, match="trained on another text_encoder") as error:
        load_lora_adapter(other, lora_run.output_dir / "text_encoder_lora")
    assert "\n" not in str(error.value)
    with pytest.raises(SafeTextError, match="not a LoRA adapter folder"):
        load_lora_adapter(other, lora_run.output_dir / "text_encoder")


def test_unknown_target_module_is_one_line_and_exit_code_2(tiny_pipeline_dir, prompt_files, tmp_path):
    out = tmp_path / "out"
    argv = ["align", "--model", tiny_pipeline_dir, "--unsafe", prompt_files[0], "--safe", prompt_files[1]]
    code, _, stderr = run_main(argv + ["--out", out, "--lora-rank=4", "--lora-target-modules=q_proj,query"])
    assert code == 2
    assert stderr.strip().count("\n") == 0
    assert "'query' matches no linear layer of text_encoder" in stderr and "q_proj" in stderr
    assert not out.exists()  # refused before the output folder is claimed
    code, _, stderr = run_main(argv + ["--out", out, "--lora-alpha=8"])
    assert code == 2 and "needs lora_rank" in stderr and stderr.strip().count("\n") == 0


def test_resumed_lora_run_equals_an_uninterrupted_one(tiny_pipeline_dir, prompt_lists, tmp_path):
    def sets():
        return {"unsafe": PromptSet(list(prompt_lists[0]))}, {"safe": PromptSet(list(prompt_lists[1]))}

    lora = {"lora_rank": 2, "learning_rate": 1e-2}
    full = AlignmentConfig(max_train_steps=6, checkpointing_steps=2, **lora, **SHORT)
    align(tiny_pipeline_dir, *sets(), tmp_path / "full", full, show_progress=False)
    short = AlignmentConfig(max_train_steps=3, checkpointing_steps=2, **lora, **SHORT)
    align(tiny_pipeline_dir, *sets(), tmp_path / "resumed", short, show_progress=False)
    result = align(tiny_pipeline_dir, *sets(), tmp_path / "resumed", full, resume=True, show_progress=False)
    assert result.record["training"]["resumed_from_step"] == 3
    for folder in ("text_encoder", "text_encoder_lora"):
        name = "model.safetensors" if folder == "text_encoder" else "adapter_model.safetensors"
        a, b = load_file(tmp_path / "full" / folder / name), load_file(tmp_path / "resumed" / folder / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_gradient_checkpointing_gives_the_same_training(tiny_pipeline_dir, prompt_lists, tmp_path):
    def run(name, **settings):
        config = AlignmentConfig(max_train_steps=3, checkpointing_steps=0, learning_rate=1e-3, **SHORT, **settings)
        unsafe, safe = {"unsafe": PromptSet(list(prompt_lists[0]))}, {"safe": PromptSet(list(prompt_lists[1]))}
        align(tiny_pipeline_dir, unsafe, safe, tmp_path / name, config, show_progress=False)
        log = [json.loads(line) for line in (tmp_path / name / "logs" / "train_log.jsonl").read_text().splitlines()]
        return log, load_file(tmp_path / name / "text_encoder" / "model.safetensors")

    for settings in ({}, {"lora_rank": 2}):
        plain_log, plain = run("plain", **settings)
        checkpointed_log, checkpointed = run("checkpointed", gradient_checkpointing=True, **settings)
        for a, b in zip(plain_log, checkpointed_log):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0)
        for name in ("plain", "checkpointed"):
            import shutil

            shutil.rmtree(tmp_path / name)


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    # dropout 0.1 as in the real T5: any dropout switched on by checkpointing would change the output
    config = T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T5EncoderModel(config)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_gradient_checkpointing_recomputes_layers_in_eval_mode(tiny_pipeline_dir, kind):
    # transformers checkpoints a layer only in training mode; the alignment keeps its encoders in eval mode, so
    # this checks that the layers really run twice (forward, then again in backward) and that dropout stays off
    if kind == "clip":
        encoder = CLIPTextModel.from_pretrained(tiny_pipeline_dir, subfolder="text_encoder")
        suffix = "layers.0.self_attn"
    else:
        encoder = tiny_t5()
        suffix = "block.0.layer.0.SelfAttention"
    encoder.eval().requires_grad_(True)
    calls = []
    attention = [m for name, m in encoder.named_modules() if name.endswith(suffix)][0]
    attention.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    reference = encoder(ids)[0]
    reference.square().sum().backward()
    reference_grad = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    assert len(calls) == 1

    _enable_gradient_checkpointing(encoder, "text_encoder")
    calls.clear()
    output = encoder(ids)[0]
    output.square().sum().backward()
    assert len(calls) == 2
    assert not any(m.training for m in encoder.modules() if isinstance(m, torch.nn.Dropout))
    torch.testing.assert_close(output, reference, atol=0, rtol=0)
    for name, grad in reference_grad.items():
        torch.testing.assert_close(dict(encoder.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_lora_dropout_trains_only_the_lora_branch_with_dropout(tiny_pipeline_dir, prompt_lists, tmp_path):
    def run(name, dropout):
        config = AlignmentConfig(
            max_train_steps=2, checkpointing_steps=0, lora_rank=2, lora_dropout=dropout, learning_rate=1e-2, **SHORT
        )
        unsafe, safe = {"unsafe": PromptSet(list(prompt_lists[0]))}, {"safe": PromptSet(list(prompt_lists[1]))}
        result = align(tiny_pipeline_dir, unsafe, safe, tmp_path / name, config, show_progress=False)
        return result, load_file(tmp_path / name / "text_encoder_lora" / "adapter_model.safetensors")

    without, a = run("without", 0.0)
    with_dropout, b = run("with", 0.5)
    assert with_dropout.record["lora"]["dropout"] == 0.5
    # the first step's loss has no LoRA contribution (B starts at zero), the next ones see the dropped inputs
    assert any(not torch.equal(a[k], b[k]) for k in a)


# Measured on the tiny SDXL pipeline, rank 4 and alpha 8, 30 steps: the pooled vectors barely move up to 7e-3 (held-out
# unsafe cosine 0.997) and then give way at once (8e-3: 0.115, 1e-2: -0.65, with held-out safe drift 0.46 and 0.68),
# a sharper response to the learning rate than full fine-tuning's. 1e-2 sits inside the range that moves.
SDXL_SETTINGS = [
    "--lora-rank=4",
    "--lora-alpha=8",
    "--learning-rate=1e-2",
    "--max-train-steps=30",
    "--train-batch-size=6",
    "--safe-batch-size=12",
    f"--heldout-fraction={HELDOUT_FRACTION}",
    "--checkpointing-steps=0",
]


def test_sdxl_lora_trains_both_clip_encoders(prompt_lists, tmp_path):
    base = create_tiny_pipeline(tmp_path / "sdxl", family="sdxl", seed=0)
    unsafe_prompts, safe_prompts = prompt_lists[0], prompt_lists[1] + MORE_SAFE_PROMPTS
    unsafe, safe = tmp_path / "unsafe.txt", tmp_path / "safe.txt"
    unsafe.write_text("\n".join(unsafe_prompts) + "\n")
    safe.write_text("\n".join(safe_prompts) + "\n")
    out = tmp_path / "out"
    argv = ["align", "--model", base, "--unsafe", unsafe, "--safe", safe, "--out", out, *SDXL_SETTINGS]
    code, stdout, stderr = run_main(argv + ["--export-pipeline", "--no-progress"])
    assert code == 0, stderr
    record = json.loads((out / "safetext.json").read_text())
    assert set(record["lora"]["adapters"]) == {"text_encoder", "text_encoder_2"}
    assert set(record["training"]["trainable_parameters"]) == {"text_encoder", "text_encoder_2"}
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        with_adapter = load_lora_adapter(cls.from_pretrained(base, subfolder=name), out / f"{name}_lora")
        merged = cls.from_pretrained(out, subfolder=name)
        ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(with_adapter(ids)[0], merged(ids)[0], atol=1e-5, rtol=1e-5)

    # the pooled vector, measured with the pipeline's own encode_prompt on the exported pipeline
    pipelines = {
        "before": DiffusionPipeline.from_pretrained(base),
        "after": DiffusionPipeline.from_pretrained(out / "pipeline"),
    }
    assert isinstance(pipelines["after"], StableDiffusionXLPipeline)
    moves = {}
    for side, prompts in (("unsafe", unsafe_prompts), ("safe", safe_prompts)):
        pooled = {}
        for when, pipeline in pipelines.items():
            with torch.no_grad():
                pooled[when] = pipeline.encode_prompt(
                    heldout(prompts), device="cpu", do_classifier_free_guidance=False
                )[2]
        x, y = pooled["after"], pooled["before"]
        moves[side] = (
            torch.nn.functional.cosine_similarity(x, y, dim=1).mean().item(),
            ((x - y).norm(dim=1) / y.norm(dim=1)).mean().item(),
        )
    held = record["metrics"]["heldout"]["pooled"]
    assert held["unsafe_cosine"]["after"] == pytest.approx(moves["unsafe"][0], abs=1e-4)
    assert moves["unsafe"][0] < 0.96
    assert moves["safe"][1] < 0.7 * moves["unsafe"][1]
    images = generate(pipelines["after"])
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_flux_lora_with_t5_trained_uses_its_attention_projections(prompt_lists, tmp_path):
    base = create_tiny_pipeline(tmp_path / "flux", family="flux", seed=0)
    config = AlignmentConfig(
        lora_rank=2,
        train_encoders=["text_encoder", "text_encoder_2"],
        gradient_checkpointing=True,
        max_train_steps=2,
        checkpointing_steps=0,
        learning_rate=1e-2,
        **SHORT,
    )
    unsafe, safe = {"unsafe": PromptSet(list(prompt_lists[0]))}, {"safe": PromptSet(list(prompt_lists[1]))}
    result = align(base, unsafe, safe, tmp_path / "out", config, show_progress=False)
    lora = result.record["lora"]
    assert lora["target_modules"] == {"text_encoder": list(TARGETS[:4]), "text_encoder_2": ["q", "k", "v", "o"]}
    assert result.record["training"]["gradient_checkpointing"] is True
    assert (tmp_path / "out" / "text_encoder_2_lora" / "adapter_model.safetensors").is_file()
    adapter = load_file(tmp_path / "out" / "text_encoder_2_lora" / "adapter_model.safetensors")
    assert (
        sum(t.numel() for t in adapter.values()) == result.record["training"]["trainable_parameters"]["text_encoder_2"]
    )
    assert result.metrics["train"]["unsafe_cosine"]["after"] < 1.0


def test_two_cpu_processes_train_sdxl_lora_with_checkpointing_like_one(prompt_files, tmp_path, run_cli):
    # LoRA and gradient checkpointing under DDP, where SDXL's CLIP-L leaves its last layer's adapters without gradients
    base = create_tiny_pipeline(tmp_path / "sdxl", family="sdxl", seed=0)
    settings = ["--max-train-steps=3", "--learning-rate=1e-2", "--heldout-fraction=0.25", "--checkpointing-steps=2"]
    settings += ["--lora-rank=4", "--gradient-checkpointing", "--no-progress"]
    for processes, batch in ((2, 2), (1, 4)):
        argv = ["align", f"--model={base}", f"--unsafe={prompt_files[0]}", f"--safe={prompt_files[1]}"]
        run_cli(argv + [f"--out={tmp_path / str(processes)}", f"--train-batch-size={batch}", *settings], processes)
    logs = [
        [
            json.loads(line)["loss"]
            for line in (tmp_path / str(n) / "logs" / "train_log.jsonl").read_text().splitlines()
        ]
        for n in (2, 1)
    ]
    assert logs[0] == pytest.approx(logs[1], rel=1e-5, abs=1e-6)
    for name in ("text_encoder_lora", "text_encoder_2_lora"):
        two, one = (load_file(tmp_path / str(n) / name / "adapter_model.safetensors") for n in (2, 1))
        assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-3
        # measured: at most about 1e-5 apart (the all-reduce sums in another order), against B entries near 1.6e-2
        for key in one:
            assert torch.allclose(two[key], one[key], atol=1e-4, rtol=0), key
