# kdpipe image. See docs/docker.md.
#
# Default base: the official PyTorch CUDA runtime image (torch is already in it), for the
# GPU box that runs `kdpipe cache-teacher`. For a CPU-only image, for example:
#   docker build --build-arg BASE_IMAGE=python:3.11-slim \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t kdpipe:cpu .
#
# The torch that is in the image after the first RUN step is pinned with a pip constraint
# for every later install, so installing kdpipe (which asks only for torch>=2.2) never
# re-resolves or downloads torch.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

# Optional: install torch from this index first (for a base image without torch).
ARG TORCH_INDEX_URL=
ARG TORCH_VERSION=

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN set -e; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        python -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
            "torch${TORCH_VERSION:+==$TORCH_VERSION}"; \
    fi; \
    mkdir -p /opt/kdpipe; \
    python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /opt/kdpipe/torch-constraint.txt \
    || { echo "kdpipe image: no torch in BASE_IMAGE; use a PyTorch image or pass" \
              "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2; exit 1; }; \
    echo "pinned $(cat /opt/kdpipe/torch-constraint.txt)"

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when
# pyproject.toml (or the base) changes, not on every source edit.
WORKDIR /src
COPY pyproject.toml /src/pyproject.toml
RUN python -c 'import importlib, sys; \
toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "pip._vendor.tomli"); \
print(*toml.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /opt/kdpipe/requirements.txt \
 && python -m pip install --no-cache-dir -c /opt/kdpipe/torch-constraint.txt \
        -r /opt/kdpipe/requirements.txt

# The project itself (see .dockerignore for what is left out of the context).
COPY . /src
WORKDIR /workspace
RUN python -m pip install --no-cache-dir -c /opt/kdpipe/torch-constraint.txt /src \
 && rm -rf /src \
 && kdpipe --help > /dev/null

# Image identity: the running code records $KDPIPE_IMAGE (e.g. in the cache manifest).
# Kept last so that changing the tag does not invalidate the layers above.
ARG BASE_IMAGE
ARG KDPIPE_IMAGE_TAG=kdpipe:dev
ENV KDPIPE_IMAGE=${KDPIPE_IMAGE_TAG}
LABEL org.opencontainers.image.title="kdpipe" \
      org.opencontainers.image.description="Offline knowledge distillation: cache a teacher's sparse outputs once, train students from the cache." \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.kdpipe.image="${KDPIPE_IMAGE_TAG}"

ENTRYPOINT ["kdpipe"]
CMD ["--help"]
