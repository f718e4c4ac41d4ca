# loraserve on one NVIDIA GPU, or on several of one machine with --tensor-parallel-size (NCCL,
# from torch's wheel; give the container a larger /dev/shm, e.g. --shm-size=4g). Build from the
# repository root, then mount the model and the adapters read-only (they are never baked in);
# deploy/README.md has the details:
#   docker build -t loraserve:0.1.0 .
#   docker run --gpus all -p 8000:8000 --user "$(id -u):$(id -g)" \
#     -v "$PWD/model:/model:ro" -v "$PWD/adapters:/adapters:ro" loraserve:0.1.0

# torch==2.13.0's Linux wheel brings its own CUDA 13.0 libraries (pip's cuda-toolkit, cuDNN,
# NCCL), so the image needs from NVIDIA only the CUDA base layer the container toolkit
# expects; the -runtime flavour would carry a second copy of cuBLAS and friends.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
# Ubuntu point versions leave the archive when superseded, so pinning them would break the
# build; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# .dockerignore lets in only what the install reads: pyproject.toml, README.md, the packages
# and deploy/install.sh.
COPY . .
# Every package at the version requirements/cuda.txt names (`make lock` writes it for this
# image's Python, 3.12): torch==2.13.0 from PyPI, the Linux build that brings CUDA 13.0, with
# its nvidia-* libraries and the triton it was built with pinned there too.
ENV PIP_NO_CACHE_DIR=1 \
    LORASERVE_LOCK=requirements/cuda.txt
# EXTRAS="[demo]" adds what `loraserve demo` needs (deploy/compose.yaml builds it so).
ARG EXTRAS=""
RUN sh deploy/install.sh /opt/venv ".${EXTRAS}"

FROM ${CUDA_IMAGE}
# One writable folder, /cache (HOME, the demo's converted model, Triton's kernel cache), open to every user
# like /tmp: the server runs as any UID you give it, so that it can read model and adapter
# files that safetensors wrote with mode 0600 (docker run --user "$(id -u):$(id -g)").
# gcc, libc6-dev and python3-dev stay in this stage on purpose: Triton compiles a small C
# launcher (its driver's cuda_utils.c, then one per kernel signature) the first time a process
# uses it, with gcc (or $CC) against the headers of the Python that runs it (sysconfig's
# include folder: python3-dev is those of this python3, 3.12 on Ubuntu 24.04). Without them
# every Triton kernel fails at its first launch. The CPU kernels (--device cpu) use gcc too.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --no-log-init --system --uid 10001 --gid 0 --home-dir /cache --no-create-home loraserve \
    && mkdir -m 1777 /cache
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/cache \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    PYTHONUNBUFFERED=1
USER 10001:0
EXPOSE 8000
# Loading a large model takes minutes; /health answers once the engine is up (port 8000 here).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["loraserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--model", "/model", "--adapter-dir", "/adapters"]
