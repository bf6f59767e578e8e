"""Throughput and resident memory of the raw-video decode path for each decoder, against bare decord, in one run.

    python benchmarks/loader_throughput.py                    # 10,000 clips per path, ~2-3 min on 2 cores
    python benchmarks/loader_throughput.py --clips 2000 --workers 1

Small synthetic h264 mp4s (made with PyAV into a temp dir, decoded from their bytes, looped over)
go through each path with the same frame sampling (`sample_frame_indices`, same seed):
  bare decord   VideoReader(BytesIO) + get_batch, nothing else: the baseline
  decord, torchcodec, pyav
                megamoe.data.video.decode_video_sample without a time limit, with data.decoder set
                to each (frame times, decode, resize, [-1, 1]); pyav runs --pyav-clips clips only.
                A decoder that cannot be imported here is left out (its row would be PyAV's)
  pool          the decord row in a DecodePool of --workers processes with a time limit (what
                guards training against decoder hangs); RSS is that of the worker processes
  loader xW     the training loader itself (ShardLoader, format=video, one bucket) over raw WebDataset
                shards of the same files, with data.num_workers = W for each W in --loader-workers:
                tar reading, header probe, decode to the bucket, batching, hand-over to the training
                process. It streams, so it is timed in alternating blocks with bare decord
                (--loader-clips per block, prefetch of at most a batch or two per worker carries over),
                once per decoder in --loader-decoders: the same shards, the same settings
Throughput is timed in interleaved rounds (every path takes turns), so the ratios to bare decord
hold on a shared, noisy machine. Then each path runs --clips clips on its own, printing resident
memory (VmRSS) after a warm-up, after 1,000 and after all clips: a per-clip leak shows as growth.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megamoe.data.decode_pool import DecodePool  # noqa: E402
from megamoe.data.video import FrameSpec, decode_video_sample, sample_frame_indices  # noqa: E402
from megamoe.data.video_decoders import DECODER_THREADS, _import  # noqa: E402
from megamoe.tools.numbered_videos import make_video  # noqa: E402

WARMUP = 50
CHECKPOINT = 1000


def rss_mib(pids: list[int] | None = None) -> float:
    """Resident memory in MiB of this process, or the sum over `pids`, from /proc/<pid>/status."""
    total = 0
    for pid in pids or ["self"]:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total / 1024


def bare_decord(files: list[bytes], spec: FrameSpec, rng) -> callable:
    import decord

    def one(i: int) -> None:
        reader = decord.VideoReader(io.BytesIO(files[i % len(files)]), ctx=decord.cpu(0), num_threads=DECODER_THREADS)
        pts = reader.get_frame_timestamp(range(len(reader)))[:, 0]
        indices = sample_frame_indices(pts, spec.num_frames, spec.fps, rng)
        reader.get_batch(indices.tolist()).asnumpy()
        del reader

    return one


def memory_run(run_range, clips: int, pids=None) -> dict:
    """Run `clips` clips after a warm-up; RSS (MiB) after the warm-up, after 1,000 and after all, and clips/s."""
    run_range(0, WARMUP)
    rss = {"warm": rss_mib(pids() if pids else None)}
    start, done = time.perf_counter(), WARMUP
    for stop in sorted({min(CHECKPOINT, clips), clips}):
        run_range(done, WARMUP + stop)
        done = WARMUP + stop
        rss[stop] = rss_mib(pids() if pids else None)
    return {"clips": clips, "clips_per_s": clips / (time.perf_counter() - start), "rss": rss}


def interleaved_throughput(paths: dict, rounds: int, chunk: int) -> dict:
    """clips/s of each path, timed in alternating chunks so load from other users of a shared
    machine falls on every path alike: the ratios are what this run can vouch for."""
    seconds = dict.fromkeys(paths, 0.0)
    offset = 10**6  # beyond the clip numbers of the memory runs; only the file index (i % files) matters
    for run_range, _ in paths.values():
        run_range(0, WARMUP)  # first calls pay for lazy imports and allocator growth
    for r in range(rounds):
        for name, (run_range, _) in paths.items():
            start = time.perf_counter()
            run_range(offset + r * chunk, offset + (r + 1) * chunk)
            seconds[name] += time.perf_counter() - start
    return {name: rounds * chunk / t for name, t in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=10000, help="clips per path in the memory runs (default 10,000)")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved throughput rounds")
    parser.add_argument(
        "--chunk", type=int, default=20, help="clips per path per throughput round (small: load changes)"
    )
    parser.add_argument("--pyav-clips", type=int, default=1000, help="clips of the PyAV memory run (0 skips PyAV)")
    parser.add_argument("--files", type=int, default=16, help="distinct synthetic videos to loop over")
    parser.add_argument("--source-size", type=int, default=64, help="source videos are N x N")
    parser.add_argument("--source-frames", type=int, default=48, help="frames per source video (at 30 fps)")
    parser.add_argument("--frames", type=int, default=17, help="clip frames (4k+1)")
    parser.add_argument("--fps", type=float, default=15.0, help="clip frame rate")
    parser.add_argument("--size", type=int, default=64, help="bucket height and width (= source: no resampling)")
    parser.add_argument("--workers", type=int, default=2, help="DecodePool processes (0 skips the pool path)")
    parser.add_argument("--timeout", type=float, default=10.0, help="DecodePool per-clip time limit, s")
    parser.add_argument("--loader-workers", default="0,2", help="data.num_workers values of the loader rows ('' skips)")
    parser.add_argument("--loader-clips", type=int, default=400, help="clips per loader/bare block")
    parser.add_argument("--loader-blocks", type=int, default=4, help="alternating loader/bare blocks")
    parser.add_argument("--loader-decoders", default="decord,torchcodec,pyav", help="data.decoder of the loader rows")
    args = parser.parse_args(argv)
    spec = FrameSpec(args.frames, args.fps, args.size, args.size)

    with tempfile.TemporaryDirectory() as tmp:  # files on disk, as the issue asks; read back as bytes
        for i in range(args.files):
            with open(os.path.join(tmp, f"clip{i:03d}.mp4"), "wb") as f:
                f.write(make_video(args.source_frames, args.source_size, args.source_size, 30.0, "libx264"))
        files = [open(os.path.join(tmp, n), "rb").read() for n in sorted(os.listdir(tmp))]
    print(
        f"{args.files} h264 mp4s {args.source_size}x{args.source_size}, {args.source_frames} frames at 30 fps, "
        f"{sum(map(len, files)) / len(files) / 1024:.1f} KiB each; clips of {spec.num_frames} frames at "
        f"{spec.fps:g} fps -> {spec.height}x{spec.width}"
    )

    rng = np.random.default_rng(0)  # numpy Generators lock internally: safe to share across threads
    one = bare_decord(files, spec, rng)

    def inline(decoder):
        return (
            lambda a, b: _each(
                range(a, b), lambda i: decode_video_sample(files[i % len(files)], spec, rng, decoder=decoder)
            ),
            None,
        )

    decoders = [d for d in ("decord", "torchcodec") if _import({"torchcodec": "torchcodec.decoders"}.get(d, d))]
    paths = {"bare decord": (lambda a, b: _each(range(a, b), one), None)}
    paths.update({d: inline(d) for d in decoders})
    # Recycling off, so a leak in the workers shows in their RSS instead of being reset.
    pool = DecodePool(args.workers, timeout_s=args.timeout, max_jobs_per_worker=None) if args.workers else None
    try:
        if pool:
            pool.map(abs, [(i,) for i in range(args.workers)])  # start the workers before timing
            paths[f"pool x{args.workers}"] = (
                lambda a, b: _run_threaded(pool, [(files[i % len(files)], spec, rng) for i in range(a, b)]),
                pool.worker_pids,
            )
        if args.pyav_clips:
            paths["pyav"] = inline("pyav")
        speed = interleaved_throughput(paths, args.rounds, args.chunk)
        memory = {
            name: memory_run(run_range, args.pyav_clips if name == "pyav" else args.clips, pids)
            for name, (run_range, pids) in paths.items()
        }
        stats = dict(pool.stats) if pool else None
    finally:
        if pool:
            pool.close()

    base = speed["bare decord"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} CPU cores ({cpu}), no GPU; python {platform.python_version()}")
    print(f"throughput: {args.rounds} interleaved rounds of {args.chunk} clips per path")
    print(
        f"{'path':<12} {'clips/s':>8} {'vs bare':>8} | memory run: {'clips':>6} {'clips/s':>8} "
        f"{'RSS MiB warm':>12} {'@1,000':>7} {'@end':>7}"
    )
    for name in paths:
        m, rss = memory[name], memory[name]["rss"]
        print(
            f"{name:<12} {speed[name]:>8.1f} {speed[name] / base:>8.2f} | {'':>11} {m['clips']:>6} "
            f"{m['clips_per_s']:>8.1f} {rss['warm']:>12.1f} {rss.get(CHECKPOINT, float('nan')):>7.1f} "
            f"{rss[m['clips']]:>7.1f}"
        )
    if stats:
        print(f"pool stats: {stats} (pool RSS is the sum over its worker processes)")
    for workers in [int(w) for w in args.loader_workers.split(",") if w.strip()]:
        for decoder in [d for d in args.loader_decoders.split(",") if d in decoders + ["pyav"]]:
            loader_rate, bare_rate = loader_vs_bare(files, spec, one, workers, args, decoder)
            print(
                f"loader x{workers:<3} {loader_rate:>8.1f} {loader_rate / bare_rate:>8.2f}   (data.decoder={decoder}, "
                f"data.num_workers={workers}; bare decord {bare_rate:.1f} clips/s in the alternating blocks)"
            )


def loader_vs_bare(
    files: list[bytes], spec: FrameSpec, bare_one, workers: int, args, decoder: str
) -> tuple[float, float]:
    """clips/s of the training loader over raw shards of `files`, and of bare decord, in alternating blocks."""
    from megamoe.data.loader import ShardLoader
    from megamoe.data.worker import StreamSpec
    from megamoe.tools.latent_shards import write_shard

    seconds, clips = {"loader": 0.0, "bare": 0.0}, args.loader_clips * args.loader_blocks
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for s in range(max(2, workers)):  # every worker needs a shard of its own
            path = os.path.join(tmp, f"raw-{s:06d}.tar")
            write_shard(
                path, [(f"{s:03d}{i:05d}", {"mp4": files[i % len(files)], "txt": b"a clip"}) for i in range(64)]
            )
            shards.append(path)
        stream = StreamSpec(
            shards=tuple(shards),
            format="video",
            seed=0,
            dp_rank=0,
            dp_size=1,
            num_workers=max(1, workers),
            micro_batch_size=1,
            buckets=((spec.num_frames, spec.height, spec.width),),
            video_frames=spec.num_frames,
            video_fps=spec.fps,
            decode_timeout_s=args.timeout,
            decoder=decoder,
        )
        loader = ShardLoader(stream, workers)
        try:
            for _ in range(WARMUP):
                next(loader)
            for block in range(args.loader_blocks):
                start = time.perf_counter()
                for _ in range(args.loader_clips):
                    assert next(loader)["pixels"].shape[1:4] == (spec.num_frames, spec.height, spec.width)
                seconds["loader"] += time.perf_counter() - start
                start = time.perf_counter()
                _each(range(block * args.loader_clips, (block + 1) * args.loader_clips), bare_one)
                seconds["bare"] += time.perf_counter() - start
        finally:
            loader.close()
    return clips / seconds["loader"], clips / seconds["bare"]


def _each(items, fn) -> None:
    """fn over items, keeping no result: holding 10,000 clips would be the memory we measure."""
    for item in items:
        fn(item)


def _run_threaded(pool: DecodePool, jobs: list) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(pool.num_workers) as executor:  # one thread per worker keeps each busy
        for _ in executor.map(lambda job: decode_video_sample(*job, pool=pool), jobs):
            pass


if __name__ == "__main__":
    main()
