import copy
import json

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from safetext.errors import SafeTextError
from safetext.export import export_alignment, model_card
from safetext.loading import load_text_encoder


@pytest.fixture(scope="module")
def record(aligned_run):
    return json.loads((aligned_run.output_dir / "safetext.json").read_text())


def test_export_writes_the_ecosystem_layout(tiny_pipeline_dir, record, tmp_path):
    loaded = load_text_encoder(tiny_pipeline_dir)
    record = copy.deepcopy(record)
    record.pop("pipeline_dir", None)
    export_alignment(tmp_path, loaded.text_encoder, loaded.tokenizer, record)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "safetext.json", "text_encoder", "tokenizer"]
    assert json.loads((tmp_path / "safetext.json").read_text()) == record
    text_encoder = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    for name, value in loaded.text_encoder.state_dict().items():
        assert torch.equal(text_encoder.state_dict()[name], value)
    assert [p.suffix for p in (tmp_path / "text_encoder").iterdir() if p.name != "config.json"] == [".safetensors"]
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    assert tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == loaded.tokenizer("a photo of a cat").input_ids
    # the exported folder is itself loadable as a base model for a further alignment or evaluation
    again = load_text_encoder(tmp_path)
    assert again.source["kind"] == "aligned_text_encoder" and again.family == "sd" and not again.bare


def test_export_replaces_a_previous_export(tiny_pipeline_dir, record, tmp_path):
    loaded = load_text_encoder(tiny_pipeline_dir)
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "pytorch_model.bin").write_bytes(b"old pickle")
    (tmp_path / "text_encoder.tmp").mkdir()  # left by a crash
    export_alignment(tmp_path, loaded.text_encoder, loaded.tokenizer, copy.deepcopy(record))
    assert sorted(p.name for p in (tmp_path / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))


def test_export_pipeline_needs_a_pipeline_base(tiny_bert_dir, record, tmp_path):
    bert = load_text_encoder(tiny_bert_dir)
    bare = copy.deepcopy(record)
    bare["model"]["pipeline_involved"] = False
    with pytest.raises(SafeTextError, match="--export-pipeline needs a diffusers pipeline"):
        export_alignment(tmp_path, bert.text_encoder, bert.tokenizer, bare, export_pipeline=True, base=tiny_bert_dir)


def test_model_card_reports_metrics_data_and_cost(record):
    card = model_card(record)
    assert card.startswith("---\nlibrary_name: transformers\n")
    heldout = record["metrics"]["heldout"]["unsafe_cosine"]
    assert f"| heldout | unsafe prompts: cosine to the original embedding | {heldout['before']:.3f} | " in card
    assert f"{heldout['after']:.3f} |" in card
    assert "| `unsafe:unsafe` | unsafe_cosine |" in card and "| `safe:safe` | safe_relative_drift |" in card
    assert "| unsafe | `unsafe` | 6 | 2 |" in card
    assert f"{record['training']['steps']} steps in" in card
    assert 'CLIPTextModel.from_pretrained("{this folder}", subfolder="text_encoder")' in card
    assert "No diffusion pipeline was involved" not in card
    assert record["model"]["text_encoder_sha256"][:16] in card


def test_model_card_of_a_bare_encoder_without_heldout_prompts(record):
    bare = copy.deepcopy(record)
    bare["model"]["pipeline_involved"] = False
    bare["metrics"]["heldout"] = {"full_tensor": {}, "by_set": {}}
    card = model_card(bare)
    assert "No diffusion pipeline was involved" in card
    assert 'AutoModel.from_pretrained("{this folder}", subfolder="text_encoder")' in card
    assert "| heldout |" not in card and "| train | unsafe prompts" in card


def test_export_without_pipeline_removes_a_stale_pipeline_folder(tiny_pipeline_dir, record, tmp_path):
    # a run exported with its pipeline, then resumed without --export-pipeline: the old pipeline/ would hold the
    # encoder of an earlier step beside the new text_encoder/
    loaded = load_text_encoder(tiny_pipeline_dir)
    (tmp_path / "pipeline" / "text_encoder").mkdir(parents=True)
    record = copy.deepcopy(record)
    record.pop("pipeline_dir", None)
    export_alignment(tmp_path, loaded.text_encoder, loaded.tokenizer, record)
    assert not (tmp_path / "pipeline").exists()
