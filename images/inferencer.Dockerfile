# The serving runtime: vLLM's CUDA image (engine, torch, CUDA) plus lmforge, whose
# `lmforge serve` supervises the engine, keeps adapters loaded and answers /ready.
# lmforge is installed with its base dependencies only (no training stack); its vLLM
# plugin registers through the `vllm.general_plugins` entry point.
FROM vllm/vllm-openai:v0.33.0
WORKDIR /src
COPY pyproject.toml setup.py README.md requirements.lock ./
COPY lmforge lmforge
COPY operator operator
COPY trainer trainer
RUN python3 -m pip install --no-cache-dir -c requirements.lock . && rm -rf /src
WORKDIR /
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["lmforge", "serve"]
CMD ["--config", "/etc/lmforge/serving.json"]
