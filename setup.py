"""solo-megatron: pre-training SOLO-style encoder-free vision-language models on megatron-core."""

from pathlib import Path

from setuptools import find_namespace_packages, setup

setup(
    name="solo-megatron",
    version="0.1.0",
    description="Pre-train SOLO-style single-transformer vision-language models on megatron-core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # megatron/ is a PEP 420 namespace shared with megatron-core: never add megatron/__init__.py.
    packages=find_namespace_packages(include=["megatron.solo", "megatron.solo.*"]),
    install_requires=[
        "torch>=2.4",  # `pip install torch==2.13.0` first on CPU machines (see README)
        "megatron-core==0.16.1",
        "numpy>=1.24",
        "pillow>=10.3",  # 16-bit grey PNGs open as I;16 from 10.3 on
        "sentencepiece>=0.2",
        "protobuf>=4.21",  # sentencepiece's model proto: reading tokenizers that carry SOLO's pieces
        "tokenizers>=0.21",  # HF tokenizer.json bases (Llama-3-8B's byte-level BPE): megatron/solo/tokenizer_json.py
        "psutil>=5.9",  # dist_checkpointing's writer hangs without it (megatron_core_cpu.md §3)
        "zstandard>=0.22",  # preprocessing reads .zst inputs (SlimPajama ships .jsonl.zst)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "scikit-image>=0.22",  # real sample photos, shipped in the wheel
            "mistral-common>=1.5",  # ships Mistral-7B-v0.1's tokenizer.model (the default tokenizer)
            "transformers>=5.23",  # the HF conversion tests (tests/convert)
            "safetensors>=0.4",
            "matplotlib>=3.7",  # the demo's loss-curve PNG (its CI smoke test)
            "ruff==0.17.6",  # lint + format check in CI; pinned: another release may format differently
        ],
        # examples/solo/demo.sh: the real Mistral tokenizer and the loss-curve plot
        "demo": ["mistral-common>=1.5", "matplotlib>=3.7"],
        # SoloConfig is a transformers-5 dataclass config; 5.23 is the version the HF side is tested with.
        "hf": ["transformers>=5.23", "safetensors>=0.4"],
        # Benchmarks through lmms-eval (tools/evaluate.py, README "Evaluation"). lmms-eval itself is installed
        # apart, `pip install --no-deps lmms-eval==0.7.3` (the pin: megatron/solo/evaluation/__init__.py):
        # its own requirements pull torchvision, whose PyPI wheel is built for the CUDA torch and, beside the
        # CPU torch, breaks `import transformers`; and a wandb, yt-dlp, openai, … that scoring never imports.
        # These are what its evaluator, its task loader and the tasks named in the README import.
        "eval": [
            "transformers>=5.23",
            "safetensors>=0.4",
            "accelerate>=0.29.1",
            "datasets>=2.19",
            "evaluate>=0.4",
            "loguru>=0.7",
            "sacrebleu>=1.5",
            "pytz",
            "tenacity>=8.3",
            "filelock>=3.16,<4",  # lmms-eval 0.7.3's evaluator patches filelock._api, gone in filelock 4
            "pytablewriter>=1",  # the results table lmms-eval prints
            "pyyaml>=6",
            "jinja2>=3",
            "tqdm>=4.60",
        ],
    },
    # lmms-eval finds `--model solo` here (its registry loads this group's manifests).
    entry_points={"lmms_eval.models": ["solo = megatron.solo.evaluation.lmms_plugin:manifests"]},
)
