"""Plain helpers of the loader tests (fixtures live in conftest.py)."""

import io
import json
from pathlib import Path

SEQ_LENGTH = 128


def preprocess_to(prefix: Path, records: list[dict]) -> str:
    """Records as JSONL next to ``prefix``, preprocessed in this process into packs of SEQ_LENGTH tokens."""
    from megatron.solo.data.encode import EncodeConfig
    from megatron.solo.data.packing import PackConfig
    from megatron.solo.data.pipeline import PreprocessConfig, preprocess

    source = prefix.with_suffix(".jsonl")
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = PreprocessConfig(
        inputs=(str(source),),
        output_prefix=str(prefix),
        encode=EncodeConfig(image_format="jpeg"),
        pack=PackConfig(seq_length=SEQ_LENGTH),
        workers=0,
        progress=False,
    )
    preprocess(config, stream=io.StringIO())
    return str(prefix)
