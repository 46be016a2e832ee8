"""Offline image data for the fine-tuning CLI: Fashion-MNIST from Debian's gzip IDX files (no download), or a
user's ImageFolder directory (``DIR/train/<class>/*.png`` and ``DIR/val/<class>/*.png``)."""

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot")
MEAN, STD = 0.5, 0.5


def read_idx(path):
    """An IDX file (gzip or plain) as a numpy array: magic 0x00 0x00 <dtype=0x08 ubyte> <ndim>, big-endian dims."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"path: {path} is not an unsigned-byte IDX file (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_available(root=FASHION_MNIST_DIR):
    return all((Path(root) / name).exists() for pair in FASHION_MNIST_FILES.values() for name in pair)


class TensorImages(torch.utils.data.Dataset):
    """Grey uint8 images [N, H, W] -> normalised 3-channel float [3, size, size], with integer labels."""

    def __init__(self, images, labels, img_size, classes):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).long()
        self.img_size = img_size
        self.classes = list(classes)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = (self.images[i].float()[None] / 255.0 - MEAN) / STD  # [1, H, W]
        if x.shape[-1] != self.img_size:
            x = torch.nn.functional.interpolate(x[None], size=self.img_size, mode="bilinear", align_corners=False)[0]
        return x.expand(3, -1, -1), self.labels[i]


def fashion_mnist(split, img_size, classes=None, root=FASHION_MNIST_DIR):
    """Fashion-MNIST ``split`` ("train" | "val"), optionally only ``classes`` (relabelled 0..k-1 in that order)."""
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images, labels = read_idx(Path(root) / images_file), read_idx(Path(root) / labels_file).astype(np.int64)
    classes = list(range(10)) if classes is None else list(classes)
    relabel = np.full(10, -1)
    relabel[classes] = np.arange(len(classes))  # class classes[j] -> label j
    keep = relabel[labels] >= 0
    images, labels = images[keep], relabel[labels[keep]]
    return TensorImages(images, labels, img_size, [FASHION_MNIST_CLASSES[c] for c in classes])


def image_folder(root, split, img_size):
    """torchvision ImageFolder of ``root/split`` resized to img_size, normalised like the Fashion-MNIST path."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.ToTensor(),
                             transforms.Normalize([MEAN] * 3, [STD] * 3)])
    return datasets.ImageFolder(str(Path(root) / split), transform=tf)
