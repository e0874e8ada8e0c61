# kdpipe image. See docs/docker.md.
#
# Everything Python is installed from a lock file in locks/ with `pip install --require-hashes`:
# exact versions, every file checked against its sha256, torch included. The base image brings
# only Python 3.11 (the locks are for CPython 3.11 on Linux x86_64).
#
# Default: the CUDA image for the GPU box that runs `kdpipe cache-teacher`, torch 2.13.0 and its
# nvidia-* wheels from PyPI (locks/image-cuda.txt). The CPU image:
#   docker build --build-arg LOCK=locks/image-cpu.txt \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t kdpipe:cpu .
# Pin the base by digest for a rebuild that starts from the same bytes:
#   --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest your registry shows>
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Which lock to install (a path in the build context), and an extra index for the packages it
# pins that PyPI does not serve (PyTorch's CPU index for torch==2.13.0+cpu).
ARG LOCK=locks/image-cuda.txt
ARG TORCH_INDEX_URL=

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Dependencies first, from the lock alone: this layer is rebuilt only when the lock (or the base,
# or LOCK / TORCH_INDEX_URL) changes, not on every source edit.
COPY ${LOCK} /opt/kdpipe/requirements.lock
RUN python -m pip install --no-cache-dir --require-hashes \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /opt/kdpipe/requirements.lock

# The project itself (see .dockerignore for what is left out of the context), without its
# dependencies (all in the lock) and without a build environment (setuptools is in the lock),
# so that nothing unhashed gets in. `pip check` fails the build if the lock misses a dependency.
# COPY keeps src/kdpipe/pipeline and src/kdpipe/stages as the relative symlinks they are (to
# /src/pipeline and /src/stages); the wheel pip builds holds the files they point to.
COPY . /src
WORKDIR /workspace
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation /src \
 && rm -rf /src \
 && python -m pip check \
 && kdpipe --help > /dev/null

# Image identity, kept last so that changing the tag does not invalidate the layers above.
# /opt/kdpipe/image.json records what the image was built from; the running code finds it
# through $KDPIPE_IMAGE_INFO (and the tag alone through $KDPIPE_IMAGE).
ARG BASE_IMAGE
ARG LOCK
ARG KDPIPE_IMAGE_TAG=kdpipe:dev
RUN KDPIPE_IMAGE_TAG="$KDPIPE_IMAGE_TAG" BASE_IMAGE="$BASE_IMAGE" LOCK="$LOCK" python -c '\
import hashlib, importlib.metadata as m, json, os; \
info = {"image_tag": os.environ["KDPIPE_IMAGE_TAG"], "base_image": os.environ["BASE_IMAGE"], \
        "lock_file": os.environ["LOCK"], \
        "lock_sha256": hashlib.sha256(open("/opt/kdpipe/requirements.lock", "rb").read()).hexdigest(), \
        "kdpipe_version": m.version("kdpipe"), "torch": m.version("torch")}; \
json.dump(info, open("/opt/kdpipe/image.json", "w"), indent=2); print(json.dumps(info))'
ENV KDPIPE_IMAGE=${KDPIPE_IMAGE_TAG} \
    KDPIPE_IMAGE_INFO=/opt/kdpipe/image.json
LABEL org.opencontainers.image.title="kdpipe" \
      org.opencontainers.image.description="Offline knowledge distillation: cache a teacher's sparse outputs once, train students from the cache." \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.kdpipe.image="${KDPIPE_IMAGE_TAG}" \
      io.kdpipe.lock="${LOCK}"

ENTRYPOINT ["kdpipe"]
CMD ["--help"]
