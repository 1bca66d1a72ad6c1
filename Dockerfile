# hkft on an NVIDIA GPU: the official PyTorch CUDA runtime image plus hkft and bitsandbytes.
#   docker build -t hkft .
#   docker run --gpus all --rm -v "$PWD":/work -v hf-cache:/cache hkft train presets/quickstart.yaml
#   docker run --gpus all --rm hkft            # `hkft env`: versions, GPU and bitsandbytes support
# Mount the folder holding your presets and runs at /work, and a volume at /cache (Hugging Face
# models and datasets) so downloads survive the container. Runs in /work are written as uid 1000;
# pass --user "$(id -u):$(id -g)" to write them as yourself.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/hkft
COPY pyproject.toml README.md constraints.txt ./
COPY hkft ./hkft
COPY presets ./presets
# The base image's CUDA build of torch satisfies hkft's `torch>=2.4`, so pip keeps it (constraints.txt
# pins no torch). -c: the versions the test suite ran against, as the README's install has them; without
# it every build resolves the newest releases of transformers, peft... on the day it runs.
RUN python -m pip install --no-cache-dir -c constraints.txt "./[gpu]"

# uid and gid 1000 go to hkft, also where the base already gave them away (Ubuntu's user `ubuntu`).
RUN user="$(awk -F: '$3 == 1000 {print $1}' /etc/passwd)" \
    && if [ -n "$user" ]; then userdel --remove "$user" 2>/dev/null || userdel "$user"; fi \
    && group="$(awk -F: '$3 == 1000 {print $1}' /etc/group)" \
    && if [ -n "$group" ]; then groupdel "$group"; fi \
    && groupadd --gid 1000 hkft \
    && useradd --create-home --uid 1000 --gid 1000 hkft \
    && mkdir -p /cache /work \
    && chown hkft:hkft /cache /work
USER 1000:1000
WORKDIR /work
VOLUME ["/cache"]

ENTRYPOINT ["hkft"]
CMD ["env"]
