"""Typed per-sample data errors: the loader catches `SampleError`, counts it by `cause`, and skips.

A bad sample must never be silently dropped nor stop training, so every failure of reading one
sample (a broken video, a missing caption, a hung decoder) is raised as `SampleError` with one of
the cause constants below; anything else that escapes is a bug, not bad data.
"""

from __future__ import annotations

CORRUPT_VIDEO = "corrupt_video"  # zero bytes, truncated, not a video, or no decodable frames
TOO_SHORT = "too_short"  # decodable, but shorter than the requested clip at the requested fps
BAD_CAPTION = "bad_caption"  # caption present but empty, not utf-8, or malformed json (see utf8_caption)
BAD_LATENT = "bad_latent"  # latent/text .npy member unreadable or of the wrong shape/dtype
BAD_TAR = "bad_tar"  # the shard itself cannot be read as a tar
DECODE_TIMEOUT = "decode_timeout"  # the decode worker ran past its time limit and was killed
MISSING_MEMBER = "missing_member"  # a required member (video, caption, latents) is absent
WORKER_DIED = "worker_died"  # the decode worker process died (segfault, OOM kill) mid-job
BAD_SHAPE = "bad_shape"  # readable, but its shape does not fit the model or the parallel layout (buckets.shape_problem)

CAUSES = (
    CORRUPT_VIDEO,
    TOO_SHORT,
    BAD_CAPTION,
    BAD_LATENT,
    BAD_TAR,
    DECODE_TIMEOUT,
    MISSING_MEMBER,
    WORKER_DIED,
    BAD_SHAPE,
)


def utf8_caption(raw: bytes, key: str | None = None, shard: str | None = None, what: str = "caption") -> str:
    """The one rule for caption bytes, wherever they are read (make_shards, either loader): they
    must be UTF-8, or the sample is refused as BAD_CAPTION rather than kept with replacement
    characters the text encoder would then embed."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(BAD_CAPTION, key, shard, f"the {what} is not utf-8: {e}") from None


class SampleError(Exception):
    """One sample (or shard) could not be read; `cause` says why, in one of `CAUSES`."""

    def __init__(self, cause: str, key: str | None = None, shard: str | None = None, detail: str = ""):
        if cause not in CAUSES:
            raise ValueError(f"unknown SampleError cause {cause!r}; use one of {CAUSES}")
        self.cause, self.key, self.shard, self.detail = cause, key, shard, detail
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"sample '{self.key or '?'}' of shard '{self.shard or '?'}'"
        return f"{self.cause}: {where}" + (f": {self.detail}" if self.detail else "")

    def with_location(self, key: str | None = None, shard: str | None = None) -> SampleError:
        """Fill in key/shard where the raiser did not know them (decoding sees bytes, not names)."""
        self.key = self.key or key
        self.shard = self.shard or shard
        self.args = (self._message(),)
        return self

    def __reduce__(self):  # so errors cross process boundaries (DecodePool) intact
        return (SampleError, (self.cause, self.key, self.shard, self.detail))
