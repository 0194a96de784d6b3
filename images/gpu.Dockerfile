# coaflow GPU image: sft (DeepSpeed), rl (TRL GRPO with vLLM rollouts) and evaluate on NVIDIA
# GPUs. The CUDA devel base lets DeepSpeed build its fused ops at install time; the driver comes
# from the node (NVIDIA container toolkit). Build from the repository root:
#   docker build -f images/gpu.Dockerfile -t ghcr.io/coaflow/coaflow-gpu:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ghcr.io/astral-sh/uv:0.9.5 AS uv

FROM ${CUDA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
    UV_NO_CACHE=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 TORCH_CUDA_ARCH_LIST="8.0;9.0"
# A standalone CPython 3.11 (no distro python): the same interpreter as CI.
RUN uv python install 3.11.14 && uv venv --python 3.11.14 /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
# vLLM pins its own CUDA torch build; DeepSpeed compiles its ops against it.
RUN uv pip install "/src[train,gpu,kfp]"

FROM ${CUDA_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GX_ANALYTICS_ENABLED=false \
    HF_HOME=/data/coaflow/hf
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# uid 1000 as in the CPU image (Ubuntu's own "ubuntu" user gives way): both write one cache PVC.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 coaflow \
    && mkdir -p /data/coaflow \
    && chown coaflow:coaflow /data/coaflow
USER 1000
WORKDIR /home/coaflow
ENTRYPOINT ["coaflow"]
CMD ["--help"]
