"""A feature size that differs from the model's input is caught at setup, from the h5 shapes, naming the bags."""

import h5py
import numpy as np
import pytest
from mil_helpers import classification_folder, random_bag, write_bag

from mamba2d.data.bags import BagFileError, check_feature_dim, feature_dims
from mamba2d.data.slides import SlideBagDataModule


def test_feature_dims_read_the_dataset_shape_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    a = write_bag(tmp_path / "a.h5", *random_bag(rng, 5, dim=8))
    b = write_bag(tmp_path / "b.h5", *random_bag(rng, 7, dim=16))
    with h5py.File(tmp_path / "c.h5", "w") as handle:  # (1, N, D) as some extractors store it
        handle.create_dataset("features", data=np.zeros((1, 4, 8), np.float32))
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    assert feature_dims([a, b, tmp_path / "c.h5"]) == {a: 8, b: 16, tmp_path / "c.h5": 8}
    assert reads == []  # no feature row was read
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(BagFileError, match="junk.h5: not a readable HDF5 file"):
        feature_dims([tmp_path / "junk.h5"])
    with h5py.File(tmp_path / "nofeat.h5", "w") as handle:
        handle.create_dataset("coords", data=np.zeros((3, 2)))
    with pytest.raises(BagFileError, match=r"nofeat.h5: missing dataset 'features'; found \['coords'\]"):
        feature_dims([tmp_path / "nofeat.h5"])


def test_check_feature_dim_names_the_bags_and_the_option(tmp_path):
    rng = np.random.default_rng(1)
    bags = [write_bag(tmp_path / f"s{i}.h5", *random_bag(rng, 5, dim=8)) for i in range(3)]
    check_feature_dim(bags, 8)
    with pytest.raises(BagFileError, match=r"expects 1024-d features but 3 of 3 bag\(s\) differ \(8-d: .*s0.h5, "
                                           r".*s1.h5, .*s2.h5\); set --model.init_args.in_dim 8"):
        check_feature_dim(bags, 1024)
    odd = write_bag(tmp_path / "odd.h5", *random_bag(rng, 5, dim=16))
    with pytest.raises(BagFileError, match=r"1 of 4 bag\(s\) differ \(16-d: .*odd.h5\); the bags have different "
                                           "feature sizes"):
        check_feature_dim([*bags, odd], 8)


def test_slide_mil_setup_rejects_a_wrong_in_dim_before_the_first_step(tmp_path):
    import lightning

    from mamba2d.tasks.mil import SlideMIL

    csv = classification_folder(tmp_path, n=8, dim=8)
    data = SlideBagDataModule(str(tmp_path), str(csv))
    data.setup("fit")
    assert len(data.bag_paths()) == 8 and all(p.suffix == ".h5" for p in data.bag_paths())
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(BagFileError, match=r"expects 32-d features but 8 of 8 bag\(s\) differ .*in_dim 8"):
        trainer.fit(SlideMIL("mean", in_dim=32, num_classes=2), datamodule=data)
