# llmslo image: the model server (Ray Serve), the load generator (Locust) and the
# `llmslo` CLI. Installs the package exactly as the README does (pip install -e .).
#
# GPU variant (compose profile `gpu` builds it): EXTRAS=gpu adds the transformers
# engine's pinned torch/transformers/accelerate (pyproject [gpu]). PyTorch wheels
# bring their own CUDA runtime and the NVIDIA container toolkit mounts the driver,
# so python:3.11-slim works on a GPU host too. To start from a CUDA image instead,
# pass a base that has Python 3.11 and pip: --build-arg BASE_IMAGE=... (or
# LLMSLO_BASE_IMAGE in .env).
ARG BASE_IMAGE=python:3.11-slim
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
