# dehbws with its pinned dependencies, a CUDA build of torch, and Fashion-MNIST inside the image,
# so compute nodes without internet can run it.
#
# Build (from the repository root):   docker build -t dehbws .
#   (podman build works the same way.)
# Run on a GPU host:                  docker run --gpus all dehbws submit --help
# Turn into an Apptainer image:       see apptainer.def, or convert a saved archive:
#   docker save dehbws -o dehbws.tar && apptainer build dehbws.sif docker-archive:dehbws.tar
#
# The dependency versions come from pyproject.toml only: this file names none.
FROM python:3.11-slim-bookworm

# HDF5's file locks fail on NFS and Lustre ("unable to lock file, errno 37"); the supernet
# shards are written once and never modified, so locking is not needed.
ENV HDF5_USE_FILE_LOCKING=FALSE \
    DEHBWS_DATA_DIR=/usr/share/datasets/fashion-mnist \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Fashion-MNIST from Debian (the four original IDX files, 31 MB): compute nodes have no internet.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

# Optional: a folder of wheels to install from (for example a CI cache holding the multi-GB
# CUDA torch wheel); pass --build-arg PIP_FIND_LINKS=/wheels and mount the folder there.
ARG PIP_FIND_LINKS=""

# Only what the build needs, so that edits to tests or scripts do not invalidate this layer.
WORKDIR /opt/dehbws-src
COPY pyproject.toml README.md ./
COPY dehbws ./dehbws
RUN pip install . \
    && rm -rf /opt/dehbws-src

WORKDIR /work
ENTRYPOINT ["dehbws"]
CMD ["--help"]
