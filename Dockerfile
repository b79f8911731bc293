# GPU image: the base's CUDA torch, with ftloop and the versions it was tested with (constraints.txt) around it.
# Not huggingface/transformers-pytorch-gpu (its base before): it is published untagged only, on Ubuntu 22.04's Python
# 3.10 (transformers 5.24 needs >= 3.11, so pip resolved another transformers) with torch 2.6, whose torchrun has no
# shutdown grace setting (TORCH_ELASTIC_SHUTDOWN_TIMEOUT is read from torch 2.12 on). pytorch/pytorch has pinned
# tags: torch 2.13.0, the version the tests run, on Ubuntu 24.04's Python 3.12; devel, for the nvcc flash-attn needs.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-devel

# What the base ships, checked below so that another base fails the build here; tests/test_launch_scripts.py checks
# that pyproject and constraints.txt admit this Python and that this torch reads the shutdown grace.
ARG BASE_PYTHON=3.12
ARG BASE_TORCH=2.13.0
# FLASH_ATTN=0 leaves flash-attn out. No prebuilt flash-attn wheel matches torch 2.13, so it compiles here: a long
# build; MAX_JOBS bounds its parallel compiler jobs (each takes several GB of memory), FLASH_ATTN_CUDA_ARCHS the GPUs
# it compiles for (80: A100, 90: H100).
ARG FLASH_ATTN=1
ARG FLASH_ATTN_CUDA_ARCHS="80;90"
ARG MAX_JOBS=4
# Ubuntu 24.04 marks its Python as externally managed (PEP 668); this image is the environment.
ENV PIP_BREAK_SYSTEM_PACKAGES=1

RUN python3 -c "import sys, torch; v = '%d.%d' % sys.version_info[:2]; \
assert v == '${BASE_PYTHON}', f'Python {v}, not ${BASE_PYTHON}'; \
assert torch.__version__.split('+')[0] == '${BASE_TORCH}', f'torch {torch.__version__}, not ${BASE_TORCH}'; \
assert torch.version.cuda, 'a CPU build of torch'"

WORKDIR /opt/ftloop
# Every install is held to constraints.txt and to the torch the image has (its exact build, +cu126 included), so pip
# fails rather than replace the CUDA torch. --no-build-isolation: flash-attn's build imports that torch (an isolated
# build would fetch another), hence the build tools first. flash-attn (the requirement of pyproject's flash extra)
# comes before the sources, so that editing them does not compile it again.
COPY pyproject.toml constraints.txt ./
RUN python3 -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/torch.txt \
 && python3 -m pip install --no-cache-dir -c constraints.txt -c /tmp/torch.txt \
        "setuptools>=68" wheel packaging ninja psutil \
 && if [ "$FLASH_ATTN" = 1 ]; then \
        flash=$(python3 -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
                            print(*project['optional-dependencies']['flash'])") \
        && MAX_JOBS=$MAX_JOBS FLASH_ATTN_CUDA_ARCHS=$FLASH_ATTN_CUDA_ARCHS python3 -m pip install --no-cache-dir \
            --no-build-isolation -c constraints.txt -c /tmp/torch.txt $flash \
        && python3 -c "import flash_attn"; \
    fi
COPY README.md ./
COPY ftloop ./ftloop
COPY scripts ./scripts
RUN if [ "$FLASH_ATTN" = 1 ]; then extras=lora,flash; else extras=lora; fi \
 && python3 -m pip install --no-cache-dir --no-build-isolation -c constraints.txt -c /tmp/torch.txt ".[$extras]" \
 && python3 -c "import ftloop.train"

# `docker run --gpus all --ipc=host IMAGE` trains the embedded demo; pass flags to train on your data. --ipc=host
# (or --shm-size=16g): NCCL and the DataLoader workers pass tensors through /dev/shm, whose Docker default is 64 MB.
# NCCL traces go to /opt/ftloop/nccl_traces (README: NCCL timeouts), hence the second volume:
#   docker run --gpus all --ipc=host -v /data:/data -v "$PWD/nccl_traces:/opt/ftloop/nccl_traces" IMAGE \
#       sh scripts/train_shell.sh --model-name-or-path ... --train-data /data/train.json --output-dir /data/runs/run1
CMD ["sh", "scripts/train_shell.sh"]
