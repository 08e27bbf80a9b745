"""Truncated, mis-shaped and hostile files are refused clearly; nothing unpickles."""

import pickle

import numpy as np
import pytest
import torch

from weightpca.adapters import GPTAdapter
from weightpca.io import WeightFileError, load_npy, load_tensors, save_tensors

from conftest import tiny_run, train_to


class CreatesMarker:
    """Unpickling this calls open(marker, 'w'): the file appears if anything unpickles it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("trained")
    train_to(tiny_run(max_steps=4), tiny_data, out / "d", out / "w")
    return out / "d"


def test_truncated_safetensors(trained, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((trained / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(WeightFileError, match=r"model\.safetensors: not a readable safetensors file"):
        GPTAdapter.load(bad, trained / "config.json").model


def test_right_name_wrong_shapes(trained, tmp_path):
    w = load_tensors(trained / "model.safetensors")
    w["transformer.wpe.weight"] = torch.zeros(8, 16)
    save_tensors(tmp_path / "model.safetensors", w)
    with pytest.raises(
        WeightFileError, match=r"'transformer\.wpe\.weight' has shape \(8, 16\), the model expects \(16, 16\)"
    ):
        GPTAdapter.load(tmp_path / "model.safetensors", trained / "config.json").model


def test_pickle_disguised_as_weights_never_unpickled(trained, tmp_path):
    marker = tmp_path / "marker"
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps(CreatesMarker(marker)))
    with pytest.raises(WeightFileError, match="model.safetensors"):
        GPTAdapter.load(fake, trained / "config.json").model
    assert not marker.exists()


def test_npy_with_pickled_objects_refused(tmp_path):
    marker = tmp_path / "marker"
    np.save(tmp_path / "wte.npy", np.array([CreatesMarker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(WeightFileError, match=r"wte\.npy: refused, not a plain numeric \.npy"):
        load_npy(tmp_path / "wte.npy")
    assert not marker.exists()


def test_damaged_checkpoint_state_refused(tiny_data, tmp_path):
    from weightpca.checkpoint import latest_checkpoint
    from weightpca.train import config_hash

    run = tiny_run(max_steps=8, checkpoint_every=4)
    work = tmp_path / "work"
    ckpt = work / "ckpt" / "step_00000004"
    ckpt.mkdir(parents=True)
    (work / "ckpt" / "LATEST").write_text("step_00000004\n")
    marker = tmp_path / "marker"
    (ckpt / "state.safetensors").write_bytes(pickle.dumps(CreatesMarker(marker)))
    with pytest.raises(WeightFileError, match=r"state\.safetensors: unreadable checkpoint state.*delete"):
        latest_checkpoint(work / "ckpt", config_hash(run))
    assert not marker.exists()
