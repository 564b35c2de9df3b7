"""tools/inspect_mm_data.py: a pack printed with its documents and vision spans, images written back."""

import sys
from pathlib import Path

import numpy as np
from data_helpers import write_jsonl
from PIL import Image

from megatron.solo import image as im
from megatron.solo.data.describe import describe_pack
from megatron.solo.data.packed_format import PackedDataset

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool():
    sys.path.insert(0, str(TOOLS))
    try:
        import inspect_mm_data
    finally:
        sys.path.pop(0)
    return inspect_mm_data


def test_describe_pack_shows_documents_spans_and_loss(tmp_path, small_photos, run_preprocess, tokenizer):
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": str(small_photos[0])}},
                {"type": "text", "text": "What is shown?"},
            ],
        },
        {"role": "assistant", "content": "A photo."},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [chat, {"role": "assistant", "content": "Plain text only."}])
    prefix, _ = run_preprocess([path], seq_length=512, image_root=str(small_photos[0].parent))
    view = PackedDataset(prefix)[0]
    text = describe_pack(view, tokenizer, index=0, seq_length=512)
    rows, cols = im.grid_size(96, 64)
    assert f"<s>⟦[INST]⟧<image {rows}x{cols}>⟦What is shown? [/INST]⟧A photo.</s>" in text.replace("  ", "")
    assert "<s>Plain text only.</s>" in text
    assert (
        f"pack 0: {len(view.tokens)} tokens (+{512 - len(view.tokens)} padding to 512), 2 documents, 1 images" in text
    )
    loss = len(tokenizer.encode("A photo.")) + 1 + len(tokenizer.encode("Plain text only.")) + 1  # + the EOS
    assert f"{loss} loss tokens" in text


def test_inspect_tool_prints_and_saves_images(tmp_path, small_photos, run_preprocess, capsys):
    path = write_jsonl(
        tmp_path / "caps.jsonl", [{"image": str(p), "caption": f"Photo {i}."} for i, p in enumerate(small_photos[:3])]
    )
    prefix, _ = run_preprocess([path], seq_length=512, image_root=str(small_photos[0].parent))
    tool = load_tool()
    assert tool.main([prefix, "--index", "-1", "--save-images", str(tmp_path / "imgs")]) == 0
    out = capsys.readouterr().out
    assert f"{prefix}: 1 packs" in out and "Photo 2.</s>" in out
    saved = sorted((tmp_path / "imgs").glob("*.png"))
    assert [p.name for p in saved] == [f"pack0_image_{k}.png" for k in range(3)]
    for photo, png in zip(small_photos, saved):  # png storage: the resized image exactly
        np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(im.load_and_resize(photo)[0]))
    assert tool.main([prefix, "--index", "5"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "nothing")]) == 1
