"""Training loader: ms per 32K sample (read, JPEG decode, patchify, collate) vs the reference's dense mask.

    python benchmarks/bench_loader.py [--images 256] [--texts 80] [--samples 12] [--workers 0 1 2]
                                      [--dense-seq 4096 8192] [--patch-dtype-only]

Data (made here, nothing downloaded): real photos (scikit-image's samples) re-encoded as JPEGs at sizes
from 256 px to 1024 px long side, each with a caption, and text documents of log-normal length;
preprocessed by the real pipeline into 32K packs (JPEG storage), captions and text as two prefixes
blended 0.7 / 0.3 as ``--data-path 0.7 CAPTIONS 0.3 TEXT``. Printed, each loader run in a fresh process:

* ms per 32K sample of the full path (read pack, decode JPEGs, patchify + normalise, collate with labels,
  positions, ``cu_seqlens``) with N worker processes, per worker and as aggregate samples/s, including
  worker start-up; peak RSS of the main process and of the largest worker;
* where one sample's time goes (in-process): read, decode + patchify, collate;
* the reference collator's dense block-diagonal causal mask (``(b, s, s)`` bool, built as its
  ``get_attention_mask_and_position_ids`` does, with its Python loop for position ids) at ``--dense-seq``,
  measured, then extrapolated to 32768 by s² (pass ``--dense-seq 32768`` to measure it: ~4 GiB peak);
  against our collate at 32768, measured;
* patches as float32 (normalised on the host, as before) vs uint8 (the stored pixels, normalised on the
  device): bytes per 32K micro-batch and collate time, side by side on one 32K pack of 15,763 patches (the
  measured mean); ``--patch-dtype-only`` prints just this (seconds, no data to build).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# Only light imports up here: preprocessing workers (forkserver) import this module as their __main__.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

SEQ_LENGTH = 32768
SIZES = [
    (256, 256),
    (320, 240),
    (480, 360),
    (512, 512),
    (640, 480),
    (800, 600),
    (1024, 768),
    (768, 1024),
    (1024, 576),
    (1024, 1024),
]
PAD_ID = 2
MIB = 2**20


def build_prefixes(root: Path, n_images: int, n_texts: int) -> tuple[str, str]:
    """Caption and text prefixes of 32K packs, through the real preprocessing pipeline."""
    import io

    from bench_preprocess import make_data

    from megatron.solo.data.pipeline import PreprocessConfig, preprocess

    captions, texts, _ = make_data(root, n_images, n_texts, sizes=SIZES)
    prefixes = []
    for source in (captions, texts):
        prefix = str(root / source.stem)
        preprocess(PreprocessConfig(inputs=(str(source),), output_prefix=prefix, progress=False), stream=io.StringIO())
        prefixes.append(prefix)
    return prefixes[0], prefixes[1]


def _status_mib(field: str, pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_mib(pid: int | str = "self") -> float:
    """Peak RSS: VmHWM, which starts afresh at exec (ru_maxrss would carry the launching process's peak over)."""
    return _status_mib("VmHWM", pid)


def worker_peak_mib() -> float:
    """Largest peak RSS among this process's live children (the DataLoader's workers), 0 without any."""
    pids = [
        int(p)
        for task in os.listdir("/proc/self/task")
        for p in open(f"/proc/self/task/{task}/children").read().split()
    ]
    return max((peak_mib(pid) for pid in pids), default=0.0)


# ---------------------------------------------------------------------------------------------
# Measurements, each run in a fresh process (--child) so that peak RSS is its own


def measure_loader(blend: list[tuple[float, str]], workers: int, samples: int) -> dict:
    """Full loader path over ``samples`` 32K samples with micro-batch 1; wall time includes worker start-up."""
    from megatron.solo.training.dataset import BlendedPackDataset, build_train_loader

    ds = BlendedPackDataset(blend, samples, seed=0)
    base = rss_mib()
    start = time.perf_counter()
    batches = build_train_loader(
        ds,
        seq_length=SEQ_LENGTH,
        micro_batch_size=1,
        data_parallel_rank=0,
        data_parallel_size=1,
        num_workers=workers,
        pad_id=PAD_ID,
        timeout=600,
    )
    patches, workers_mib = [], 0.0
    for batch in batches:
        patches.append(len(batch.patches))
        workers_mib = max(workers_mib, worker_peak_mib())  # while they live: they exit with the last batch
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "samples": len(patches),
        "patches": float(np.mean(patches)),
        "base_mib": base,
        "main_peak_mib": peak_mib(),
        "worker_peak_mib": workers_mib,
    }


