import json

import torch

from safetext.checkpointing import (
    STATE_FILE,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_json_atomic,
)


def make_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    # a parameter that never gets a gradient has no optimizer state; the checkpoint must cope with that
    model.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    return model


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)


def train_step(model, optimizer, step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(5, 4, generator=generator)
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_round_trip_continues_exactly(tmp_path):
    model = make_model(0)
    optimizer = make_optimizer(model)
    for step in range(3):
        train_step(model, optimizer, step)
    save_checkpoint(tmp_path / "checkpoint-3", model, optimizer, {"step": 3, "fingerprint": "abc"})

    restored = make_model(1)
    restored_optimizer = make_optimizer(restored)
    state = load_checkpoint(tmp_path / "checkpoint-3", restored, restored_optimizer)
    assert state == {"step": 3, "fingerprint": "abc"}
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)

    for step in range(3, 6):
        train_step(model, optimizer, step)
        train_step(restored, restored_optimizer, step)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert list(restored_optimizer.param_groups[0]["betas"]) == [0.8, 0.95]


def test_checkpoint_folder_holds_safetensors_and_json_only(tmp_path):
    model = make_model(0)
    optimizer = make_optimizer(model)
    train_step(model, optimizer, 0)
    save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, {"step": 1})
    names = sorted(p.name for p in (tmp_path / "checkpoint-1").iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", STATE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    meta = json.loads((tmp_path / "checkpoint-1" / "optimizer.json").read_text())
    assert meta["param_groups"][0]["lr"] == 1e-2


def test_save_replaces_a_checkpoint_and_a_leftover_temporary_folder(tmp_path):
    model = make_model(0)
    optimizer = make_optimizer(model)
    (tmp_path / "checkpoint-2.tmp").mkdir()
    (tmp_path / "checkpoint-2.tmp" / "junk").write_text("half-written")
    save_checkpoint(tmp_path / "checkpoint-2", model, optimizer, {"step": 1})
    save_checkpoint(tmp_path / "checkpoint-2", model, optimizer, {"step": 2})
    assert json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_list_checkpoints_orders_by_step_and_skips_incomplete_ones(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_json_atomic(tmp_path / f"checkpoint-{step}" / STATE_FILE, {"step": step})
    (tmp_path / "checkpoint-11").mkdir()  # no state file: interrupted while saving
    (tmp_path / "checkpoint-12.tmp").mkdir()
    write_json_atomic(tmp_path / "checkpoint-12.tmp" / STATE_FILE, {"step": 12})
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-13").write_text("a file")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_json_atomic(tmp_path / f"checkpoint-{step}" / STATE_FILE, {"step": step})
    prune_checkpoints(tmp_path, None)
    assert len(list_checkpoints(tmp_path)) == 4
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_write_json_atomic(tmp_path):
    write_json_atomic(tmp_path / "run.json", {"b": 1, "a": [1.5, None]})
    write_json_atomic(tmp_path / "run.json", {"b": 2})
    assert json.loads((tmp_path / "run.json").read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
