# fluxserve images, one file for every flavour (BuildKit: DOCKER_BUILDKIT=1 docker build ...).
#
#   api   (--target api)  FastAPI nodes and upstream-only workers: no torch, no engine extra.
#   cpu   (default)       the engine on CPU: the demo worker, laptops, CI.
#   cuda                  BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 and the CUDA torch index:
#     docker build --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                  --build-arg TORCH="torch --index-url https://download.pytorch.org/whl/cu124" -t fluxserve:cuda .
#
# TORCH is pip's arguments for the torch wheel; a folder of wheels in the build context (wheels/, empty by
# default) is mounted for that one step, so `--no-index --find-links /wheels torch==2.13.0` installs one
# from disk (what CI does: no registry but PyPI is reachable there).
ARG BASE=python:3.11-slim

FROM ${BASE} AS base
# CUDA runtime bases carry no Python: take the distribution's (3.10+ on Ubuntu 22.04, 3.11 on Debian 12).
RUN if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && (command -v curl >/dev/null || (apt-get update && apt-get install -y --no-install-recommends curl \
      && rm -rf /var/lib/apt/lists/*)) \
 && groupadd --system --gid 10001 fluxserve \
 && useradd --system --uid 10001 --gid fluxserve --home-dir /data --shell /usr/sbin/nologin fluxserve \
 && mkdir -p /data && chown fluxserve:fluxserve /data
ENV PATH=/opt/fluxserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLUXSERVE_DATA_DIR=/data \
    FLUXSERVE_HOST=0.0.0.0 \
    FLUXSERVE_PORT=8000 \
    HF_HOME=/data/hf

FROM base AS venv
RUN python3 -m venv /opt/fluxserve && /opt/fluxserve/bin/pip install --no-cache-dir --upgrade pip

FROM venv AS build-api
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN /opt/fluxserve/bin/pip install --no-cache-dir /src

# torch first, in a layer of its own: a change to fluxserve's code does not reinstall it.
FROM venv AS build-engine
ARG TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
RUN --mount=type=bind,source=wheels,target=/wheels /opt/fluxserve/bin/pip install --no-cache-dir ${TORCH}
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN /opt/fluxserve/bin/pip install --no-cache-dir "/src[engine]"

FROM base AS runtime
USER fluxserve
WORKDIR /data
VOLUME /data
EXPOSE 8000
# /health answers 200 when ready and 503 while loading or degraded: only "not answering" is unhealthy here,
# readiness (load balancers, Kubernetes) reads the status code itself.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -sS -o /dev/null --max-time 4 "http://127.0.0.1:${FLUXSERVE_PORT}/health" || exit 1
ENTRYPOINT ["fluxserve"]

FROM runtime AS api
COPY --from=build-api /opt/fluxserve /opt/fluxserve
CMD ["serve", "--api-only"]

FROM runtime AS engine
COPY --from=build-engine /opt/fluxserve /opt/fluxserve
CMD ["serve"]