def reference_dense_mask(tokens: np.ndarray, doc_offsets: np.ndarray, s: int):
    """The reference collator's step 7 for one row: a (1, s, s) bool mask (True = masked) and position ids."""
    import torch

    row = torch.from_numpy(tokens[:s])
    ex_id = torch.zeros(s, dtype=torch.int64)
    for start in doc_offsets[1:-1]:
        if start < s:
            ex_id[int(start) :] += 1
    causal = torch.tril(torch.ones((s, s), dtype=torch.bool))
    mask = ~((ex_id[:, None] == ex_id[None, :]) & causal & (row != PAD_ID)[:, None])
    ids = ex_id.tolist()
    position_ids, pos = [0] * s, 0  # the reference's Python loop
    for t in range(1, s):
        pos = 0 if ids[t] != ids[t - 1] else pos + 1
        position_ids[t] = pos
    return mask[None], torch.tensor(position_ids)


def measure_dense(n_tokens: int, doc_offsets: list[int], sizes: list[int]) -> dict:
    """One row of the reference's dense mask per size in ``sizes`` (ascending), for a pack of these documents.

    Runs in a process that imports only torch, so the peak RSS it reports is the mask's own.
    """
    tokens = np.full(SEQ_LENGTH, PAD_ID, np.int64)
    tokens[:n_tokens] = PAD_ID + 1
    reference_dense_mask(tokens, np.asarray(doc_offsets), 64)  # imports torch outside the measurement
    out = {}
    for s in sorted(sizes):
        base = rss_mib()
        start = time.perf_counter()
        mask, _ = reference_dense_mask(tokens, np.asarray(doc_offsets), s)
        out[s] = {
            "seconds": time.perf_counter() - start,
            "mask_mib": mask.numel() / MIB,
            "peak_extra_mib": peak_mib() - base,
        }
        del mask
    return out


def run_child(kind: str, **kwargs) -> dict:
    """Run ``measure_<kind>(**kwargs)`` in a fresh interpreter; its JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps({"kind": kind, **kwargs})],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode:
        raise RuntimeError(f"measure_{kind}({kwargs}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# In-process figures


def stage_times(blend: list[tuple[float, str]], samples: int) -> dict:
    """Seconds per sample of each loader stage, in this process, on the blend's first ``samples``."""
    from megatron.solo.batch import PackedExample
    from megatron.solo.training.dataset import BlendedPackDataset, _Collate

    ds = BlendedPackDataset(blend, samples, seed=0, decode_patches=False)
    collate = _Collate(SEQ_LENGTH, PAD_ID, ds.patch_dim).collate  # the loader's: collate + gathered patches
    times = {"read": 0.0, "decode + patchify (uint8)": 0.0, "collate": 0.0}
    for i in range(samples):
        prefix, pack = ds.source(i)
        t0 = time.perf_counter()
        view = ds.datasets[int(ds.dataset_index[i])][pack]
        tokens, targets = view.tokens.astype(np.int64), view.targets
        t1 = time.perf_counter()
        patches = view.patches_uint8()  # what the loader ships (normalised on the device)
        t2 = time.perf_counter()
        collate([PackedExample(tokens, targets, view.doc_offsets, patches, view.patch_positions)])
        t3 = time.perf_counter()
        for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[name] += dt / samples
    return times


