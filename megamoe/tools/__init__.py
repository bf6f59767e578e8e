"""What runs around training rather than in it: writing datasets and checkpoints to start from,
planning a layout, writing videos.

The command lines live in data/, launcher/ and benchmarks/; this package is their library half,
which tests import. Training itself calls two things here before its first step: the synthetic
dataset generator when `data.path` is null (synthetic_data.py, from megamoe/data/loader.py) and
the checkpoint size for the free-space check (parameter_counts.py, from
megamoe/train/run_dir.py).
"""
