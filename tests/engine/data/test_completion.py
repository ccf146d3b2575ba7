"""`pairuni complete` end to end against a local chat-completions server (http.server on 127.0.0.1).

The server is a "toy VLM": it decodes the data-URL image it is sent and reads the scene from
the pixels (`describe_image`), writes toy-world captions and colour questions, and answers
verification questions from the caption text. Switches make it lie, fail or stall, so
verification, retries, the cache and resumption are exercised over real HTTP with httpx.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from engine.data.completion import (
    CAPTION_SYSTEM,
    QA_SYSTEM,
    VERIFY_SYSTEM,
    ChatClient,
    CompletionConfig,
    ResponseCache,
    complete_file,
    default_cache_path,
    image_data_url,
    parse_letter,
    parse_question_json,
    rejected_path,
)
from engine.data.io import iter_samples, resolve_image_path, write_samples
from engine.data.schema import MC_SUFFIX, OPTION_LETTERS, parse_multiple_choice
from engine.data.toyworld import (
    COLORS,
    POSITIONS,
    Scene,
    caption_for,
    describe_image,
    generate_toy_world,
    parse_caption,
)

API_KEY = "test-key"


class ToyVLM:
    def __init__(self):
        self.lock = threading.Lock()
        self.log: list[tuple[str, int, str]] = []  # (task, status, request body)
        self.transient_failures = 0  # the next N requests get 503 + Retry-After: 0
        self.lie_once_colors: set[str] = set()  # first caption attempt names a wrong colour
        self.lie_always_colors: set[str] = set()
        self.broken_colors: set[str] = set()  # requests about these images get 500
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0

    def requests(self, task=None, status=200):
        return [body for t, s, body in self.log if (task is None or t == task) and s == status]

    def reply(self, payload):
        messages = payload["messages"]
        system, user = messages[0]["content"], messages[1]["content"]
        text = user if isinstance(user, str) else next(p["text"] for p in user if p["type"] == "text")
        images = [] if isinstance(user, str) else [p["image_url"]["url"] for p in user if p["type"] == "image_url"]
        if system == CAPTION_SYSTEM:
            assert images and images[0].startswith("data:image/png;base64,")
            pixels = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1])))
            seen = describe_image(pixels)
            color = seen["color"]
            if color in self.broken_colors:
                return "caption", 500, None
            lie = color in self.lie_always_colors or (color in self.lie_once_colors and "Attempt 1 failed" not in text)
            cells = tuple(POSITIONS.index(p) for p in seen["positions"])
            shape = seen["shape"]
            if lie:  # a caption wrong about every attribute, whatever the question asks
                color = next(c for c in COLORS if c != color)
                shape = next(s for s in ("circle", "square") if s != shape)
                cells = (0, 1) if len(cells) == 1 else (4,)
            scene = Scene(color, shape, cells)
            return "caption", 200, caption_for(scene)
        caption = re.search(r'Caption: "(.*?)"', text, flags=re.DOTALL).group(1)
        attrs = parse_caption(caption)
        if system == QA_SYSTEM:
            if attrs["color"] in self.broken_colors:
                return "qa", 500, None
            options = [attrs["color"]] + [c for c in COLORS if c != attrs["color"]][:3]
            options = options[1:2] + options[:1] + options[2:]  # the truth is option B
            return "qa", 200, "Here you go:\n```json\n" + json.dumps(
                {"question": f"What color is the {attrs['shape']}?", "options": options, "answer": "B"}) + "\n```"
        assert system == VERIFY_SYSTEM and not images  # verification is text-only
        _, options = parse_multiple_choice(text.split("answer this question.\n\n", 1)[1])
        facts = {attrs["color"], attrs["shape"], str(attrs["count"]), attrs["position"]}
        hits = [OPTION_LETTERS[i] for i, o in enumerate(options) if o in facts]
        return "verify", 200, f"The answer is {hits[0]}." if hits else "I cannot tell."

    def handle(self, handler):
        body = handler.rfile.read(int(handler.headers["Content-Length"])).decode()
        with self.lock:
            self.in_flight += 1
            handler.counted = True
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            transient = self.transient_failures > 0
            self.transient_failures -= transient
        try:
            time.sleep(self.delay)
            if handler.path != "/v1/chat/completions":
                return self._send(handler, 404, {"error": "not found"}, "?", body)
            if handler.headers.get("Authorization") != f"Bearer {API_KEY}":
                return self._send(handler, 401, {"error": {"message": "bad key"}}, "?", body)
            if transient:
                return self._send(handler, 503, {"error": "busy"}, "?", body, {"Retry-After": "0"})
            task, status, content = self.reply(json.loads(body))
            if status != 200:
                return self._send(handler, status, {"error": "boom"}, task, body)
            self._send(handler, 200, {"id": "x", "object": "chat.completion", "model": "toy",
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": content}}]}, task, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _uncount(self, handler):
        with self.lock:
            if getattr(handler, "counted", False):
                handler.counted = False
                self.in_flight -= 1

    def _send(self, handler, status, obj, task, body, headers=None):
        data = json.dumps(obj).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
        with self.lock:
            self.log.append((task, status, body))


@pytest.fixture
def server():
    vlm = ToyVLM()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            vlm.handle(self)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    vlm.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield vlm
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def inputs(tmp_path_factory):
    """A mixed source set in the toy world's folder: 4 captionless understanding samples, 4
    questionless generation samples, 1 complete sample, 1 with nothing to condition on."""
    root = tmp_path_factory.mktemp("world")
    generate_toy_world(8, root / "w", seed=11, aligned_fraction=0.0, progress=False)
    understand = list(iter_samples(root / "w" / "understand.jsonl"))
    generate = list(iter_samples(root / "w" / "generate.jsonl"))
    samples = []
    for s in understand[:4]:
        s.prompt = ""
        samples.append(s)
    for s in generate[:4]:
        s.question = s.answer = ""
        samples.append(s)
    samples.append(understand[4])
    bare = generate[4]
    bare.prompt = bare.question = bare.answer = ""
    samples.append(bare)
    write_samples(root / "w" / "todo.jsonl", samples)
    return root / "w" / "todo.jsonl"


def config(server, **over):
    values = {"base_url": server.base_url, "model": "toy", "api_key": API_KEY, "concurrency": 3,
              "max_retries": 2, "max_attempts": 2, "backoff_base": 0.0}
    values.update(over)
    return CompletionConfig(**values)


def run(inputs, out, cfg, **kw):
    return complete_file(inputs, out, cfg, progress=False, sleep=lambda s: None, **kw)


def test_end_to_end_then_rerun_pays_nothing(server, inputs, tmp_path):
    out = inputs.parent / "done.jsonl"
    report = run(inputs, out, config(server))
    assert report.counts == {"completed": 8, "unchanged": 1, "skipped": 1}
    assert not report.interrupted and report.n_retries == 0
    done = list(iter_samples(out))
    assert len(done) == 9 and all(s.is_complete for s in done)
    for s in done[:4]:  # captions written from the pixels, consistent with the known attributes
        assert parse_caption(s.prompt)["color"] == s.meta["attributes"]["color"]
    for s in done[4:8]:
        _, options = parse_multiple_choice(s.question)
        assert s.question.endswith(MC_SUFFIX) and len(options) == 4 and s.answer == "B"
        assert options[1] == s.meta["attributes"]["color"]
    elsewhere = tmp_path / "sub" / "done.jsonl"  # image paths are rewritten relative to the output folder
    run(inputs, elsewhere, config(server), cache_path=default_cache_path(out))
    assert all(resolve_image_path(s.image_path, elsewhere.parent).is_file() for s in iter_samples(elsewhere))
    assert [s.prompt for s in iter_samples(elsewhere)] == [s.prompt for s in done]
    skipped = [json.loads(x) for x in rejected_path(out).read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["completion_error"].startswith("skipped: needs a question")
    # every sample: one generation call + one verification call
    assert report.n_requests == len(server.requests()) == 16
    assert len(server.requests("caption")) == 4 and len(server.requests("qa")) == 4

    first = out.read_bytes()
    again = run(inputs, out, config(server))
    assert again.n_requests == 0 and again.n_cache_hits == 16 and len(server.log) == 16  # the 'elsewhere' run too
    assert out.read_bytes() == first


def test_failed_verification_regenerates_with_feedback_then_rejects(server, inputs, tmp_path):
    colors = [json.loads(x)["attributes"]["color"] for x in inputs.read_text().splitlines()[:4]]
    server.lie_once_colors = {colors[0]}
    server.lie_always_colors = {c for c in colors[1:] if c != colors[0]}
    assert server.lie_always_colors, "the fixture must hold two colours among the captionless samples"
    out = tmp_path / "done.jsonl"
    report = run(inputs, out, config(server, max_attempts=3))
    n_always = sum(c in server.lie_always_colors for c in colors)
    assert report.counts["rejected"] == n_always and report.counts["completed"] == 8 - n_always
    retried = [b for b in server.requests("caption") if "Attempt 1 failed a consistency check" in b]
    assert len(retried) == sum(c == colors[0] for c in colors) + n_always
    assert any("Attempt 2 failed" in b for b in server.requests("caption")) == (n_always > 0)
    rejected = [json.loads(x) for x in rejected_path(out).read_text().splitlines()]
    assert sum(r["completion_error"].startswith("rejected: a reader of the caption alone answered") for r in rejected) == n_always
    for s in iter_samples(out):  # whatever was accepted agrees with the pixels
        if s.tag and s.source_id.startswith("toy-u"):
            assert parse_caption(s.prompt)["color"] == s.meta["attributes"]["color"]


def test_transient_failures_are_retried_with_retry_after(server, inputs, tmp_path):
    server.transient_failures = 3
    delays = []
    report = complete_file(inputs, tmp_path / "o.jsonl", config(server, concurrency=1, max_retries=5),
                           progress=False, sleep=delays.append)
    assert report.counts["completed"] == 8 and report.n_retries == 3
    assert delays == [0.0, 0.0, 0.0]  # the server's Retry-After: 0 wins over backoff
    assert len(server.requests(status=503)) == 3


def test_backoff_is_exponential_with_bounded_jitter(tmp_path):
    cfg = CompletionConfig(base_url="http://127.0.0.1:9/v1", model="m", backoff_base=0.5, backoff_max=3.0)
    client = ChatClient(cfg, ResponseCache(tmp_path / "c.jsonl"))
    for retry, base in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        for _ in range(20):
            assert base <= client._delay(retry) <= base * 1.25
    client.close()


def test_unreachable_server_gives_up_after_retries(tmp_path, inputs):
    delays = []
    cfg = CompletionConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=2, backoff_base=0.1, timeout=2)
    report = complete_file(inputs, tmp_path / "o.jsonl", cfg, progress=False, sleep=delays.append)
    assert report.counts["error"] == 8 and report.n_requests == 8 * 3
    assert len(delays) == 8 * 2  # no sleep after the last try
    assert all(0.1 <= d <= 0.125 or 0.2 <= d <= 0.25 for d in delays)
    reasons = [json.loads(x)["completion_error"] for x in rejected_path(tmp_path / "o.jsonl").read_text().splitlines()]
    assert sum("gave up after 3 tries" in r for r in reasons) == 8


def test_cli_names_the_connection_error_of_a_dead_endpoint(tmp_path, inputs, capsys):
    from engine.data.cli import register

    parser = argparse.ArgumentParser(prog="pairuni")
    register(parser.add_subparsers())
    args = parser.parse_args(["complete", "--input", str(inputs), "--out", str(tmp_path / "o.jsonl"), "--quiet",
                              "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "8 sample(s) failed; the first: gave up after 1 tries: ConnectError" in err
    assert "no call succeeded: is the endpoint http://127.0.0.1:9/v1 up" in err


def test_client_errors_are_not_retried(server, inputs, tmp_path):
    report = run(inputs, tmp_path / "o.jsonl", config(server, api_key="wrong"))
    assert report.counts["error"] == 8 and report.n_retries == 0
    assert len(server.requests(status=401)) == 8  # one try per sample


def test_failures_lose_no_finished_answer_and_rerun_pays_only_the_rest(server, inputs, tmp_path):
    colors = [json.loads(x)["attributes"]["color"] for x in inputs.read_text().splitlines()[:8]]
    server.broken_colors = {colors[0]}
    out = tmp_path / "o.jsonl"
    first = run(inputs, out, config(server, max_retries=1))
    n_broken = sum(c == colors[0] for c in colors)
    assert first.counts["error"] == n_broken and first.counts["completed"] == 8 - n_broken
    cached = ResponseCache(default_cache_path(out))
    assert len(cached) == len(server.requests()) == 2 * (8 - n_broken)  # every answered call was saved at once
    cached.close()

    server.broken_colors = set()
    answered_before = server.requests()
    second = run(inputs, out, config(server))
    assert second.counts == {"completed": 8, "unchanged": 1, "skipped": 1}
    assert second.n_requests == 2 * n_broken and second.n_cache_hits == 2 * (8 - n_broken)
    new = server.requests()[len(answered_before):]
    assert len(new) == 2 * n_broken and not set(new) & set(answered_before)  # nothing answered was paid twice


def test_torn_cache_line_is_skipped_and_never_glued(server, inputs, tmp_path):
    out = tmp_path / "o.jsonl"
    run(inputs, out, config(server))
    cache_path = default_cache_path(out)
    lines = cache_path.read_text().splitlines()
    cache_path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # crash mid-write
    report = run(inputs, out, config(server))
    assert report.n_requests == 1 and report.counts["completed"] == 8
    cache = ResponseCache(cache_path)
    assert cache.n_corrupt == 1 and len(cache) == 16
    cache.close()


def test_concurrency_limit_is_respected(server, inputs, tmp_path):
    server.delay = 0.05
    report = run(inputs, tmp_path / "o.jsonl", config(server, concurrency=2))
    assert report.counts["completed"] == 8
    assert 1 <= server.max_in_flight <= 2


def test_cli_complete_reads_the_environment(server, inputs, tmp_path, monkeypatch, capsys):
    from engine.data.cli import register

    monkeypatch.setenv("PAIRUNI_COMPLETE_BASE_URL", server.base_url)
    monkeypatch.setenv("PAIRUNI_COMPLETE_MODEL", "toy")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    parser = argparse.ArgumentParser(prog="pairuni")
    register(parser.add_subparsers())
    out = tmp_path / "cli.jsonl"
    args = parser.parse_args(["complete", "--input", str(inputs), "--out", str(out), "--quiet", "--concurrency", "2"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "8 completed" in printed and "16 HTTP requests" in printed
    assert len(out.read_text().splitlines()) == 9

    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    args = parser.parse_args(["complete", "--input", str(inputs), "--out", str(tmp_path / "x.jsonl"), "--quiet"])
    assert args.func(args) == 1
    monkeypatch.delenv("PAIRUNI_COMPLETE_MODEL")
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    args = parser.parse_args(["complete", "--input", str(inputs), "--out", str(tmp_path / "y.jsonl")])
    assert args.func(args) == 2 and "model: not set" in capsys.readouterr().err


def test_config_precedence(tmp_path):
    env = {"OPENAI_BASE_URL": "http://env/v1", "PAIRUNI_COMPLETE_MODEL": "env-model", "OPENAI_MODEL": "other"}
    (tmp_path / "c.yaml").write_text("model: file-model\nconcurrency: 7\n")
    cfg = CompletionConfig.resolve({"concurrency": None, "temperature": 0.0}, tmp_path / "c.yaml", env=env)
    assert (cfg.base_url, cfg.model, cfg.concurrency, cfg.temperature) == ("http://env/v1", "file-model", 7, 0.0)
    assert CompletionConfig.resolve({"model": "flag"}, tmp_path / "c.yaml", env=env).model == "flag"
    (tmp_path / "bad.json").write_text('{"modle": "x"}')
    with pytest.raises(ValueError, match="unknown setting"):
        CompletionConfig.resolve(None, tmp_path / "bad.json", env=env)
    with pytest.raises(ValueError, match="base_url"):
        CompletionConfig.resolve({"model": "m"}, env={})
    with pytest.raises(ValueError, match="concurrency"):
        CompletionConfig.resolve({"concurrency": 0}, env=env)


def test_parsers():
    assert [parse_letter(t, 4) for t in ["B", "(C)", "D. red", "The answer is A.", "answer: c", "E", "Blue", "A red circle"]] \
        == ["B", "C", "D", "A", "C", None, None, None]
    assert parse_question_json('```json\n{"question": "Q?", "options": ["A. x", "y", "z", "w"], "answer": "d"}\n```') \
        == ("Q?", ["x", "y", "z", "w"], "D")
    for bad, message in [("no json here", "no JSON"), ('{"question": "", "options": [], "answer": "A"}', "question"),
                         ('{"question": "q", "options": ["a", "b", "c"], "answer": "A"}', "4 non-empty"),
                         ('{"question": "q", "options": ["a", "a", "c", "d"], "answer": "A"}', "distinct"),
                         ('{"question": "q", "options": ["a", "b", "c", "d"], "answer": "E"}', "answer")]:
        with pytest.raises(ValueError, match=message):
            parse_question_json(bad)


def test_image_data_url(tmp_path):
    Image.new("RGB", (2, 2), (255, 0, 0)).save(tmp_path / "x.png")
    url = image_data_url(tmp_path / "x.png")
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="unsupported"):
        image_data_url(tmp_path / "x.bmp")


def test_bad_samples_are_reported_not_fatal(server, tmp_path):
    from engine.data.schema import Sample

    (tmp_path / "x.bmp").write_bytes(b"BM")
    question = f"What color?\nA. red\nB. blue\n{MC_SUFFIX}"
    write_samples(tmp_path / "in.jsonl", [Sample("absent.png", question=question, answer="A"),
                                          Sample("x.bmp", question=question, answer="B"),
                                          Sample("absent.png", question="Describe it.", answer="a dog")])
    report = run(tmp_path / "in.jsonl", tmp_path / "out.jsonl", config(server))
    assert report.counts == {"error": 2, "skipped": 1} and report.n_requests == 0
    reasons = [json.loads(x)["completion_error"] for x in rejected_path(tmp_path / "out.jsonl").read_text().splitlines()]
    assert reasons[0].startswith("error: image not found") and "unsupported file type" in reasons[1]
    assert reasons[2].startswith("skipped: captioning needs a multiple-choice question")
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_images_outside_the_source_folder_or_not_images_are_never_sent(server, inputs, tmp_path):
    import os
    import shutil

    from engine.data.schema import Sample

    world = inputs.parent
    captionless = next(iter_samples(inputs))
    secret = world.parent / "secret.png"  # a toy image outside the source set's folder
    shutil.copy(resolve_image_path(captionless.image_path, world), secret)
    os.symlink(secret, world / "link.png")
    (world / "key.png").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n")
    question, answer = captionless.question, captionless.answer
    samples = [Sample(str(secret), question=question, answer=answer), Sample("../secret.png", question=question, answer=answer),
               Sample("link.png", question=question, answer=answer), Sample("key.png", question=question, answer=answer)]
    write_samples(world / "hostile.jsonl", samples)
    report = run(world / "hostile.jsonl", tmp_path / "o.jsonl", config(server))
    assert report.counts == {"error": 4} and report.n_requests == 0 and server.log == []
    reasons = [json.loads(x)["completion_error"] for x in rejected_path(tmp_path / "o.jsonl").read_text().splitlines()]
    assert all(f"resolves to {secret}, outside the source set's folder" in r for r in reasons[:3]), reasons
    assert "not a readable image" in reasons[3] and "key.png" in reasons[3]
    allowed = run(world / "hostile.jsonl", tmp_path / "p.jsonl", config(server), allow_images_outside=True)
    assert allowed.counts.get("error") == 1 and len(server.requests("caption")) >= 3  # the key still stays home
    assert all("PRIVATE KEY" not in body and "b3BlbnNzaC1rZXkt" not in body for body in server.requests())


def trickling_server(trickle_headers: bool):
    """A chat endpoint that sends its reply one byte every 0.5 s (at most 40 bytes, so 20 s at most)."""
    reply = json.dumps({"choices": [{"message": {"content": "A"}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(reply)}\r\n\r\n").encode()
            slow = head + reply if trickle_headers else reply
            if not trickle_headers:
                self.wfile.write(head)
                self.wfile.flush()
            for i in range(min(len(slow), 40)):
                try:
                    self.wfile.write(slow[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.5)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


@pytest.mark.parametrize("trickle_headers", [False, True])
def test_a_trickling_server_is_cut_at_the_total_deadline(tmp_path, trickle_headers):
    from engine.data.completion import CompletionError

    httpd = trickling_server(trickle_headers)
    try:
        cfg = CompletionConfig(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", model="m", timeout=1.5,
                               max_retries=0)
        client = ChatClient(cfg, ResponseCache(tmp_path / "c.jsonl"))
        start = time.monotonic()
        with pytest.raises(CompletionError, match="Timeout"):
            client.chat([{"role": "user", "content": "hi"}])
        elapsed = time.monotonic() - start
        assert 1.4 <= elapsed < 4.0, elapsed  # per-read timeouts of 1.5 s never fire at 0.5 s a byte (20 s in all)
        client.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_sigterm_leaves_no_temporary_file(inputs, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    got, release = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            got.set()
            release.wait(10)  # stalls until the test ends (at most 10 s)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    out = tmp_path / "out" / "o.jsonl"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "complete", "--input", str(inputs), "--out", str(out),
                             "--base-url", f"http://127.0.0.1:{httpd.server_address[1]}/v1", "--model", "m", "--quiet",
                             "--timeout", "3", "--max-retries", "0"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert got.wait(120), "the command never sent a request"
        assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")], "the outputs are written meanwhile"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 143, (stdout, stderr)
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.jsonl.cache.jsonl"]  # no temp file, no half output
