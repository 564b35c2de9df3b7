# Training image for solo-megatron: NGC PyTorch + megatron-core 0.16.1 + this package.
#
#   docker build -t solo-megatron .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data solo-megatron \
#       examples/solo/pretrain_stage1_imagenet21k.sh --dry-run
# See docs/docker.md.
#
# Base: NGC PyTorch 25.12 ships PyTorch 2.10.0a0 (megatron-core 0.16.1 needs >= 2.6) on CUDA 13.1 and Python
# 3.12, with Transformer Engine and Apex built against that torch; CUDA 13 needs an R580+ driver. It is the
# CUDA 13 generation megatron-core 0.16.1 was made for: its `dev` extra pins Transformer Engine 2.9-2.11 for
# CUDA 13. The build prints the versions it got. Another tag works the same way:
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3 -t solo-megatron .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Never let pip replace NGC's torch (a PyPI wheel would drop its CUDA/TE/Apex build): megatron-core and this
# package go in with --no-deps, every other requirement under NGC's own pins (PIP_CONSTRAINT, set by the
# image; keep it), and the build fails if the torch version changed anyway.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/solo-megatron

# Requirements first, from setup.py (its install_requires plus the hf extra for checkpoint conversion), so
# that editing the code does not re-run this layer.
COPY setup.py README.md ./
# hadolint ignore=DL3013
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-version \
 && python setup.py -q egg_info --egg-base /tmp \
 && awk '/^\[/ { section = $0; next } section == "" || section == "[hf]"' \
        /tmp/solo_megatron.egg-info/requires.txt | grep -Ev '^(torch|megatron-core)([<>=!~; ]|$)' > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install --no-deps megatron-core==0.16.1 \
 && pip install -r /tmp/requirements.txt wandb \
 && test "$(python -c 'import torch; print(torch.__version__)')" = "$(cat /tmp/torch-version)"

COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
 && test "$(python -c 'import torch; print(torch.__version__)')" = "$(cat /tmp/torch-version)" \
 && python -c "import importlib.metadata as m; \
print(*(f'{p} {m.version(p)}' for p in ('torch', 'megatron-core', 'transformer-engine', 'solo-megatron')))"

# Any user (docker run --user, pyxis, apptainer) gets a writable HOME for the caches of Triton, W&B, HF.
RUN mkdir -p /home/solo && chmod 1777 /home/solo
ENV HOME=/home/solo
