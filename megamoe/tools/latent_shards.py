"""Latent WebDataset shards as the tools write them and read them back whole.

Shard layout (written by the synthetic dataset generator and the latent encoding tool)
-------------------------------------------------------------------------------------
Each shard `shard-NNNNNN.tar` is a plain, uncompressed tar whose members are grouped by sample:

    <key>.caption.txt   utf-8 caption, e.g. "a red circle moving left"
    <key>.latents.npy   float32 [C, F, H, W], numpy .npy (no pickle)
    <key>.text.npy      float32 [text_len, text_dim], numpy .npy (no pickle)

Members are sorted by name within a sample, so a sample's files are contiguous, as WebDataset
expects. `.npy` was chosen over safetensors because numpy reads it without extra code and it
stores exactly one array, which is all a member needs.

Tars are written with Python's `tarfile` and fixed headers (mtime 0, uid/gid 0, empty user/group
names, mode 0444, USTAR): webdataset's TarWriter stamps the current time unless told otherwise,
and fixed headers make a dataset byte-identical on every machine and run.

Training does not use `read_shard`: its loader workers read tars sample by sample
(megamoe/data/worker.py). Reading a shard whole is for tools (previews, encoding raw shards) and tests.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np

from megamoe.data.shards import split_member_name


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(latents: np.ndarray, text: np.ndarray, caption: str) -> dict[str, bytes]:
    """The members of one sample, by extension (see the layout at the top of this file)."""
    return {
        "caption.txt": caption.encode("utf-8"),
        "latents.npy": _npy_bytes(latents.astype(np.float32, copy=False)),
        "text.npy": _npy_bytes(text.astype(np.float32, copy=False)),
    }


def write_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write (key, {ext: bytes}) samples as a WebDataset tar with fixed, reproducible headers."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
                info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
                tar.addfile(info, io.BytesIO(members[ext]))


def read_shard(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) samples of a WebDataset tar, in file order.

    As in WebDataset, a member `dir/name.ext.more` belongs to key `dir/name`, extension `ext.more`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent shard '{path}' does not exist")
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            parts = split_member_name(info.name)
            if parts is None:
                continue
            key, ext = parts
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


def decode_sample(key: str, members: dict[str, bytes], shard: str) -> dict:
    """A latent sample's arrays and caption from its members (`read_shard`'s second item)."""
    for ext in ("latents.npy", "text.npy"):
        if ext not in members:
            raise ValueError(f"sample '{key}' of shard '{shard}' has no '{ext}' member")
    return {
        "latents": np.load(io.BytesIO(members["latents.npy"]), allow_pickle=False),
        "text": np.load(io.BytesIO(members["text.npy"]), allow_pickle=False),
        "caption": members.get("caption.txt", b"").decode("utf-8"),
        "key": key,
    }
