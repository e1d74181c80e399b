# llmslo images. Default target (`docker build .`): the model server (Ray Serve), the load generator
# (Locust) and the `llmslo` CLI, installed exactly as the README does (pip install -e .).
#
# GPU fallback (compose profile `gpu-hf`): EXTRAS=gpu adds the transformers engine's pinned
# torch/transformers/accelerate (pyproject [gpu]). PyTorch wheels bring their own CUDA runtime and the
# NVIDIA container toolkit mounts the driver, so python:3.11-slim works on a GPU host too.
#
# Target `vllm` (compose profile `gpu`, the production engine): the official vLLM image with llmslo in
# its own virtualenv, so llmslo's pins (Ray, pydantic, numpy) never touch vLLM's; each model replica
# launches the image's `vllm serve` through the upstream engine.
ARG BASE_IMAGE=python:3.11-slim
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0

FROM ${VLLM_IMAGE} AS vllm
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY . /app
RUN python3 -m venv /opt/llmslo && /opt/llmslo/bin/pip install -q -e .
# llmslo from the venv, vllm (and python3) from the image: the venv's bin goes last on PATH
ENV PATH=${PATH}:/opt/llmslo/bin
ENTRYPOINT []
EXPOSE 8000 8080
CMD ["llmslo", "--help"]

FROM ${BASE_IMAGE}
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install -q -e .
RUN if [ -n "$EXTRAS" ]; then pip install -q -e ".[$EXTRAS]"; fi

# serve: OpenAI API 8000, Ray metrics export 8080; Locust: web UI 8089, master 5557
EXPOSE 8000 8080 8089 5557
CMD ["llmslo", "--help"]
