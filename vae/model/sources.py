"""The data sets' facts and MNIST's raw files, without torch.

What a driver needs before any cluster work (`preflight`: are the files there and whole, or can they be
downloaded) and what the figures and the packer read (sizes, the toy's density), in a module that a sweep's
driver can import without torch (about 2.4 CPU-s to import). `vae.model.data` turns the files into tensors.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from vae.config import DATA_DIR_ENV, OFFLINE_ENV, offline

GAUSSIAN_MEAN = (1.0, 0.5)
GAUSSIAN_COV = ((1.0, 0.5), (0.5, 1.0))
GAUSSIAN_TRAIN, GAUSSIAN_TEST = 10_000, 2_000
INPUT_DIM = {"mnist": 784, "binarized-mnist": 784, "gaussian2d": len(GAUSSIAN_MEAN)}  # features of one example
TEST_SIZE = {"mnist": 10_000, "binarized-mnist": 10_000, "gaussian2d": GAUSSIAN_TEST}  # examples in the test split
# binarized-mnist's test set is binarized once, with this seed, for every run (streams.test_binarization)
BINARIZED_TEST_SEED = 0
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_SIZES = dict(zip(MNIST_FILES, (47_040_016, 60_008, 7_840_016, 10_008)))
# The raw files' digests (the same bytes every mirror serves); a folder's own MNIST/MD5SUMS, if any, wins.
MNIST_MD5 = dict(zip(MNIST_FILES, ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
                                   "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637")))


class DataError(RuntimeError):
    """Data that cannot be had; the message names the folder or file."""


def read_mnist_files(root: str) -> dict[str, tuple[bytearray, list[int], int]]:
    """Refuse missing, truncated or corrupted MNIST files, naming the file; returns each file's bytes, the
    shape its IDX header gives and where its values start.

    Sizes, IDX headers and MD5 digests are checked (the digests in `MNIST/MD5SUMS` when the folder has
    one, else the known ones). Each file is read once, into a writable buffer (so torch.frombuffer can view
    it without a copy). Nothing is repaired or downloaded here.
    """
    raw = Path(root) / "MNIST" / "raw"
    sums_file = Path(root) / "MNIST" / "MD5SUMS"
    expected = dict(MNIST_MD5)
    source = "the known MNIST digests"
    if sums_file.is_file():
        source = str(sums_file)
        for line in sums_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                expected[parts[1]] = parts[0]
    files: dict[str, tuple[bytearray, list[int], int]] = {}
    for name in MNIST_FILES:
        path = raw / name
        if not path.is_file():
            raise DataError(f"MNIST file missing: {path}")
        size = path.stat().st_size
        if size != MNIST_SIZES[name]:
            raise DataError(f"MNIST file {path} has {size} bytes, expected {MNIST_SIZES[name]} "
                            "(truncated or corrupted; replace it, it is not repaired here)")
        blob = bytearray(size)
        with open(path, "rb") as f:
            f.readinto(blob)
        files[name] = (blob, *_idx_header(blob, path))
        want = expected.get(name, "")
        if want:
            got = hashlib.md5(blob).hexdigest()
            if got != want:
                raise DataError(f"MNIST file {path} has MD5 {got}, expected {want} from {source} "
                                "(corrupted; replace it, it is not repaired here)")
    return files


def _idx_header(blob: bytearray, path: Path) -> tuple[list[int], int]:
    """An IDX file of unsigned bytes (magic 0x0000080N, N big-endian int32 sizes, then the values): its shape
    and the offset of its values."""
    magic = int.from_bytes(blob[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise DataError(f"MNIST file {path} is not an IDX file of bytes (magic {magic:#x})")
    shape = [int.from_bytes(blob[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(blob) - offset != math.prod(shape):
        raise DataError(f"MNIST file {path} holds {len(blob) - offset} values, its header says {shape}")
    return shape, offset


def mnist_present(root: str) -> bool:
    """Some of MNIST's raw files are in `root` (whether whole is `read_mnist_files`'s question)."""
    raw = Path(root) / "MNIST" / "raw"
    return any((raw / f).exists() for f in MNIST_FILES)


def download_mnist(root: str) -> None:
    """Fetch MNIST into `root` with torchvision, unless $VAE_OFFLINE forbids the network; one-line errors."""
    raw = Path(root) / "MNIST" / "raw"
    if offline():
        raise DataError(f"MNIST is not in {raw} and {OFFLINE_ENV}=1 forbids downloading it; point --data-dir "
                        f"or {DATA_DIR_ENV} at a folder that holds it, or unset {OFFLINE_ENV} to download it")
    from torchvision.datasets import MNIST  # only a download needs torchvision (and torch)

    try:
        MNIST(root, train=True, download=True)
    except Exception as e:  # URLError, HTTPError, RuntimeError from torchvision
        raise DataError(f"MNIST is not in {raw} and could not be downloaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"point --data-dir or {DATA_DIR_ENV} at a folder that holds it") from None


def preflight(dataset: str, data_dir: str) -> None:
    """Fail early, naming the file, if the data cannot be had; cheap when MNIST is already there."""
    if dataset in ("mnist", "binarized-mnist"):
        if not mnist_present(data_dir):
            download_mnist(data_dir)  # or says why it cannot
        read_mnist_files(data_dir)
