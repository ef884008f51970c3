# syntax=docker/dockerfile:1
# The Ray node image: head and GPU workers, in docker compose, on bare machines and in KubeRay.
#
# rayproject/ray at the Ray version pinned by pyproject.toml, Python 3.11, CUDA 13.0 (torch 2.14
# from PyPI is a CUDA 13.0 build and brings its own CUDA libraries; the host driver must be
# >= 580). For hosts with an older driver, build with CUDA_TAG=cu128 and TORCH_INDEX_URL set to
# the PyTorch index of a CUDA 12.8 build of the same torch version.
#
#   docker build -f deploy/docker/ray.Dockerfile -t cdsp/ray-node:0.1.0-ray2.60.0-py311-cu130 .
#
# The tag carries the package and Ray versions: tests/deploy checks that every image reference
# agrees with the installed Ray, and the api image must be built from the same commit.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG CUDA_TAG=cu130
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}

ARG RAY_VERSION
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://pypi.org/simple

# CUDA numbers GPUs fastest-first by default, nvidia-smi by PCI bus: make them agree, since
# ray-worker-start.sh picks GPUs by their nvidia-smi index.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID

# The heavy layer first, so that a code change does not download torch again. Ray is pinned to
# the base image's version: pip must not move it while resolving our dependencies.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install "ray[default,train,tune]==${RAY_VERSION}"

WORKDIR /home/ray/cdsp
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 cdsp_core ./cdsp_core
COPY --chown=1000:100 workers ./workers
COPY --chown=1000:100 service ./service
COPY --chown=1000:100 configs ./configs
COPY --chown=1000:100 --chmod=755 deploy/docker/ray-worker-start.sh /home/ray/ray-worker-start.sh
RUN pip install "ray[default,train,tune]==${RAY_VERSION}" "torch==${TORCH_VERSION}" . \
 && python -c "import ray, torch, cdsp_core, workers; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# Lock files of ray-worker-start.sh. Created here, owned by the ray user, so that a named volume
# mounted on it starts with that owner (Docker copies the image's folder into a new volume).
RUN mkdir -p /home/ray/gpu-claims
WORKDIR /home/ray
