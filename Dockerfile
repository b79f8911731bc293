# GPU image with CUDA torch and transformers preinstalled (the environment of the original guide).
FROM huggingface/transformers-pytorch-gpu

WORKDIR /opt/ftloop
COPY pyproject.toml README.md ./
COPY ftloop ./ftloop
COPY scripts ./scripts
# Keep the image's CUDA build of torch: install ftloop and whatever else it needs around it.
RUN python3 -m pip install --no-cache-dir ".[lora]" && python3 -c "import ftloop.train"

# `docker run --gpus all IMAGE` trains the embedded demo; pass flags to train on your data:
#   docker run --gpus all -v /data:/data IMAGE sh scripts/train_shell.sh --model-name-or-path ... --train-data ...
CMD ["sh", "scripts/train_shell.sh"]
