# The operator: no torch, no CUDA — the base install of the lmforge distribution.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY lmforge lmforge
COPY operator operator
COPY trainer trainer
RUN pip install --no-cache-dir . && rm -rf /src
USER 65532:65532
ENTRYPOINT ["lmforge", "operator"]
