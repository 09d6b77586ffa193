"""peftlab serve: a real uvicorn server on a free port, queried with the official `openai` client and httpx."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import peftlab
from peftlab.cli import main
from peftlab.methods import LNTuningConfig, PromptTuningConfig

KEY = "test-key"
ROWS = [{"dialogue": f"w{i % 6} a{i % 4} b", "summary": f"w{i % 6} a{i % 4}"} for i in range(32)]
PROMPTS = ["w1 a2 b", "w3 a0 b", "w5 a1 b c d", "w0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name, method, lr, extra in (("a", "lora", "0.05", []), ("b", "lora", "0.02", []),
                                    ("c", "lora", "0.05", ["--targets", "q,k,o"]), ("p", "prompt_tuning", "0.05", []),
                                    ("h", "houlsby", "0.05", [])):
        assert main(["train", "--model", "random:t5-tiny", "--data", str(data), "--input-column", "dialogue",
                     "--target-column", "summary", "--method", method, "--lr", lr, "--max-steps", "6", *extra,
                     "--batch-size", "8", "--seed", str(ord(name)), "--output", str(root / "adapters" / name),
                     "run.eval_before=false", "run.eval_metrics=false"]) == 0
    assert main(["train", "--model", "random:bart-tiny", "--data", str(data), "--input-column", "dialogue",
                 "--target-column", "summary", "--max-steps", "1", "--output", str(root / "adapters" / "bart"),
                 "run.eval_before=false", "run.eval_metrics=false"]) == 0  # an adapter of another base
    return root


@contextlib.contextmanager
def running(engine, **options):
    """A real uvicorn server for `engine` in a thread, on a free port; yields its address."""
    import uvicorn

    from peftlab.serve.app import build_app

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_app(engine, **options), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.close()


@pytest.fixture(scope="module")
def server(runs):
    from peftlab.serve import build_engine

    engine = build_engine(model="random:t5-tiny", adapters={n: str(runs / "adapters" / n) for n in "abc"},
                          device="cpu", max_batch_size=8, max_queue=64, max_prompt_tokens=64, max_tokens=32)
    with running(engine, api_key=KEY, allow_loading=True, adapter_root=str(runs / "adapters")) as address:
        yield address


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def alone(runs: Path, adapter: str, prompt: str, tokens: int = 8) -> str:
    """What `peftlab generate` answers for one adapter and one prompt (the base: no adapter)."""
    if adapter == "random:t5-tiny":
        model, tokenizer = peftlab.load_model("random:t5-tiny")
        from peftlab.eval.generation import generate

        return generate(model, tokenizer, [prompt], "seq2seq", max_new_tokens=tokens)[0]
    return peftlab.generate(runs / "adapters" / adapter, [prompt], max_new_tokens=tokens)[0]


def test_models_lists_the_base_and_every_adapter(client):
    assert [m.id for m in client.models.list().data] == ["random:t5-tiny", "a", "b", "c"]


def test_greedy_completions_equal_peftlab_generate(client, runs):
    for adapter in ("a", "c", "random:t5-tiny"):
        reply = client.completions.create(model=adapter, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert reply.choices[0].text.strip() == alone(runs, adapter, PROMPTS[0])


def test_sixteen_concurrent_requests_over_four_models_each_equal_their_answer_alone(client, runs):
    models = ["random:t5-tiny", "a", "b", "c"]
    jobs = [(models[i % 4], PROMPTS[i // 4]) for i in range(16)]

    def ask(job):
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    expected = [alone(runs, m, p) for m, p in jobs]
    assert [a.strip() for a in answers] == expected
    assert len(set(expected)) > 1  # the adapters answer differently: the test can tell them apart


def test_a_streamed_completion_joins_to_the_plain_one_and_usage_counts_tokens(client, server):
    plain = client.completions.create(model="a", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="a", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == plain.choices[0].text and len([p for p in pieces if p]) > 2
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage == plain.usage and not chunks[-1].choices
    tokenizer = peftlab.load_model("random:t5-tiny")[1]
    assert plain.usage.prompt_tokens == len(tokenizer(PROMPTS[1])["input_ids"])
    assert plain.usage.completion_tokens == len(tokenizer(plain.choices[0].text, add_special_tokens=False)
                                                ["input_ids"])
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens


def test_a_stream_sends_each_word_as_it_is_decoded(runs):
    """Pieces leave while the answer is still being decoded (the decoding step count grows between them), and
    join to the answer."""
    from peftlab.serve import build_engine
    from peftlab.serve.engine import Request

    engine = build_engine(model="random:t5-tiny", adapters={"a": str(runs / "adapters" / "a")}, device="cpu",
                          max_tokens=32)
    pieces: list[tuple[str, int]] = []
    try:
        request = Request(PROMPTS[0], "a", 24, on_text=lambda piece: pieces.append((piece, len(engine.batch_sizes))))
        completion = engine.submit(request).result(timeout=60)
    finally:
        engine.close()
    assert "".join(piece for piece, _ in pieces) == completion.text
    assert len(pieces) > 2 and pieces[0][1] < pieces[-2][1] < pieces[-1][1], pieces


@pytest.mark.parametrize("text,stops,expected", [
    ("w 1 1", [], "w 1 "), ("w 1 1 ", [], "w 1 1 "), ("word", [], ""), ("a b\nc", [], "a b\n"),
    ("w 1 ", [" 2"], "w 1"), ("w 1 ", ["1 2"], "w "), ("a b ", ["zz"], "a b "),
])
def test_a_partial_answer_streams_only_what_more_tokens_cannot_change(text, stops, expected):
    from peftlab.serve.engine import settled

    assert settled(text, stops) == expected


def test_list_prompts_n_and_stop(client):
    reply = client.completions.create(model="b", prompt=PROMPTS[:2], max_tokens=8, temperature=0, n=2)
    assert len(reply.choices) == 4 and reply.choices[0].text == reply.choices[1].text  # greedy: n equal answers
    full = reply.choices[0].text
    if len(full.split()) > 1:
        cut = client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                        stop=[full.split()[1]])
        assert cut.choices[0].text == full[:full.index(full.split()[1])] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


BAD = [  # (method, path, body or raw text, headers, status, what the message says)
    ("post", "/v1/completions", "{not json", None, 400, ""),
    ("post", "/v1/completions", {"model": "nope", "prompt": "x"}, None, 404, "'random:t5-tiny', 'a', 'b', 'c'"),
    ("post", "/v1/completions", {"model": "a", "prompt": "w " * 200}, None, 400, "--max-prompt-tokens 64"),
    ("post", "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 0}, None, 400, "max_tokens must be"),
    ("post", "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 999}, None, 400, "from 1 to 32"),
    ("post", "/v1/completions", {"model": "a", "prompt": "x", "temperature": -1}, None, 400, "temperature"),
    ("post", "/v1/completions", {"model": "a"}, None, 400, "prompt"),
    ("post", "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}]}, None, 400,
     "no chat template"),
    ("post", "/classify", {"model": "a", "input": "hi"}, None, 400, "use POST /v1/completions"),
    ("get", "/v1/models", None, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, None, 400, "outside --adapter-root"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "{root}/adapters/../data.jsonl"}, None, 400,
     "outside --adapter-root"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "{root}/adapters/link-out"}, None, 400,
     "outside --adapter-root"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "{root}/adapters/empty"}, None, 400,
     "adapter_config.json"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "{root}/adapters/p"}, None, 400,
     "cannot share a batch with other adapters and cannot be merged into the weights: use it with peftlab generate"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "{root}/adapters/h"}, None, 400,
     "cannot share a batch with other adapters and cannot be merged into the weights: use it with peftlab generate"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "{root}/adapters/bart"}, None, 400,
     "the adapter was trained on random:bart-tiny, this base is random:t5-tiny"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "{root}/adapters/b"}, None, 400,
     "already served"),
    ("post", "/v1/unload_lora_adapter", {"lora_name": "ghost"}, None, 404, "no adapter named 'ghost'"),
]


@pytest.mark.parametrize("method,path,body,headers,status,says", BAD, ids=[f"{b[1]}-{b[4]}-{i}"
                                                                          for i, b in enumerate(BAD)])
def test_a_bad_request_gets_its_status_and_the_server_keeps_serving(server, runs, client, method, path, body,
                                                                    headers, status, says):
    (runs / "adapters" / "empty").mkdir(exist_ok=True)
    if not (runs / "adapters" / "link-out").exists():
        os.symlink(runs, runs / "adapters" / "link-out")
    headers = headers or {"Authorization": f"Bearer {KEY}"}
    if isinstance(body, str):
        response = httpx.post(server + path, content=body, headers={**headers, "Content-Type": "application/json"})
    elif isinstance(body, dict):
        body = json.loads(json.dumps(body).replace("{root}", str(runs)))
        response = httpx.request(method.upper(), server + path, json=body, headers=headers, timeout=60)
    else:
        response = httpx.request(method.upper(), server + path, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message and says in message, message
    assert client.completions.create(model="a", prompt="w1", max_tokens=2, temperature=0).choices  # still serving


@pytest.mark.parametrize("config,advice", [
    (lambda: LNTuningConfig(targets=["layer_norm"]), "merge it (peftlab merge) and serve the merged model"),
    (lambda: PromptTuningConfig(), "cannot be merged into the weights: use it with peftlab generate")])
def test_an_adapter_that_cannot_share_a_batch_gets_the_advice_its_method_allows(config, advice):
    from peftlab.serve.engine import unbatchable

    assert not config().can_mix() and advice in unbatchable(config(), "this")


def test_merge_refuses_an_unmergeable_adapter_before_writing_anything(runs, tmp_path, capsys):
    assert main(["merge", "-p", str(runs / "adapters" / "p"), "-o", str(tmp_path / "merged")]) != 0
    assert "prompt_tuning adapter cannot be merged into the weights" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_load_and_unload_an_adapter_at_run_time(server, runs, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{server}/v1/load_lora_adapter", headers=headers,
                          json={"lora_name": "b2", "lora_path": str(runs / "adapters" / "b")})
    assert response.status_code == 200, response.text
    assert "b2" in [m.id for m in client.models.list().data]
    loaded = client.completions.create(model="b2", prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
    assert loaded.strip() == alone(runs, "b", PROMPTS[2])
    assert httpx.post(f"{server}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "b2"}).status_code == 200
    response = httpx.post(f"{server}/v1/completions", headers=headers, json={"model": "b2", "prompt": "x"})
    assert response.status_code == 404


def test_metrics_count_the_requests_just_made(server, client):
    def served(text: str) -> float:
        line = next((x for x in text.splitlines() if x.startswith('peftlab_requests_total{adapter="c",'
                                                                   'endpoint="completions",status="200"}')), None)
        return float(line.split()[-1]) if line else 0.0

    before = served(httpx.get(f"{server}/metrics").text)
    for _ in range(3):
        client.completions.create(model="c", prompt="w2", max_tokens=2, temperature=0)
    text = httpx.get(f"{server}/metrics").text
    assert served(text) == before + 3
    assert "peftlab_batch_size_bucket" in text and "peftlab_generated_tokens_total" in text


def test_health_needs_no_key(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_the_command_serves_a_run_and_sigterm_finishes_the_request_in_flight(runs):
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFTLAB_ALLOCATOR": "system", "PEFTLAB_API_KEY": KEY}
    process = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", "-p", str(runs / "adapters" / "a"),
                                "--port", str(port), "--max-tokens", "64"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        headers = {"Authorization": f"Bearer {KEY}"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).json()["data"]
        assert [m["id"] for m in models] == ["random:t5-tiny", "a"]
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/completions", headers=headers, timeout=60,
                                  json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0.5,
                                        "n": 16, "seed": 1})  # 16 sampled answers, one after another
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            reply = pending.result()
            assert reply.status_code == 200 and len(reply.json()["choices"]) == 16  # finished, though in flight
        # uvicorn stops taking requests, finishes those in flight, then re-raises the signal it caught
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()


def test_chat_completions_format_the_messages_with_the_chat_template():
    from openai import OpenAI

    from peftlab.serve import build_engine

    engine = build_engine(model="random:llama-tiny", device="cpu", max_tokens=16)
    engine.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}assistant:{% endif %}")
    with running(engine) as address:
        client = OpenAI(base_url=f"{address}/v1", api_key="none", max_retries=0)
        chat = client.chat.completions.create(model="random:llama-tiny", max_tokens=6, temperature=0,
                                              messages=[{"role": "user", "content": "hello there"}])
        plain = client.completions.create(model="random:llama-tiny", prompt="user: hello there\nassistant:",
                                          max_tokens=6, temperature=0)
        assert chat.choices[0].message.content == plain.choices[0].text
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
        chunks = [c for c in client.chat.completions.create(
            model="random:llama-tiny", max_tokens=6, temperature=0, stream=True,
            messages=[{"role": "user", "content": "hello there"}]) if c.choices]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_classify_returns_labels_with_probabilities(tmp_path):
    from peftlab.serve import build_engine

    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": "pos" if i % 2 else "neg"} for i in range(16)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--model", "random:bert-tiny", "--data", str(data), "--max-steps", "4", "--output",
                 str(tmp_path / "sentiment")]) == 0
    engine = build_engine(run=str(tmp_path / "sentiment"), device="cpu")
    loaded = peftlab.eval.runs.load_run(tmp_path / "sentiment")
    with running(engine) as address:
        reply = httpx.post(f"{address}/classify", json={"model": "sentiment", "input": ["good film", "bad film"]})
        assert reply.status_code == 200, reply.text
        data = reply.json()["data"]
    import torch

    batch = loaded.tokenizer(["good film", "bad film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(loaded.model(**batch).logits, -1)
    for row, probs in zip(data, expected.tolist(), strict=True):
        assert row["probs"] == pytest.approx(probs, abs=1e-6)
        assert row["label"] == ["neg", "pos"][max(range(2), key=probs.__getitem__)] and row["num_classes"] == 2


def test_a_client_that_disconnects_mid_stream_does_not_stop_the_server(server, client):
    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stream": True, "n": 4}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    # closed after one event; the next requests are answered as before
    replies = [client.completions.create(model=m, prompt="w2", max_tokens=4, temperature=0) for m in ("a", "b")]
    assert all(r.choices for r in replies)
    gone = 'peftlab_requests_total{adapter="a",endpoint="completions",status="499"}'
    deadline = time.time() + 10
    while gone not in (text := httpx.get(f"{server}/metrics").text) and time.time() < deadline:
        time.sleep(0.1)
    assert gone in text  # counted as the client gone, its jobs cancelled


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bart-tiny"])
def test_requests_joining_a_running_batch_answer_as_alone(preset):
    """Iteration-level batching: requests of different lengths join and leave the running batch at decoding steps;
    each greedy answer equals HF generate's for that prompt alone (BART's forced end of sequence included)."""
    from openai import OpenAI

    from peftlab.eval.generation import generate
    from peftlab.models import resolve_task
    from peftlab.serve import build_engine

    name = f"random:{preset}"
    engine = build_engine(model=name, device="cpu", max_batch_size=4, max_tokens=24)
    jobs = [(p, tokens) for p, tokens in zip(["hello there", "a b c d e f", "x", "the quick brown fox", "w3 a0",
                                              "one two"], [24, 3, 17, 9, 20, 5], strict=True)]
    with running(engine) as address:
        client = OpenAI(base_url=f"{address}/v1", api_key="none", max_retries=0)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda job: client.completions.create(
                model=name, prompt=job[0], max_tokens=job[1], temperature=0).choices[0].text, jobs))
    model, tokenizer = peftlab.load_model(name)
    task = resolve_task(name)
    expected = [generate(model, tokenizer, [p], task, max_new_tokens=t)[0] for p, t in jobs]
    assert [a.strip() for a in answers] == expected
    assert max(engine.batch_sizes) > 1  # they did share decoding steps


JOBS = [("hello there", 12), ("a b c d e f", 3), ("x", 9), ("the quick brown fox", 7), ("w3 a0", 10), ("one two", 5)]


def decoded_staggered(model, tokenizer, task: str, admitted: int) -> list[list[int]]:
    """The decoder itself, admissions staggered deterministically: `admitted` new requests of JOBS at every
    decoding step, their prompts (of different lengths) prefilled as one padded batch."""
    from peftlab.serve.decode import Decoder
    from peftlab.serve.engine import Request

    decoder = Decoder(model, tokenizer, task, 512)
    sequences, active, pending = [], [], list(JOBS)
    while pending or active:
        if pending:
            joining = decoder.prefill([Request(prompt, BASE, tokens) for prompt, tokens in pending[:admitted]])
            del pending[:admitted]
            sequences += joining
            active += [s for s in joining if not decoder.done(s)]
        if active:
            decoder.step(active)
            active = [s for s in active if not decoder.done(s)]
    return [s.tokens for s in sequences]


@pytest.mark.parametrize("admitted", [1, 3, 6], ids=["one-a-step", "three-a-step", "all-at-once"])
@pytest.mark.parametrize("preset", ["t5-tiny", "bart-tiny", "gpt2-tiny", "llama-tiny"])
def test_sequences_joining_at_steps_decode_as_alone(preset, admitted):
    from peftlab.eval.generation import generate_ids
    from peftlab.models import resolve_task

    model, tokenizer = peftlab.load_model(f"random:{preset}")
    task = resolve_task(f"random:{preset}")
    for (prompt, tokens), decoded in zip(JOBS, decoded_staggered(model, tokenizer, task, admitted), strict=True):
        assert decoded == generate_ids(model, tokenizer, [prompt], task, max_new_tokens=tokens)[0][0], prompt


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny"])
def test_the_models_generation_config_applies_as_in_hf_generate(preset):
    """Repetition penalty, n-gram blocking, minimum lengths and a list of end tokens from the model's generation
    config: the served tokens equal HF generate's under the same config, and differ from those without it."""
    from collections import Counter

    from peftlab.eval.generation import generate_ids
    from peftlab.models import resolve_task

    model, tokenizer = peftlab.load_model(f"random:{preset}")
    task = resolve_task(f"random:{preset}")
    plain = decoded_staggered(model, tokenizer, task, 3)
    config = model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size = 1.3, 3
    penalized = decoded_staggered(model, tokenizer, task, 3)
    frequent = Counter(t for tokens in penalized for t in tokens[1:-1]).most_common(1)[0][0]  # an end that comes early
    config.eos_token_id, config.min_new_tokens = [tokenizer.eos_token_id, frequent], 2
    served = decoded_staggered(model, tokenizer, task, 3)
    for (prompt, tokens), decoded in zip(JOBS, served, strict=True):
        assert decoded == generate_ids(model, tokenizer, [prompt], task, max_new_tokens=tokens)[0][0], prompt
    assert served != plain
    assert any(2 <= len(s) < tokens for s, (_, tokens) in zip(served, JOBS, strict=True))  # ended early, not too early


BASE = "__base__"
