# CPU image of an inference-mesh node. llama-cpp-python is built from source with the
# RPC backend (scripts/setup.sh refuses any build without libggml-rpc).
FROM python:3.11-slim-bookworm
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential cmake git espeak-ng \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/inference-mesh
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY mesh ./mesh
COPY node ./node
COPY api ./api
COPY gallery ./gallery
RUN bash scripts/setup.sh
ENV PATH=/opt/inference-mesh/.venv/bin:$PATH \
    MESH_HOME=/data
VOLUME ["/data"]
EXPOSE 8080 4001
ENTRYPOINT ["mesh"]
CMD ["up", "--host", "0.0.0.0", "--port", "8080", "--p2p-port", "4001"]
