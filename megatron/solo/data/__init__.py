"""Offline preprocessing: raw data → packed, indexed binaries (and the reader the training loader uses).

One module per stage, each importable on its own (worker processes import only the light ones)::

    sources.py        input files → RawRecord (discovery, format detection, decompression, resumable cutting)
    samples.py        RawRecord → Sample (turns of text and image references), one parser per format
    encode.py         Sample → Document (token ids, per-token targets, images encoded once)
    codec.py          the stored image encodings (jpeg, webp, png, webp-lossless, raw)
    packing.py        Documents → Packs of at most seq_length tokens (best-fit over a bounded buffer)
    packed_format.py  the on-disk layout (see its docstring): writer and reader (PackedDataset)
    pipeline.py       the driver: ordered worker pool, checkpoints and --resume, stats, atomic outputs
    workdir.py        the work directory: lock, checkpoints, atomic installation of the outputs
    worker.py         what a worker process runs (parse + encode), kept free of torch
    progress.py       ordered parallel map over worker processes, and the progress line
    describe.py       human-readable view of one pack (tools/inspect_mm_data.py)
    errors.py         SampleError: the named reasons a sample is skipped, and where it came from
"""
