"""peftlab serve against the same model answering one request at a time (HF generate per request with peft's
model, adapters switched with set_adapter): throughput and latency at several concurrencies, one adapter and
four adapters mixed. flan-t5-small's architecture (random weights), 64-token prompts, 32 new tokens (greedy).

    python bench/serve.py [--requests 32] [--concurrency 1,8,32]

Writes its section of bench/RESULTS.md."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import update_section  # noqa: E402

import peftlab  # noqa: E402

BASE = "random:flan-t5-small"
NEW_TOKENS = 32
PROMPT_TOKENS = 64
ADAPTERS = ["a", "b", "c", "d"]


def prompts(n: int, tokenizer) -> list[str]:
    """n different prompts of PROMPT_TOKENS tokens each (the end-of-sequence token included)."""
    words = "the movie was not good at all but the music and the actors were fine".split()
    texts = []
    for i in range(n):
        ids = tokenizer(" ".join(words[(i + k) % len(words)] for k in range(200)), add_special_tokens=False)
        texts.append(tokenizer.decode(ids["input_ids"][:PROMPT_TOKENS - 1]))
    assert all(len(tokenizer(t)["input_ids"]) == PROMPT_TOKENS for t in texts)
    return texts


def make_adapters(root: Path) -> dict[str, Path]:
    """Four LoRA adapters (r 8, q and v) with random B, so each answers differently."""
    paths = {}
    for i, name in enumerate(ADAPTERS):
        model, _ = peftlab.load_model(BASE)
        torch.manual_seed(i)
        peftlab.apply(model, peftlab.LoraConfig(r=8, alpha=16, targets=["q", "v"]))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.normal_(0, 0.02)
        paths[name] = root / name
        peftlab.save_adapter(model, paths[name])
    return paths


def measure(ask, jobs: list[tuple[str, str]], concurrency: int) -> dict[str, float]:
    latencies, tokens = [], []

    def timed(job):
        start = time.perf_counter()
        tokens.append(ask(*job))
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, jobs))
    wall = time.perf_counter() - start
    latencies.sort()
    return {"req_s": len(jobs) / wall, "tok_s": sum(tokens) / wall, "p50": statistics.median(latencies),
            "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)]}


def serve_asker(paths: dict[str, Path]):
    import httpx
    import uvicorn

    from peftlab.serve import build_engine
    from peftlab.serve.app import build_app

    engine = build_engine(model=BASE, adapters={k: str(v) for k, v in paths.items()}, device="cpu",
                          max_batch_size=32, max_queue=1024, max_tokens=NEW_TOKENS)
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)

    def ask(adapter: str, prompt: str) -> int:
        reply = client.post("/v1/completions", json={"model": adapter, "prompt": prompt, "max_tokens": NEW_TOKENS,
                                                     "temperature": 0})
        return reply.json()["usage"]["completion_tokens"]

    def stop():
        server.should_exit = True
        thread.join()
        engine.close()

    return ask, stop


def peft_asker(paths: dict[str, Path]):
    """HF generate per request on peft's model, one at a time (a lock), adapters switched with set_adapter."""
    from peft import PeftModel

    base, tokenizer = peftlab.load_model(BASE)
    model = PeftModel.from_pretrained(base, str(paths["a"]), adapter_name="a")
    for name in ADAPTERS[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    model.eval()
    lock = threading.Lock()

    def ask(adapter: str, prompt: str) -> int:
        with lock, torch.no_grad():
            model.set_adapter(adapter)
            batch = tokenizer([prompt], return_tensors="pt")
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
            return int((out[0, 1:] != tokenizer.pad_token_id).sum())

    return ask, lambda: None


def targets(rows: list, levels: list[int]) -> str:
    """Issue 36's targets, against this run's figures."""
    if not {1, 8, 32} <= set(levels):
        return "Issue 36's targets need concurrency 1, 8 and 32."
    got = {(name, level): (figures, ratio) for name, level, figures, ratio in rows}
    mixed = got["four adapters mixed", 32][0]["req_s"] / got["one adapter", 32][0]["req_s"]
    p95 = {name: got[name, 8][0]["p95"] / got[name, 1][0]["p95"] for name in ("one adapter", "four adapters mixed")}
    c32 = {name: got[name, 32][1] for name in p95}

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return (f"Against issue 36's targets: at concurrency 32, {c32['one adapter']:.1f}x (one adapter) and "
            f"{c32['four adapters mixed']:.1f}x (mixed) the one-at-a-time throughput (target >= 4x: "
            f"{verdict(min(c32.values()) >= 4)}); four adapters mixed give {mixed:.2f}x the single-adapter throughput "
            f"at concurrency 32 (target >= 0.8x: {verdict(mixed >= 0.8)}); p95 latency at concurrency 8 is "
            f"{p95['one adapter']:.1f}x (one adapter) and {p95['four adapters mixed']:.1f}x (mixed) concurrency 1's "
            f"(target < 3x: {verdict(max(p95.values()) < 3)}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(Path(tmp))
        texts = prompts(args.requests, peftlab.load_model(BASE)[1])
        workloads = {"one adapter": [("a", p) for p in texts],
                     "four adapters mixed": [(ADAPTERS[i % 4], p) for i, p in enumerate(texts)]}
        rows = []
        ask, stop = peft_asker(paths)
        baseline = {name: measure(ask, jobs, 1) for name, jobs in workloads.items()}
        stop()
        ask, stop = serve_asker(paths)
        for name, jobs in workloads.items():
            for level in levels:
                figures = measure(ask, jobs, level)
                rows.append((name, level, figures, figures["req_s"] / baseline[name]["req_s"]))
                print(name, level, {k: round(v, 3) for k, v in figures.items()}, flush=True)
        stop()
    lines = [f"`python bench/serve.py --requests {args.requests} --concurrency {args.concurrency}` "
             f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads): {BASE}, prompts of {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, "
             "greedy. "
             "The baseline is peft's model answering one request at a time (HF generate, set_adapter per request).",
             "", "| workload | concurrency | req/s | tokens/s | p50 s | p95 s | throughput vs one at a time |",
             "|---|---|---|---|---|---|---|"]
    for name, figures in baseline.items():
        lines.append(f"| {name}, peft one at a time | 1 | {figures['req_s']:.2f} | {figures['tok_s']:.1f} | "
                     f"{figures['p50']:.2f} | {figures['p95']:.2f} | 1.00x |")
    for name, level, figures, ratio in rows:
        lines.append(f"| {name}, peftlab serve | {level} | {figures['req_s']:.2f} | {figures['tok_s']:.1f} | "
                     f"{figures['p50']:.2f} | {figures['p95']:.2f} | {ratio:.2f}x |")
    lines += ["", targets(rows, levels)]
    lines += ["", "Batching is per decoding step (docs/serving.md): a request joins the running batch at the next "
              "step. The baseline and the server run in the same Python process, measured one after the other, not "
              "interleaved: a single run is good to about +-10%."]
    update_section("Serving: peftlab serve vs one request at a time", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
