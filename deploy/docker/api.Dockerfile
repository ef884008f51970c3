# syntax=docker/dockerfile:1
# The control plane image: `cdsp serve` (FastAPI + dispatcher/reconciler).
#
# Based on the CPU flavour of the same rayproject/ray release as the Ray nodes, so the api's Ray
# Jobs client is exactly the cluster's version. The api trains nothing: torch is the CPU build
# (our package depends on it), which keeps CUDA libraries out of this image.
#
#   docker build -f deploy/docker/api.Dockerfile -t cdsp/api:0.1.0-ray2.60.0-py311 .
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu

ARG RAY_VERSION
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install "ray[default,train,tune]==${RAY_VERSION}"

WORKDIR /home/ray/cdsp
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 cdsp_core ./cdsp_core
COPY --chown=1000:100 workers ./workers
COPY --chown=1000:100 service ./service
RUN pip install "ray[default,train,tune]==${RAY_VERSION}" "torch==${TORCH_VERSION}" . \
 && python -c "import ray, service, cdsp_core; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# The embedded defaults (SQLite, local artifacts) land here when CDSP_DATABASE_URL/CDSP_STORAGE
# are unset; with compose and KubeRay both are set and this folder stays empty.
WORKDIR /home/ray/app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=4 \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["cdsp", "serve", "--host", "0.0.0.0", "--port", "8000"]
