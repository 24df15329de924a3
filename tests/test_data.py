"""Whole-split tensors, per-rank shards, and MNIST files that are refused, not repaired."""

import shutil

import pytest
import torch

from vae.model import data, sources


def test_shards_are_disjoint_cover_everything_and_reshuffle_every_epoch():
    n, world = 1000, 4
    shards = [data.shard_indices(n, r, world, epoch=1, seed=0) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    assert not torch.equal(data.shard_indices(n, 0, world, 2, 0), shards[0])
    assert torch.equal(data.shard_indices(n, 0, world, 1, 0), shards[0])  # seeded: repeatable
    assert not torch.equal(data.shard_indices(n, 0, world, 1, 1), shards[0])


def test_uneven_shards_are_padded_to_equal_length_like_distributed_sampler():
    shards = [data.shard_indices(10, r, 3, 1, 0) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(torch.cat(shards).tolist()) == set(range(10))


def test_mnist_is_seed_one_intensities(data_dir):
    d = data.load_mnist(data_dir, subset=500)
    assert d.train.x.shape == (500, 784) and d.test.x.shape == (10_000, 784)
    assert d.train.x.dtype == torch.float32
    assert 0.0 <= d.train.x.min() and d.train.x.max() <= 1.0
    assert len(torch.unique(d.train.x)) > 2  # not binarised
    assert d.train.y[:5].tolist() == [5, 0, 4, 1, 9]


def test_gaussian_toy_has_the_seed_two_moments():
    d = data.gaussian2d(seed=0)
    assert len(d.train) == 10_000 and len(d.test) == 2_000
    x = d.train.x
    torch.testing.assert_close(x.mean(0), torch.tensor(data.GAUSSIAN_MEAN), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), torch.tensor(data.GAUSSIAN_COV), atol=0.05, rtol=0)
    assert torch.equal(data.gaussian2d(seed=0).train.x, x)


def _copy_mnist(src: str, dst) -> str:
    shutil.copytree(f"{src}/MNIST", dst / "MNIST")
    return str(dst)


def _flip_last_byte(path) -> None:
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_truncated_mnist_file_is_named_and_left_alone(data_dir, tmp_path):
    root = _copy_mnist(data_dir, tmp_path)
    target = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(sources.DataError, match="t10k-labels-idx1-ubyte.*100 bytes"):
        data.load_mnist(root)
    assert target.stat().st_size == 100  # not "fixed" by a download


def test_corrupted_mnist_file_fails_its_checksum(data_dir, tmp_path):
    root = _copy_mnist(data_dir, tmp_path)
    _flip_last_byte(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte")
    with pytest.raises(sources.DataError, match="train-labels-idx1-ubyte has MD5 .* expected a25bea73"):
        data.load_mnist(root)


def test_without_an_md5sums_file_the_known_digests_are_checked(data_dir, tmp_path):
    root = _copy_mnist(data_dir, tmp_path)
    (tmp_path / "MNIST").chmod(0o755)
    (tmp_path / "MNIST" / "MD5SUMS").unlink(missing_ok=True)  # as torchvision downloads it
    data.check_mnist_files(root)
    _flip_last_byte(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(sources.DataError, match="has MD5 .* expected 27ae3e4e.* from the known MNIST digests"):
        data.load_mnist(root)


def test_missing_mnist_file_is_named(data_dir, tmp_path):
    root = _copy_mnist(data_dir, tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").unlink()
    with pytest.raises(sources.DataError, match="missing: .*train-images-idx3-ubyte"):
        data.load_mnist(root)


def test_mnist_parsed_from_the_raw_files_equals_torchvisions_reading(data_dir):
    from torchvision.datasets import MNIST

    ours = data.load_mnist(data_dir)
    for split, tv in ((ours.train, MNIST(data_dir, train=True)), (ours.test, MNIST(data_dir, train=False))):
        assert torch.equal(split.x, tv.data.reshape(len(tv.data), -1).float() / 255)
        assert torch.equal(split.y, tv.targets)


def test_a_file_that_is_not_idx_is_refused_by_name(data_dir, tmp_path):
    root = _copy_mnist(data_dir, tmp_path)
    (tmp_path / "MNIST").chmod(0o755)
    (tmp_path / "MNIST" / "MD5SUMS").unlink(missing_ok=True)  # the header is checked before any digest
    target = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    target.chmod(0o644)
    good = target.read_bytes()
    target.write_bytes(b"\x00\x00\x09\x09" + good[4:])
    for check in (lambda: sources.preflight("mnist", root), lambda: data.load_mnist(root)):  # before Ray starts too
        with pytest.raises(sources.DataError, match="t10k-labels-idx1-ubyte is not an IDX file"):
            check()
    target.write_bytes(good[:4] + (9999).to_bytes(4, "big") + good[8:])  # a header that miscounts
    with pytest.raises(sources.DataError, match=r"holds 10000 values, its header says \[9999\]"):
        sources.preflight("mnist", root)
