"""Raw video -> a clip of its bucket: probe the container, pick the bucket, decode straight to its size.

`decode_to_bucket` runs inside a `DecodePool` worker (it is module-level and picklable), so the
probe is under the same time limit as the decode. The bucket must be known before decoding
because `decode_clip_uint8` resizes while decoding; the probe demuxes (no decoding) for the frame
times and decodes the first frame for the display rotation.
"""

from __future__ import annotations

from megamoe.data.buckets import BAD_SHAPE, NO_BUCKET, TOO_SHORT, assign_bucket
from megamoe.data.video import probe_video


def longest_fitting(span_s: float, target_fps: float, lengths) -> int:
    """The longest clip length in `lengths` that a video whose frames span `span_s` seconds
    holds at target_fps (the rule sample_frame_indices draws by); 0 when none."""
    from megamoe.data.video import clip_fits

    return max((n for n in lengths if clip_fits(span_s, n, target_fps)), default=0)


def decode_to_bucket(data: bytes, spec, seed: int) -> dict:
    """{'clip': uint8 [F, H, W, 3], 'bucket': [F, H, W]} or {'skip': cause}; `spec` is a StreamSpec.

    A bucket that does not fit the model or the layout (`StreamSpec.shape_problem`) is skipped as
    'bad_shape'; with configured buckets, validation has refused such buckets already.

    With no buckets configured the bucket is the source size rounded down to a multiple of
    VAE compression x patch size (the centre is cropped), at data.video_frames frames.
    """
    from megamoe.data.video import FrameSpec, decode_clip_uint8

    info = probe_video(data)  # height and width as displayed (a phone video's rotation applied)
    span, height, width = info["span"], info["height"], info["width"]
    if spec.buckets:
        available = longest_fitting(span, spec.video_fps, sorted({b[0] for b in spec.buckets}))
        bucket, cause = assign_bucket((available, height, width), spec.buckets, crop_only=False)
    else:
        mh, mw = spec.compression[1] * spec.patch_size[1], spec.compression[1] * spec.patch_size[2]
        bucket, cause = (spec.video_frames, height - height % mh, width - width % mw), None
        if not longest_fitting(span, spec.video_fps, [spec.video_frames]):
            bucket, cause = None, TOO_SHORT
        elif height < mh or width < mw:
            bucket, cause = None, NO_BUCKET
    if bucket is None:
        return {"skip": cause}
    if spec.shape_problem(bucket) is not None:  # before the decode it would waste
        return {"skip": BAD_SHAPE}
    clip, _ = decode_clip_uint8(
        data, FrameSpec(bucket[0], spec.video_fps, bucket[1], bucket[2]), seed, spec.decoder, (height, width)
    )
    return {"clip": clip, "bucket": list(bucket)}