def collate_cost() -> tuple[float, float]:
    """(seconds, peak MiB) of our collate for one 32K row of 8 documents, without patches (the mask's part)."""
    import tracemalloc

    from megatron.solo.batch import PackedExample, collate

    rng = np.random.default_rng(0)
    ex = PackedExample(
        rng.integers(3, 30000, SEQ_LENGTH),
        np.ones(SEQ_LENGTH, bool),
        np.linspace(0, SEQ_LENGTH, 9).astype(np.int64),
        np.zeros((0, 3072), np.uint8),
        np.zeros(0, np.int64),
    )
    tracemalloc.start()
    start = time.perf_counter()
    collate([ex], SEQ_LENGTH, pad_id=PAD_ID)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / MIB
    tracemalloc.stop()
    return seconds, peak


def patch_dtype_costs(n_patches: int = 15_763, rounds: int = 5) -> dict:
    """float32 vs uint8 patches for one 32K micro-batch: bytes of the Batch, collate ms (best of ``rounds``),
    and the normalisation that moves from the host loader to the device (timed here on CPU torch)."""
    import torch

    from megatron.solo.batch import PackedExample, collate
    from megatron.solo.image import DEFAULT_CONFIG, normalize_patches, normalize_patches_torch

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n_patches, DEFAULT_CONFIG.patch_dim), dtype=np.uint8)
    tokens = rng.integers(3, 30000, SEQ_LENGTH)
    positions = np.sort(rng.choice(SEQ_LENGTH, n_patches, replace=False))
    offsets = np.linspace(0, SEQ_LENGTH, 9).astype(np.int64)
    out = {}
    real_worker_info = torch.utils.data.get_worker_info
    torch.utils.data.get_worker_info = lambda: True  # collate as in a worker: patches gathered into shared memory
    try:
        for name, patches in (("float32", normalize_patches(raw)), ("uint8", raw)):
            ex = PackedExample(tokens, np.ones(SEQ_LENGTH, bool), offsets, patches, positions)
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                batch = collate([ex], SEQ_LENGTH, pad_id=PAD_ID)
                best = min(best, time.perf_counter() - start)
            nbytes = sum(v.numel() * v.element_size() for v in vars(batch).values() if isinstance(v, torch.Tensor))
            out[name] = {
                "collate_ms": 1000 * best,
                "batch_mib": nbytes / MIB,
                "patch_mib": batch.patches.numel() * batch.patches.element_size() / MIB,
            }
    finally:
        torch.utils.data.get_worker_info = real_worker_info
    host = min(_timed(lambda: normalize_patches(raw)) for _ in range(rounds))
    device = min(_timed(lambda: normalize_patches_torch(torch.from_numpy(raw))) for _ in range(rounds))
    out["normalise_ms"] = {
        "numpy (host loader, before)": 1000 * host,
        "torch CPU (stand-in for the device)": 1000 * device,
    }
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def print_patch_dtype_costs() -> None:
    r = patch_dtype_costs()
    f, u = r["float32"], r["uint8"]
    print(
        f"  patches per 32K micro-batch (15,763 patches): float32 {f['batch_mib']:.0f} MiB per Batch "
        f"({f['patch_mib']:.0f} MiB patches), collate {f['collate_ms']:.1f} ms; uint8 {u['batch_mib']:.0f} MiB "
        f"({u['patch_mib']:.0f} MiB patches), collate {u['collate_ms']:.1f} ms (in a worker: into shared memory): "
        f"{f['batch_mib'] / u['batch_mib']:.1f}x fewer bytes host -> device, collate "
        f"{f['collate_ms'] / u['collate_ms']:.1f}x faster"
    )
    print("  normalising those patches: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["normalise_ms"].items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="captioned photos (~64 per 32K pack)")
    parser.add_argument("--texts", type=int, default=80, help="text documents (~35 per 32K pack)")
    parser.add_argument("--samples", type=int, default=12, help="32K samples per loader run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-weight", type=float, default=0.7, help="blend weight of the caption prefix")
    parser.add_argument(
        "--dense-seq",
        type=int,
        nargs="+",
        default=[4096, 8192],
        help="sequence lengths at which to measure the reference's dense mask",
    )
    parser.add_argument(
        "--patch-dtype-only", action="store_true", help="only the float32 vs uint8 patch comparison (no data to build)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.patch_dtype_only:
        print_patch_dtype_costs()
        return
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(globals()["measure_" + spec.pop("kind")](**spec)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        captions, text = build_prefixes(Path(tmp), args.images, args.texts)
        from megatron.solo.data.packed_format import PackedDataset

        packs = {p: PackedDataset(p) for p in (captions, text)}
        print(
            f"{args.images} photos (JPEG, {SIZES[0]}…{SIZES[-1]}) with captions -> {len(packs[captions])} packs, "
            f"{args.texts} texts -> {len(packs[text])} packs of <= {SEQ_LENGTH} tokens "
            f"(mean {np.mean(np.concatenate([d.sequence_lengths for d in packs.values()])):.0f}), "
            f"preprocessed in {time.perf_counter() - start:.0f} s; blend {args.image_weight:g} captions / "
            f"{1 - args.image_weight:g} text; {os.cpu_count()} CPUs (shared)"
        )
        blend = [(args.image_weight, captions), (1 - args.image_weight, text)]
        loader_ms = {}
        for workers in args.workers:
            r = run_child("loader", blend=blend, workers=workers, samples=args.samples)
            ms = 1000 * r["seconds"] / r["samples"]
            loader_ms[workers] = ms
            label = "in-process (num_workers=0)" if workers == 0 else f"num_workers={workers}"
            worker_mem = f", largest worker {r['worker_peak_mib']:6.0f} MiB (forked)" if workers else ""
            print(
                f"  loader, {label:27s} {ms:7.1f} ms/sample = {ms * max(workers, 1):7.1f} ms per worker, "
                f"{1000 / ms:5.2f} samples/s; {r['patches']:,.0f} patches/sample; peak RSS main "
                f"{r['main_peak_mib']:6.0f} MiB (after imports {r['base_mib']:.0f}){worker_mem}"
            )
        stages = stage_times(blend, args.samples)
        total = sum(stages.values())
        print(
            "  per sample, in-process: "
            + ", ".join(f"{k} {1000 * v:.1f} ms ({100 * v / total:.0f}%)" for k, v in stages.items())
        )
        print_patch_dtype_costs()
        ours_s, ours_mib = collate_cost()
        print(
            f"  our collate, one 32K row of 8 documents (no patches): {1000 * ours_s:7.2f} ms, "
            f"peak {ours_mib:.1f} MiB (tracemalloc)"
        )
        first = packs[captions][0]
        dense = run_child(
            "dense", n_tokens=len(first.tokens), doc_offsets=first.doc_offsets.tolist(), sizes=args.dense_seq
        )
        dense = {int(s): r for s, r in dense.items()}
        for s, r in dense.items():
            print(
                f"  reference dense mask, s={s:5d}, measured:   {1000 * r['seconds']:9.1f} ms, mask "
                f"{r['mask_mib']:7.0f} MiB, peak +{r['peak_extra_mib']:6.0f} MiB RSS"
            )
        s, r = max(dense.items())
        scale = (SEQ_LENGTH / s) ** 2
        ms32, mib32 = 1000 * r["seconds"] * scale, r["peak_extra_mib"] * scale
        how = "measured" if s == SEQ_LENGTH else f"x{scale:.0f} from s={s}"
        print(
            f"  reference dense mask, s={SEQ_LENGTH}, {how}: {ms32:9.1f} ms, peak +{mib32:6.0f} MiB "
            f"= {ms32 / (1000 * ours_s):,.0f}x the time and {mib32 / ours_mib:,.0f}x the memory of our collate; "
            f"it would add {100 * ms32 / loader_ms[args.workers[0]]:.0f}% to the in-process loader's ms/sample"
        )


if __name__ == "__main__":
    main()
