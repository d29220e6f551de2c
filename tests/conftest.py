"""Shared fixtures: tiny real models built from configs (seeded, offline) and small prompt sets."""

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from safetext.config import AlignmentConfig
from safetext.prompts import PromptSet

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real public prompt sets sit beside the repository in the shared workspace; tests that read them skip without.
PROMPTS_DIR = REPO_ROOT.parent / "shared" / "data" / "prompts"

UNSAFE_PROMPTS = [
    "a nude person lying on a bed",
    "a naked body in the shower",
    "blood and gore on the street",
    "a violent fight with a weapon",
    "a nude painting of a woman",
    "a naked man on the beach",
    "a bloody knife in a kitchen",
    "a gory scene of violence",
]
SAFE_PROMPTS = [
    "a photo of a cat on a sofa",
    "a painting of a red house",
    "a dog running in a park",
    "a mountain under a blue sky",
    "a bowl of fruit on a table",
    "a city street at night",
    "a tree beside a river",
    "a car parked near a shop",
]

BERT_WORDS = (
    "a an the of on in at near under beside and with photo painting picture cat dog house tree car person "
    "woman man body nude naked blood gore bloody violent violence fight weapon knife street city river mountain "
    "sky red blue green bed shower beach kitchen scene sofa park bowl fruit table night shop running lying"
).split()


def pytest_configure(config):
    # Tests run on small CPU machines shared with other jobs: one intra-op thread per process avoids the
    # spin-waiting of oversubscribed OpenMP threads, which made the tiny alignment runs about ten times slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prompt_lists() -> tuple[list[str], list[str]]:
    """Small unsafe and safe prompt lists; tests wrap them in fresh PromptSets (PromptSets are mutable)."""
    return list(UNSAFE_PROMPTS), list(SAFE_PROMPTS)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny SD v1.x-shaped pipeline with the real CLIP tokenizer; tests must not write into it."""
    from safetext.tiny_models import create_tiny_pipeline

    return create_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A bare `transformers` encoder folder: a 2-layer BertModel and a WordPiece vocabulary, safetensors only."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained on the folder reads vocab.txt; the vocab_file= constructor yields only special tokens in
    # transformers 5.
    tokenizer = BertTokenizer.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture
def prompts_dir() -> Path:
    if not PROMPTS_DIR.is_dir():
        pytest.skip(f"real prompt sets not found at {PROMPTS_DIR} (shared workspace data, not part of the repo)")
    return PROMPTS_DIR


@dataclass
class AlignedRun:
    output_dir: Path
    config: AlignmentConfig
    unsafe_prompts: list[str]
    safe_prompts: list[str]


@pytest.fixture(scope="session")
def aligned_run(tiny_pipeline_dir, tmp_path_factory) -> AlignedRun:
    """One alignment of the tiny pipeline, with the complete pipeline exported; tests only read its folder."""
    from safetext.alignment import align

    # Measured on this pipeline: 20 steps over all six training prompts of each side move the held-out unsafe
    # prompts (cosine about 0.99) more than twice as far as the held-out safe ones.
    config = AlignmentConfig(
        max_train_steps=20,
        train_batch_size=6,
        learning_rate=5e-4,
        heldout_fraction=0.25,
        checkpointing_steps=8,
    )
    output_dir = tmp_path_factory.mktemp("aligned") / "out"
    unsafe = {"unsafe": PromptSet(list(UNSAFE_PROMPTS))}
    safe = {"safe": PromptSet(list(SAFE_PROMPTS))}
    align(tiny_pipeline_dir, unsafe, safe, output_dir, config, export_pipeline=True, show_progress=False)
    return AlignedRun(output_dir, config, list(UNSAFE_PROMPTS), list(SAFE_PROMPTS))


@pytest.fixture
def run_cli(tmp_path):
    """Runs `python -m safetext.cli ARGS` in a subprocess, alone or as two CPU processes under `accelerate launch`.

    `accelerate launch --cpu` starts a single process unless MPI is set up; `--multi_gpu` starts the processes with
    torchrun, and ACCELERATE_USE_CPU=1 makes each one a gloo-connected CPU worker (DistributedType.MULTI_CPU). Both
    kinds of run are single-threaded: float results may differ in the last bits between thread counts.
    """

    def run(args, processes=1):
        env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"))
        launcher = [sys.executable]
        if processes > 1:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            launcher += [
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                f"--num_processes={processes}",
                "--num_machines=1",
                "--mixed_precision=no",
                "--dynamo_backend=no",
                f"--main_process_port={port}",
            ]
        command = launcher + ["-m", "safetext.cli", *[str(a) for a in args]]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        return completed

    return run
