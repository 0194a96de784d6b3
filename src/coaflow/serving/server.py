"""``coaflow serve MODEL``: resolve the model, pick the engine, listen.

    coaflow serve models:/coaflow-agent@champion --port 8000     # a registry alias or version
    coaflow serve work/runs/RUN/sft/model                         # a local HF folder
    coaflow serve Qwen/Qwen3-0.6B --engine vllm                   # a hub id, on a GPU

Engines: ``vllm`` runs vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``,
hermes tool-call parser: the ``<tool_call>`` JSON layout of Qwen and coaflow's students) with a
chat template that adds the model's training system prompt when a client sends none; it is the
GPU image's engine and cannot run on these CPU machines. ``transformers`` is coaflow's server
(FastAPI + uvicorn + the batching engine). ``auto`` takes vLLM when it imports and a GPU is
there, else transformers.

The model is loaded *before* the port is bound, so a client never waits on a half-started server;
with ``reuse_port`` a replacement binds the same port while the old server still answers (the
deploy stage swaps servers this way, then stops the old one). SIGTERM stops it promptly: the
engine ends every generation within a step (their clients get an error, 503 or a stream's error
event), uvicorn closes the connections, and the process exits 0.

A server that ``deploy`` manages watches a pipe from it (its read end's number in
``COAFLOW_PARENT_FD``): it binds its port only once deploy has recorded it (``R``), serves on
its own once handed over (``H``), and stops when the pipe closes before that (deploy was killed):
no server runs that ``coaflow undeploy`` cannot find.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import sys
import threading
from pathlib import Path

from coaflow.errors import UserError
from coaflow.registry import MODEL_INFO

SYSTEM_PRELUDE = ("{%- if messages[0]['role'] != 'system' %}{%- set messages = "
                  "[{'role': 'system', 'content': %s}] + messages %}{%- endif %}\n")


def resolve(spec: str, registry_uri: str, cache_dir: str | Path) -> tuple[str, str]:
    """``(model path or hub id, served name)`` for a registry URI, a folder or a hub id."""
    from coaflow.registry import Registry, parse_model_uri

    if spec.startswith("models:/"):
        name = parse_model_uri(spec)[0]
        folder, _ = Registry(registry_uri).fetch(spec, cache_dir)
        return str(folder), name
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(f"{spec}: not a Hugging Face model folder (no config.json)")
        return str(path), path.resolve().name
    return spec, spec  # a hub id: transformers or vLLM fetch it


def trained_system_prompt(model: str) -> str | None:
    """The system prompt recorded with the model at registration, if any."""
    info = Path(model) / MODEL_INFO
    if info.is_file():
        return json.loads(info.read_text()).get("system_prompt") or None
    return None


def pick_engine(engine: str) -> str:
    if engine != "auto":
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise UserError("--engine vllm: vllm is not installed (pip install 'coaflow[gpu]', "
                            "GPU image); --engine transformers serves on a CPU")
        return engine
    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket, or one clear error when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use by another process; pick another "
                            "with --port (or deploy.port)") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def chat_template_with_system(template: str, system_prompt: str) -> str:
    """``template`` that puts ``system_prompt`` first when the messages have no system turn (for
    vLLM, which has no such option)."""
    return SYSTEM_PRELUDE.replace("%s", json.dumps(system_prompt)) + template


def vllm_argv(model: str, name: str, host: str, port: int, template: str | None,
              extra: list[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", name, "--host", host, "--port", str(port),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--generation-config", "auto"]
    if template:
        argv += ["--chat-template", template]
    return argv + list(extra)


PARENT_FD = "COAFLOW_PARENT_FD"  # the pipe of the deploy that manages this server


def wait_recorded(fd: int) -> None:
    """Block until the managing deploy has recorded this server (``R`` on the pipe)."""
    if os.read(fd, 1) != b"R":  # end of file: deploy is gone before it recorded us
        raise UserError("the deploy that started this server ended before recording it; "
                        "not serving")


def watch_parent(fd: int, stop) -> threading.Thread:
    """Call ``stop`` when the pipe closes before the handover byte ``H`` comes."""
    def run():
        while (b := os.read(fd, 1)) not in (b"H", b""):
            pass
        os.close(fd)
        if not b:
            stop()

    thread = threading.Thread(target=run, name="coaflow-parent-watch", daemon=True)
    thread.start()
    return thread


def serve(spec: str, *, host: str = "127.0.0.1", port: int = 8000, engine: str = "auto",
          name: str | None = None, registry_uri: str, cache_dir: str | Path,
          system_prompt: str | None = None, max_batch: int = 16, batch_wait_ms: float = 10.0,
          max_tokens: int = 512, reuse_port: bool = False, vllm_args: list[str] = (),
          threads: int = 0, max_n: int = 16, prefill_chunk: int = 256,
          prefix_cache_mb: int = 1024, log=print) -> None:
    model, served = resolve(spec, registry_uri, cache_dir)
    served = name or served
    prompt = system_prompt if system_prompt is not None else trained_system_prompt(model)
    kind = pick_engine(engine)
    if kind == "vllm":
        template = None
        if prompt:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model)
            template = str(Path(cache_dir) / f"{served}-chat_template.jinja")
            Path(template).parent.mkdir(parents=True, exist_ok=True)
            Path(template).write_text(chat_template_with_system(tok.chat_template, prompt))
        argv = vllm_argv(model, served, host, port, template, list(vllm_args))
        log("exec " + " ".join(argv))
        os.execv(argv[0], argv)

    import uvicorn

    from coaflow.serving.app import create_app
    from coaflow.serving.engine import TransformersEngine

    parent = os.environ.pop(PARENT_FD, None)  # not handed down to anything this starts
    try:
        eng = TransformersEngine(model, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                 threads=threads, prefill_chunk=prefill_chunk,
                                 prefix_cache_mb=prefix_cache_mb)
    except Exception as e:  # a missing or corrupt checkpoint: one line, not a traceback
        raise UserError(f"{spec}: cannot load the model from {model}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    app = create_app(eng, served, prompt, max_tokens_default=max_tokens, max_n=max_n)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: end the generations first
            eng.shutdown()
            super().handle_exit(sig, frame)

    # a stream still open after the engine stopped is closed after this many seconds
    server = Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=5))
    if parent:
        wait_recorded(int(parent))
        watch_parent(int(parent), lambda: server.handle_exit(15, None))
    sock = bind(host, port, reuse_port)
    log(f"serving {served} ({model}) with transformers on http://{host}:{port}/v1")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down
        pass
    finally:
        eng.shutdown(wait_s=30)
    log(f"stopped serving {served}")
