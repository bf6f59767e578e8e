"""Where a dataset's WebDataset shards are, and which sample a tar member belongs to.

The loader resolves `data.path` with `resolve_shards`; its workers read the tars themselves
(megamoe/data/worker.py) and group members into samples with `split_member_name`, WebDataset's
naming rule. The latent shard layout is described in megamoe/tools/latent_shards.py.
"""

from __future__ import annotations

import glob
import os

from braceexpand import braceexpand


def resolve_shards(path: str) -> list[str]:
    """Shard files of a directory (its *.tar), a single .tar, a brace pattern or a glob."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.tar")))
    elif "{" in path:
        expanded = list(braceexpand(path))
        shards = [p for p in expanded if os.path.isfile(p)]
        missing = [p for p in expanded if not os.path.isfile(p)]
        if shards and missing:  # a partial pattern is almost always a typo or an unfinished copy
            raise FileNotFoundError(f"{len(missing)} shard(s) of '{path}' do not exist, e.g. '{missing[0]}'")
    elif glob.has_magic(path):
        shards = sorted(glob.glob(path))
    else:
        shards = [path] if os.path.isfile(path) else []
    if not shards:
        raise ValueError(
            f"no shards found at '{path}'; give a directory of .tar shards, a .tar file "
            f"or a pattern like dir/shard-{{000000..000009}}.tar"
        )
    return shards


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset naming: 'dir/00000001.latents.npy' -> ('dir/00000001', 'latents.npy');
    None for a member without an extension (not part of a sample)."""
    directory, base = os.path.split(name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext
