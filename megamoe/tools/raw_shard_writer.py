"""Raw video WebDataset shards from a folder of videos or an index: probe, caption, write.

Raw shard layout (one sample = one video and its caption):

    <key>.mp4 | .webm | .mov | .mkv   the video file's bytes, unchanged
    <key>.txt                          utf-8 caption   (or <key>.json: {"caption": "..."})

Cut into scenes (`scenes=SplitOptions(...)`, megamoe/tools/scene_split.py), one sample = one scene:

    <key>_s<NNN>.mp4                   the scene's frames re-encoded as a video of their own
    <key>_s<NNN>.txt                   its caption  (or in the json member below, as "caption")
    <key>_s<NNN>.json                  {"video": key, "start": s, "end": s}, seconds in the source

A caption that is not UTF-8 is not stored (with replacement characters, say): its video is skipped
as 'bad_caption', the cause the loaders count for such a caption (megamoe/data/errors.py utf8_caption).

`key` is the sample's position among the accepted inputs, `%08d` (a source file name may contain
dots, which WebDataset would split at). Tars use the fixed headers of latent_shards.py's
`write_shard`, so the same inputs give byte-identical shards. Beside the shards, `index.jsonl`
holds one line per sample: key, shard, source, frames, height, width, fps, duration (frames / fps,
seconds), codec, which is what bucketing and filtering need without opening a video. Inputs that
cannot be used are skipped and listed in `skipped.jsonl` with their cause (megamoe/data/errors.py constants).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

from megamoe.data.errors import BAD_CAPTION, CORRUPT_VIDEO, MISSING_MEMBER, TOO_SHORT, SampleError, utf8_caption
from megamoe.data.video import probe_video
from megamoe.tools.scene_split import SplitOptions, caption_for, captions_past_end, scene_segments

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")
TAR_BLOCK = 512


def _sidecar_caption(video_path: str) -> bytes | None:
    path = os.path.splitext(video_path)[0] + ".txt"
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()  # decoded when written: a caption that is not UTF-8 skips its video


def collect_inputs(folder: str | None = None, index: str | None = None) -> list[tuple[str, str | bytes | None]]:
    """(video path, caption or None) pairs, from `folder` (recursively, sidecar `<stem>.txt`
    captions as bytes, sorted by path) or from `index`: CSV with columns path,caption or JSONL lines
    {"path", "caption"}; relative paths are relative to the index file's directory."""
    if (folder is None) == (index is None):
        raise ValueError("give exactly one of a folder of videos or an --index file")
    if folder is not None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"video folder '{folder}' does not exist")
        paths = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(folder)
            for name in names
            if name.lower().endswith(VIDEO_SUFFIXES)
        )
        return [(p, _sidecar_caption(p)) for p in paths]
    base = os.path.dirname(os.path.abspath(index))
    rows: list[dict] = []
    with open(index, newline="", encoding="utf-8") as f:
        if index.endswith((".jsonl", ".json")):
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise ValueError(f"{index}:{number} is not a JSON object: {e}") from None
        else:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ValueError(f"CSV index '{index}' needs a header row with columns path,caption")
            rows = list(reader)
    out = []
    for row in rows:
        path = os.path.join(base, os.path.expanduser(str(row["path"])))
        caption = row.get("caption")
        out.append((path, caption if isinstance(caption, str) else None))
    return out


class TarShardWriter:
    """Writes samples into `prefix-NNNNNN.tar` files, starting a new one past `shard_bytes`."""

    def __init__(self, out_dir: str, shard_bytes: int, prefix: str = "shard"):
        self.out_dir, self.shard_bytes, self.prefix = out_dir, shard_bytes, prefix
        self.names: list[str] = []
        self._file = self._tar = None
        self._size = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.names):06d}.tar"
        self.names.append(name)
        self._file = open(os.path.join(self.out_dir, name), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._size = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    def write(self, key: str, members: dict[str, bytes]) -> str:
        """Add one sample; returns the shard name it went into."""
        size = sum(TAR_BLOCK + -(-len(b) // TAR_BLOCK) * TAR_BLOCK for b in members.values())
        if self._tar is None or (self._size and self._size + size > self.shard_bytes):
            self._close_current()
            self._open()
        for ext in sorted(members):  # same fixed headers as latent_shards.write_shard: reproducible bytes
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
            info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self._size += size
        return self.names[-1]

    def close(self) -> None:
        self._close_current()


def _clean_caption(caption: str | bytes | None) -> str:
    """The caption with whitespace collapsed; SampleError when it is missing, not UTF-8 or empty."""
    if caption is None:
        raise SampleError(MISSING_MEMBER, detail="no caption (sidecar .txt or index entry)")
    if isinstance(caption, bytes):
        caption = utf8_caption(caption, what="sidecar caption")
    caption = " ".join(caption.split())
    if not caption:
        raise SampleError(BAD_CAPTION, detail="the caption is empty")
    return caption


def _caption_member(caption: str, caption_format: str, extra: dict | None = None) -> dict[str, bytes]:
    """The caption as `txt` (extra fields, if any, in a `json` member beside it) or as `json`."""
    if caption_format == "json":
        return {"json": json.dumps({"caption": caption, **(extra or {})}, ensure_ascii=False).encode("utf-8")}
    members = {"txt": caption.encode("utf-8")}
    if extra:
        members["json"] = json.dumps(extra).encode("utf-8")
    return members


def write_raw_shards(
    inputs: list[tuple[str, str | bytes | None]],
    out_dir: str,
    shard_size_mb: float = 256.0,
    caption_format: str = "txt",
    log=print,
    scenes: SplitOptions | None = None,
) -> dict:
    """Probe each (video, caption), write the usable ones into raw shards of about `shard_size_mb`.

    With `scenes`, each video is cut at its shot boundaries and each segment long enough for
    `scenes.min_frames` frames at `scenes.fps` becomes a sample of its own (megamoe/tools/scene_split.py):
    key `<video key>_s<NNN>` (NNN: the scene's number in the video), the segment's mp4, its caption
    (the segment caption that overlaps it most, else the video's) and {"video", "start", "end"} in
    its json member (seconds in the source). A video needs its own caption only for segments no
    segment caption overlaps; segments too short or without a caption are counted, not written.

    Returns {'samples': n, 'shards': [...], 'skipped': {cause: n}} (videos skipped, by cause), and
    with `scenes` also 'videos' (videos cut), 'short_segments', 'uncaptioned_segments' and
    'captions_past_end' (line numbers of segment captions starting after their video ends). Writes
    index.jsonl and skipped.jsonl into `out_dir` (which must hold no shards yet). `log` gets one
    line per video or segment skipped; `summary(report, ...)` is the closing line.
    """
    if caption_format not in ("txt", "json"):
        raise ValueError(f"caption_format must be 'txt' or 'json', got {caption_format!r}")
    os.makedirs(out_dir, exist_ok=True)
    if any(n.endswith(".tar") for n in os.listdir(out_dir)):
        raise FileExistsError(f"'{out_dir}' already holds shards; write into an empty directory")
    writer = TarShardWriter(out_dir, int(shard_size_mb * 1024 * 1024))
    skipped: dict[str, int] = {}
    dropped = {"short_segments": 0, "uncaptioned_segments": 0}
    past_end: list[int] = []  # segment caption lines that start after their video ends
    count = samples = 0
    with (
        open(os.path.join(out_dir, "index.jsonl"), "w") as index,
        open(os.path.join(out_dir, "skipped.jsonl"), "w") as skip_log,
    ):

        def skip(path: str, e: SampleError, **where) -> None:
            skip_log.write(json.dumps({"source": path, **where, "cause": e.cause, "detail": e.detail}) + "\n")
            log(f"skip {path}{''.join(f' {k} {v}' for k, v in where.items())}: {e.cause}: {e.detail}")

        for path, caption in inputs:
            segment_captions = scenes.captions.get(path, []) if scenes else []
            try:
                try:
                    caption = _clean_caption(caption)
                except SampleError:
                    if not segment_captions:
                        raise
                    caption = None  # segments no segment caption overlaps are dropped, and counted
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as e:
                    raise SampleError(CORRUPT_VIDEO, detail=f"cannot read the file: {e}") from None
                info = probe_video(data)
            except SampleError as e:
                skipped[e.cause] = skipped.get(e.cause, 0) + 1
                skip(path, e)
                continue
            key = f"{count:08d}"
            count += 1
            if scenes is None:
                ext = os.path.splitext(path)[1].lower().lstrip(".")
                shard = writer.write(key, {ext: data, **_caption_member(caption, caption_format)})
                index.write(json.dumps({"key": key, "shard": shard, "source": path, **info}) + "\n")
                samples += 1
                continue
            written = samples
            try:
                video_end = None  # the last segment's end
                for segment in scene_segments(path, scenes.threshold):
                    video_end = segment.end
                    start, end = round(float(segment.start), 6), round(float(segment.end), 6)
                    where = {"segment": segment.index, "start": start, "end": end}
                    if not segment.long_enough(scenes.min_frames, scenes.fps):
                        dropped["short_segments"] += 1
                        # Its span, not its frame count, decides (a variable frame rate has no fixed ratio).
                        need = (scenes.min_frames - 1) / scenes.fps
                        detail = (
                            f"spans {segment.span:.3f} s ({segment.frames} frames); a clip of "
                            f"{scenes.min_frames} frames at {scenes.fps:g} fps needs {need:.3f} s"
                        )
                        skip(path, SampleError(TOO_SHORT, detail=detail), **where)
                        continue
                    text = caption_for(start, end, segment_captions) or caption
                    if text is None:
                        dropped["uncaptioned_segments"] += 1
                        detail = "no segment caption overlaps it and the video has no caption of its own"
                        skip(path, SampleError(MISSING_MEMBER, detail=detail), **where)
                        continue
                    segment_key = f"{key}_s{segment.index:03d}"
                    extra = {"video": key, "start": start, "end": end}
                    shard = writer.write(
                        segment_key, {"mp4": segment.data, **_caption_member(text, caption_format, extra)}
                    )
                    row = {"key": segment_key, "shard": shard, "source": path, **where, **probe_video(segment.data)}
                    index.write(json.dumps(row) + "\n")
                    samples += 1
                if video_end is not None:
                    past_end += [c.line for c in captions_past_end(segment_captions, video_end)]
            except SampleError as e:  # a stream broken past its header: the segments before the break stay
                skipped[e.cause] = skipped.get(e.cause, 0) + 1
                skip(path, e)
            log(f"{path}: {samples - written} scenes written")
    writer.close()
    report = {"samples": samples, "shards": list(writer.names), "skipped": skipped}
    if scenes is not None:
        report.update(videos=count, **dropped, captions_past_end=sorted(past_end))
    return report


def summary(report: dict, out_dir: str, scenes: SplitOptions | None = None) -> str:
    """One line: samples, shards, videos skipped by cause, and with scenes the segments not written."""
    skipped = ", ".join(f"{n} {cause}" for cause, n in sorted(report["skipped"].items())) or "none"
    line = f"{report['samples']} samples in {len(report['shards'])} shards in {out_dir}; skipped: {skipped}"
    if scenes is not None:
        line += (
            f"; scenes of {report['videos']} video{'' if report['videos'] == 1 else 's'}, not written: "
            f"{report['short_segments']} shorter than "
            f"{scenes.min_frames} frames at {scenes.fps:g} fps, {report['uncaptioned_segments']} without a caption"
        )
        if report["captions_past_end"]:
            lines = report["captions_past_end"]
            shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            line += (
                f"; warning: {len(lines)} segment caption(s) start after their video ends, so label no "
                f"scene (lines {shown}): check their times and video"
            )
    return line
