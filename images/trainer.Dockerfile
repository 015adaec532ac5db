# The trainer: CUDA runtime + torch and the training stack (extra `train`, DeepSpeed included).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# g++ and the Python headers: DeepSpeed builds its C++ ops (the CPU Adam of zero3-offload)
# just in time, with ninja from the lock.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    python3-dev g++ git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/lmforge
ENV PATH=/opt/lmforge/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md requirements.lock ./
COPY lmforge lmforge
COPY operator operator
COPY trainer trainer
RUN pip install --no-cache-dir -c requirements.lock ".[train]" && rm -rf /src
USER 1000:1000
ENTRYPOINT ["python", "-m", "lmforge.trainer"]
