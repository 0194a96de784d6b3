# coaflow CPU image: the tiny profile, CI and the CPU stages of the Kubeflow pipeline
# (synthesize, gate, register, deploy). Build from the repository root:
#   docker build -f images/cpu.Dockerfile -t ghcr.io/coaflow/coaflow-cpu:0.1.0 .
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the CPU index: the PyPI default is a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip install "/src[train,kfp]"

FROM python:3.11.14-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GX_ANALYTICS_ENABLED=false \
    HF_HOME=/data/coaflow/hf
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 1000 coaflow \
    && mkdir -p /data/coaflow \
    && chown coaflow:coaflow /data/coaflow
USER 1000
WORKDIR /home/coaflow
ENTRYPOINT ["coaflow"]
CMD ["--help"]
