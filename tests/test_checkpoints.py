"""Checkpoints on shared storage (bdlab.checkpoints): a trial that moves to another node finds its
last checkpoint there. The URI path runs through pyarrow's file systems, the same code as s3://,
here on a file:// URI (no object store is reachable from the tests)."""

from __future__ import annotations

import torch
from bdlab.checkpoints import CheckpointPlace

from trials.checkpoint import STATE_FILE, load_state, save_state


def test_a_checkpoint_pushed_from_one_node_is_pulled_on_another(tmp_path):
    shared = (tmp_path / "bucket" / "study_1" / "7").as_uri()
    first = CheckpointPlace(shared)
    local = first.pull()
    assert local.is_dir() and list(local.iterdir()) == []  # nothing saved yet
    save_state({"step": 3, "w": torch.arange(6.0)}, local)
    first.push(local)
    save_state({"step": 5, "w": torch.arange(6.0) * 2}, local)  # the next checkpoint replaces it
    first.push(local)
    remote = sorted(p.name for p in (tmp_path / "bucket" / "study_1" / "7").iterdir())
    assert STATE_FILE in remote and len(remote) == 2  # state.json and the newest tensors only

    second = CheckpointPlace(shared)  # the retry, on another node
    moved = second.pull()
    assert moved != local
    state = load_state(moved)
    assert state["step"] == 5 and torch.equal(state["w"], torch.arange(6.0) * 2)
    second.remove()
    assert not (tmp_path / "bucket" / "study_1" / "7").exists() and not moved.exists()


def test_a_folder_is_used_as_it_is(tmp_path):
    place = CheckpointPlace(str(tmp_path / "nfs" / "trial"))
    assert place.pull() == tmp_path / "nfs" / "trial"
    save_state({"step": 1}, place.pull())
    place.push(place.pull())  # nothing to mirror
    assert load_state(tmp_path / "nfs" / "trial") == {"step": 1}
    place.remove()
    assert not (tmp_path / "nfs" / "trial").exists()


def test_each_checkpoint_of_a_defense_is_handed_to_the_mirror(tmp_path):
    from trials.defenses import DefenseContext

    mirrored = []
    ctx = DefenseContext(
        device=torch.device("cpu"),
        seed=0,
        generator=torch.Generator().manual_seed(0),
        checkpoint_dir=tmp_path / "local",
        checkpoint_saved=mirrored.append,
    )
    layer = torch.nn.Linear(2, 2)
    ctx.save_checkpoint(4, {"model": layer})
    assert mirrored == [tmp_path / "local"] and load_state(tmp_path / "local")["step"] == 4
    place = CheckpointPlace((tmp_path / "bucket").as_uri())
    place.push(mirrored[0])  # what the worker's callback does with it
    restored = torch.nn.Linear(2, 2)
    again = DefenseContext(
        device=torch.device("cpu"),
        seed=0,
        generator=torch.Generator(),
        checkpoint_dir=CheckpointPlace((tmp_path / "bucket").as_uri()).pull(),
    )
    assert again.load_checkpoint({"model": restored}) == 4
    assert torch.equal(restored.weight, layer.weight)
