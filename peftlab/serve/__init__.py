"""`peftlab serve`: an OpenAI-compatible server for many adapters on one base (engine.py batches across
adapters; app.py is the HTTP API)."""

from __future__ import annotations

from pathlib import Path

from peftlab.errors import PeftlabError


def build_engine(run: str | None = None, model: str | None = None, adapters: dict[str, str] | None = None,
                 device: str = "auto", max_batch_size: int = 16, max_queue: int = 256, max_prompt_tokens: int = 512,
                 max_tokens: int = 256):
    """The engine for a run's adapter on its own base (`run`), or for `model` with `adapters` ({name: path})."""
    from peftlab.eval.runs import load_run
    from peftlab.models import load_model, resolve_task
    from peftlab.serve.engine import Engine, unbatchable
    from peftlab.train.setup import resolve_device

    if run is None and model is None:
        raise PeftlabError("nothing to serve: pass -p RUN_DIR, or --model BASE with --adapter name=PATH")
    if run is not None:
        loaded = load_run(run, model, adapter=Path(run).name or "default")
        base, tokenizer, task, base_name = loaded.model, loaded.tokenizer, loaded.task, loaded.base_name
        labels = list(loaded.config.data.labels or []) if loaded.config else []
    else:
        task = resolve_task(model)
        base, tokenizer = load_model(model, task=task)
        base_name, labels = model, []
    base.to(resolve_device(device))
    engine = Engine(base, tokenizer, task, base_name, max_batch_size, max_queue, max_prompt_tokens, max_tokens,
                    labels)
    for name, path in (adapters or {}).items():
        engine.load(name, path)
    served = list(getattr(base, "peftlab_adapters", {}).values())
    if run is not None and served and not served[0].can_mix():
        engine.close(timeout=0)
        raise PeftlabError(unbatchable(served[0], f"{run}'s"))
    return engine


def serve(run: str | None = None, model: str | None = None, adapters: dict[str, str] | None = None,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, allow_loading: bool = False,
          adapter_root: str | None = None, request_timeout: float = 300, **engine_options) -> None:
    """Serve until SIGTERM or Ctrl-C, which stop taking requests and finish those in flight."""
    import importlib.util

    missing = [p for p in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(p) is None]
    if missing:
        raise PeftlabError(f"peftlab serve needs {', '.join(missing)}: pip install 'peftlab[serve]'")
    import uvicorn

    from peftlab.serve.app import build_app

    engine = build_engine(run, model, adapters, **engine_options)
    app = build_app(engine, api_key, allow_loading, adapter_root, request_timeout)
    print(f"Serving {engine.base_name} with adapters {engine.adapters or 'none'} on http://{host}:{port}/v1",
          flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(request_timeout))
    finally:
        engine.close()
