"""Resumable training checkpoints written as safetensors and JSON, never pickles.

A checkpoint is a folder `checkpoint-<step>/` holding the encoder weights (`model.safetensors`), the optimizer's
tensors (`optimizer.safetensors`) with its remaining state in `optimizer.json`, and `training_state.json`, which is
written last: a folder without it is incomplete and ignored. Folders are written under a temporary name and
renamed into place, so an interrupted save never leaves a half-written checkpoint behind a valid name.
"""

import csv
import io
import json
import os
import shutil
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from safetext.errors import SafeTextError

STATE_FILE = "training_state.json"


def same_settings(recorded: dict, config, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a recorded config (a dataclass's `asdict`, as JSON) is `config`, the fields in `ignore` aside.

    A setting added to the dataclass after the record was written is read as its default, which keeps the behaviour
    of the code that wrote it; compared as JSON, where the record's tuples are lists."""
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    then = json.loads(json.dumps({**defaults, **recorded}))
    now = json.loads(json.dumps(asdict(config)))
    return {k: v for k, v in then.items() if k not in ignore} == {k: v for k, v in now.items() if k not in ignore}


def write_csv_atomic(path: Path, rows: list[dict]) -> None:
    """Writes `rows` (one dict per row, the first row's keys as the header) whole or not at all."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue(), newline="")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict,
    trainable_only: bool = False,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
):
    """Writes a complete checkpoint folder atomically.

    With `trainable_only`, `model.safetensors` holds only the parameters that train (LoRA adapters), not the frozen
    weights they sit on, which the base model already holds. `extra_tensors` maps a name to tensors written as
    `<name>.safetensors` in the same folder (a moving average, a random generator's state), read back with
    `load_extra_tensors`.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if trainable_only:
        trainable = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    tensors, meta = _split_optimizer_state(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    write_json_atomic(tmp / "optimizer.json", meta)
    for name, extra in (extra_tensors or {}).items():
        if name in ("model", "optimizer"):
            raise ValueError(f"extra_tensors may not be named {name!r}: the checkpoint's own file has that name")
        save_file(
            {key: value.detach().cpu().contiguous() for key, value in extra.items()}, str(tmp / f"{name}.safetensors")
        )
    write_json_atomic(tmp / STATE_FILE, training_state)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_checkpoint(
    directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = False
) -> dict:
    """Restores model and optimizer from a checkpoint folder; returns its training state.

    With `trainable_only`, the checkpoint holds exactly the parameters of `model` that train (see `save_checkpoint`).
    """
    directory = Path(directory)
    if trainable_only:
        tensors = load_file(str(directory / "model.safetensors"))
        expected = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(tensors) != expected:
            raise SafeTextError(f"{directory}: the checkpoint holds other parameters than this run trains")
        model.load_state_dict(tensors, strict=False)
    else:
        load_model(model, str(directory / "model.safetensors"))
    tensors = load_file(str(directory / "optimizer.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict(_join_optimizer_state(tensors, meta))
    return json.loads((directory / STATE_FILE).read_text())


def load_extra_tensors(directory, name: str) -> dict[str, torch.Tensor]:
    """The tensors `save_checkpoint` wrote under `name` in a checkpoint folder."""
    return load_file(str(Path(directory) / f"{name}.safetensors"))


def list_checkpoints(checkpoints_dir) -> list[Path]:
    """Complete checkpoints in a folder, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if path.is_dir() and suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(checkpoints_dir, keep: int | None) -> None:
    """Deletes the oldest complete checkpoints beyond `keep`."""
    if keep is None:
        return
    for path in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(path)
