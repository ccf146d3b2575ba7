"""Semantic completion (`pairuni complete`): write the missing half of each quadruple with a VLM.

Understanding samples (image, question, answer) get a caption; generation samples (image,
caption) get a multiple-choice question with a letter answer. Any OpenAI-compatible
chat-completions endpoint works (OpenAI, vLLM, SGLang, llama.cpp, Ollama ...); images travel
inline as base64 data URLs.

Generate-then-verify. Every candidate is checked by a second, text-only call that answers
the question from the caption alone: a caption must let the model recover the known answer,
a generated question must be answerable from its caption with the generated answer. A
failed check (or an unparsable reply) triggers a new attempt that is told why the last one
failed, up to `max_attempts`; then the sample is rejected and reported.

Robustness. Transport errors, 408/409/429 and 5xx responses are retried with exponential
backoff and jitter (a server's Retry-After wins); at most `concurrency` samples are in
flight. Every finished reply is appended to an on-disk JSONL cache keyed by a hash of the
full request (model, messages, sampling settings) and flushed at once, so an interrupted
run loses no finished answer and a rerun replays cached replies instead of paying again
(and reaches the same decisions). The output file is written atomically at the end.

Safety. An image is sent only when its real path (symlinks resolved, `..` followed) lies inside the
source set's folder (the data root), unless `allow_images_outside`; only a file that decodes as a PNG,
JPEG, WebP or GIF image (`io.open_rgb`, pixel budget included; at most MAX_SEND_BYTES) is sent, from the
very bytes that were checked. `timeout` bounds each HTTP request in all (connect, send, every byte of
the reply), so a server that trickles its reply is cut at the deadline. Ctrl-C or SIGTERM (`pairuni
complete`) stops new calls and leaves no temporary file behind.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import random
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..files import atomic_writer
from .io import (
    ImageError,
    data_root_of,
    dumps_line,
    iter_samples,
    open_rgb,
    relocate_image_path,
    resolve_image_path,
)
from .schema import (
    OPTION_LETTERS,
    Sample,
    format_multiple_choice,
    parse_multiple_choice,
)

ENV_PREFIX = "PAIRUNI_COMPLETE_"
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
PROMPT_VERSION = 1  # part of every cache key: changing a prompt template must not replay old replies
MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif"}
#: The MIME type sent for each format PIL detects in a file's bytes (its suffix does not decide).
FORMAT_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
#: Largest image file sent, in bytes (the hosted APIs take 20 MB per image).
MAX_SEND_BYTES = 32 << 20
N_OPTIONS = 4


@dataclass
class CompletionConfig:
    """Settings of `pairuni complete`. CLI flags > config file > environment > these defaults.

    base_url:     OpenAI-compatible API root, e.g. http://localhost:8000/v1
                  (env PAIRUNI_COMPLETE_BASE_URL or OPENAI_BASE_URL).
    model:        model name sent in each request (env PAIRUNI_COMPLETE_MODEL or OPENAI_MODEL).
    api_key:      bearer token; "" sends none (env PAIRUNI_COMPLETE_API_KEY or OPENAI_API_KEY).
    temperature:  sampling temperature of the generation calls (verification uses 0).
    max_tokens:   reply length cap per call.
    timeout:      seconds per HTTP request in all (connect, send and every byte of the reply: a
                  server that trickles its reply is cut at this deadline).
    max_retries:  retries per call after a retryable failure (so max_retries + 1 tries).
    backoff_base: first retry delay in seconds; doubles per retry, +0-25% jitter.
    backoff_max:  cap on one retry delay, in seconds.
    concurrency:  samples processed at once (each runs its calls one after another).
    max_attempts: generate-then-verify rounds per sample before it is rejected.
    """

    base_url: str = ""
    model: str = ""
    api_key: str = ""
    temperature: float = 0.2
    max_tokens: int = 512
    timeout: float = 60.0
    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    concurrency: int = 4
    max_attempts: int = 3

    @classmethod
    def resolve(cls, overrides: dict[str, Any] | None = None, config_file: str | os.PathLike | None = None,
                env: dict[str, str] | None = None) -> CompletionConfig:
        """Merge defaults < environment < config file (YAML or JSON mapping) < `overrides` (None values ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, fallback in (("base_url", "OPENAI_BASE_URL"), ("model", "OPENAI_MODEL"), ("api_key", "OPENAI_API_KEY")):
            value = env.get(ENV_PREFIX + name.upper()) or env.get(fallback)
            if value:
                values[name] = value
        known = {f.name: f for f in fields(cls)}
        if config_file is not None:
            text = Path(config_file).read_text()
            if str(config_file).endswith((".yaml", ".yml")):
                import yaml

                loaded = yaml.safe_load(text) or {}
            else:
                loaded = json.loads(text)
            if not isinstance(loaded, dict):
                raise ValueError(f"config: {config_file} must hold a mapping of settings")
            unknown = sorted(set(loaded) - set(known))
            if unknown:
                raise ValueError(f"config: unknown setting(s) {unknown} in {config_file}; known: {sorted(known)}")
            values.update(loaded)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.check()
        return config

    def check(self) -> None:
        if not self.base_url:
            raise ValueError("base_url: not set (use --base-url, a config file, or PAIRUNI_COMPLETE_BASE_URL / OPENAI_BASE_URL)")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model: not set (use --model, a config file, or PAIRUNI_COMPLETE_MODEL / OPENAI_MODEL)")
        for name in ("concurrency", "max_attempts", "max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.timeout <= 0 or self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("max_retries/timeout/backoff_*: expected max_retries >= 0, timeout > 0, backoffs >= 0")


class CompletionError(RuntimeError):
    """A chat call that failed for good (non-retryable status, or retries exhausted)."""


class ResponseCache:
    """Append-only JSONL cache of chat replies: one `{"key", "reply", "model", "time"}` per line.

    Each `put` writes one line, flushes and fsyncs it before returning, under a lock (safe
    from many threads). Lines that do not parse (e.g. cut short by a crash) are skipped on
    load and counted in `n_corrupt`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self.n_corrupt = 0
        needs_newline = False
        if self.path.exists():
            with open(self.path, "rb") as fh:
                data = fh.read()
            needs_newline = bool(data) and not data.endswith(b"\n")
            for raw in data.splitlines():
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw)
                    self._entries[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.n_corrupt += 1
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for appends; see close)
        if needs_newline:  # never glue a new entry onto a torn last line
            self._fh.write("\n")
            self._fh.flush()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, reply: str, model: str) -> None:
        line = dumps_line({"key": key, "reply": reply, "model": model, "time": round(time.time(), 3)})
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._entries[key] = reply

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def request_key(payload: dict[str, Any]) -> str:
    """Cache key of a chat request: SHA-256 of its canonical JSON plus PROMPT_VERSION."""
    canonical = json.dumps({"v": PROMPT_VERSION, **payload}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_deadline = threading.local()  # .at: time.monotonic() by which the current thread's request must end


def _remaining(timeout: float | None, error):
    """The seconds a socket operation may take: `timeout` capped by this thread's request deadline;
    raises `error` (an httpcore timeout class) once the deadline has passed."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's total deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream:
    """An httpcore network stream whose every read and write ends by the thread's request deadline."""

    def __init__(self, stream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        import httpcore

        return self._stream.read(max_bytes, _remaining(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import httpcore

        self._stream.write(buffer, _remaining(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        import httpcore

        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _remaining(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend:
    """httpcore's network backend with `_DeadlineStream`s: httpx's timeouts are per socket operation, so a
    reply trickled one byte at a time would never time out; this caps them by a total deadline."""

    def __init__(self, backend):
        self._backend = backend

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        import httpcore

        return _DeadlineStream(self._backend.connect_tcp(host, port, _remaining(timeout, httpcore.ConnectTimeout),
                                                         local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        import httpcore

        return _DeadlineStream(self._backend.connect_unix_socket(path, _remaining(timeout, httpcore.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _with_deadlines(client) -> None:
    """Give every connection pool of an httpx.Client (direct and proxied) the deadline backend."""
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None:
            raise RuntimeError("httpx/httpcore changed: the total request deadline cannot be installed")
        if not isinstance(backend, _DeadlineBackend):
            pool._network_backend = _DeadlineBackend(backend)


class ChatClient:
    """Thread-safe chat-completions caller with retries, backoff and the reply cache.

    Every HTTP request ends within `config.timeout` seconds in all. `stop()` makes every later call
    (and retry) fail at once, so an interrupted run does not wait for the calls still queued.
    Counters (read after a run): n_requests (HTTP requests sent), n_cache_hits, n_retries.
    """

    def __init__(self, config: CompletionConfig, cache: ResponseCache, *, sleep=time.sleep):
        import httpx

        self.config = config
        self.cache = cache
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = httpx.Client(base_url=config.base_url.rstrip("/") + "/", headers=headers, timeout=config.timeout)
        _with_deadlines(self._http)
        self._httpx = httpx
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.n_requests = self.n_cache_hits = self.n_retries = 0

    def stop(self) -> None:
        self._stopped.set()

    def close(self) -> None:
        self._http.close()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _delay(self, retry: int, response=None) -> float:
        if response is not None:
            retry_after = response.headers.get("retry-after")
            if retry_after is not None:
                try:
                    return min(max(float(retry_after), 0.0), self.config.backoff_max)
                except ValueError:
                    pass
        base = min(self.config.backoff_base * 2 ** retry, self.config.backoff_max)
        return base * (1 + 0.25 * random.random())

    def chat(self, messages: list[dict[str, Any]], *, temperature: float | None = None) -> str:
        """The assistant reply to `messages`, from the cache when this exact request was answered before."""
        payload = {"model": self.config.model, "messages": messages,
                   "temperature": self.config.temperature if temperature is None else temperature,
                   "max_tokens": self.config.max_tokens}
        key = request_key(payload)
        cached = self.cache.get(key)
        if cached is not None:
            self._count("n_cache_hits")
            return cached
        last_error = ""
        for attempt in range(self.config.max_retries + 1):
            if self._stopped.is_set():
                raise CompletionError("interrupted")
            if attempt:
                self._count("n_retries")
            response = None
            try:
                self._count("n_requests")
                _deadline.at = time.monotonic() + self.config.timeout
                try:
                    response = self._http.post("chat/completions", json=payload)
                finally:
                    _deadline.at = None
            except self._httpx.TransportError as err:
                last_error = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    reply = _reply_text(response)
                    self.cache.put(key, reply, self.config.model)
                    return reply
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRYABLE_STATUS:
                    raise CompletionError(last_error)
            if attempt < self.config.max_retries:
                self._sleep(self._delay(attempt, response))
        raise CompletionError(f"gave up after {self.config.max_retries + 1} tries: {last_error}")


def _reply_text(response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise CompletionError(f"malformed chat-completions reply ({type(err).__name__}): {response.text[:200]}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise CompletionError(f"malformed chat-completions reply: content is {type(content).__name__}")
    return content.strip()


def image_data_url(path: str | os.PathLike) -> str:
    """`data:<mime>;base64,...` for an image file (png, jpeg, webp, gif).

    Only a file that decodes as one of those formats (`io.open_rgb`: all pixels, the pixel budget) and
    holds at most MAX_SEND_BYTES is encoded, from the bytes that were checked; the MIME type is that of
    the format found in the bytes. Raises ValueError (ImageError) naming the file otherwise."""
    path = Path(path)
    if path.suffix.lower() not in MIME_TYPES:
        raise ValueError(f"image: unsupported file type {path.suffix!r} (expected one of {sorted(MIME_TYPES)})")
    size = path.stat().st_size
    if size > MAX_SEND_BYTES:
        raise ImageError(f"image {path} holds {size:,} bytes, more than the {MAX_SEND_BYTES:,} sent at most")
    data = path.read_bytes()
    image = open_rgb(path, data=data)
    mime = FORMAT_MIME.get(image.info.get("format") or "")
    if mime is None:
        raise ImageError(f"image {path} is a {image.info.get('format')} file, not one of {sorted(FORMAT_MIME)}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def confined_image(image_path: str, data_root: Path, allow_outside: bool = False) -> Path:
    """The real path of a sample's image (symlinks resolved). Unless `allow_outside`, it must lie inside
    `data_root` (resolved too): an absolute path elsewhere, a `..` escape or a symlink out is refused
    (ValueError naming the path and the folder), so nothing outside the source set leaves the machine."""
    path = resolve_image_path(image_path, data_root).resolve()
    root = Path(data_root).resolve()
    if not allow_outside and not path.is_relative_to(root):
        raise ValueError(f"image {image_path!r} resolves to {path}, outside the source set's folder {root} "
                         "(--allow-images-outside sends it anyway)")
    return path


def parse_letter(text: str, n_options: int) -> str | None:
    """The option letter a reply picks ("B", "(B)", "B. red", "The answer is B"), or None."""
    letters = OPTION_LETTERS[:n_options]
    text = text.strip()
    # "B", "(B)", "B." or "B blue" pick B; "A red circle" is prose, not a pick.
    match = re.match(r"^[\(\[]?([A-J])(?:[\)\]\.:,]|$|\s+(?![a-z]))", text)
    if match and match.group(1) in letters:
        return match.group(1)
    match = re.search(r"answer\s*(?:is|:)?\s*[\(\[]?([A-J])\b", text, flags=re.IGNORECASE)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def parse_question_json(text: str) -> tuple[str, list[str], str]:
    """(question, options, answer letter) from a JSON reply, tolerating code fences and prose around it.

    Raises ValueError saying what is wrong; the message is fed back to the next attempt.
    """
    match = re.search(r"\{.*\}", text, flags=re.DOTALL)
    if not match:
        raise ValueError("the reply holds no JSON object")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as err:
        raise ValueError(f"the JSON does not parse ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError("the JSON is not an object")  # noqa: TRY004 (fed back to the model as text)
    question, options, answer = data.get("question"), data.get("options"), data.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(options, list) or len(options) != N_OPTIONS or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError(f"'options' must be a list of {N_OPTIONS} non-empty strings")
    if len({o.strip().lower() for o in options}) != N_OPTIONS:
        raise ValueError("'options' must be distinct")
    if not isinstance(answer, str) or answer.strip().upper() not in OPTION_LETTERS[:N_OPTIONS]:
        raise ValueError(f"'answer' must be one of {list(OPTION_LETTERS[:N_OPTIONS])}")
    # Strip "A. " prefixes a model may add itself; format_multiple_choice adds its own.
    cleaned = [re.sub(r"^[A-D][\.\)]\s+", "", o.strip()) for o in options]
    return question.strip(), cleaned, answer.strip().upper()


# ----- prompts -----------------------------------------------------------------------------------------

CAPTION_SYSTEM = "You write faithful, concrete image captions that are used as prompts for text-to-image training."
QA_SYSTEM = "You write multiple-choice questions about images for visual question answering training."
VERIFY_SYSTEM = "You answer multiple-choice questions using only the text you are given."


def caption_messages(sample: Sample, image_url: str, feedback: str | None) -> list[dict[str, Any]]:
    stem, options = parse_multiple_choice(sample.question)
    answer = sample.answer.strip()
    if options and answer in OPTION_LETTERS[:len(options)]:
        answer = f"{answer} ({options[OPTION_LETTERS.index(answer)]})"
    text = ("Write one caption for this image: one or two sentences, at most 60 words, describing what is visible "
            "(objects, colors, shapes, counts, positions, text) so that a text-to-image model could redraw it. "
            "The caption must state the visual facts needed to answer the question below and must agree with the "
            "given answer, without mentioning the question, options or letters.\n\n"
            f"Question: {stem}\n" + "".join(f"{OPTION_LETTERS[i]}. {o}\n" for i, o in enumerate(options)) +
            f"Correct answer: {answer}\n\nReply with the caption only.")
    if feedback:
        text += f"\n\n{feedback}"
    return [{"role": "system", "content": CAPTION_SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image_url}}]}]


def qa_messages(sample: Sample, image_url: str | None, feedback: str | None) -> list[dict[str, Any]]:
    text = (f"Caption: \"{sample.prompt.strip()}\"\n\n"
            f"Write one multiple-choice question about the visual content this caption describes, with exactly "
            f"{N_OPTIONS} options of which exactly one is correct according to the caption; the others must be "
            "plausible but wrong. Ask about something the caption states (a color, shape, count, position, object "
            "or action).\n"
            'Reply with JSON only: {"question": "...", "options": ["...", "...", "...", "..."], "answer": "A"}')
    if feedback:
        text += f"\n\n{feedback}"
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return [{"role": "system", "content": QA_SYSTEM}, {"role": "user", "content": content}]


def verify_messages(caption: str, question: str) -> list[dict[str, Any]]:
    text = (f"Caption: \"{caption.strip()}\"\n\nUsing only the caption above (you cannot see the image), answer this "
            f"question.\n\n{question.strip()}")
    return [{"role": "system", "content": VERIFY_SYSTEM}, {"role": "user", "content": text}]


# ----- per-sample pipeline -----------------------------------------------------------------------------

@dataclass
class Outcome:
    """What happened to one sample. status: completed | unchanged | rejected | skipped | error."""

    status: str
    sample: Sample
    attempts: int = 0
    reason: str = ""


def _verify(client: ChatClient, caption: str, question: str, answer: str) -> str | None:
    """None when a text-only reader of `caption` picks `answer`; else the reason it did not."""
    _, options = parse_multiple_choice(question)
    reply = client.chat(verify_messages(caption, question), temperature=0.0)
    picked = parse_letter(reply, len(options) or len(OPTION_LETTERS))
    if picked == answer:
        return None
    return f"a reader of the caption alone answered {picked or repr(reply[:40])} instead of {answer}"


def complete_sample(sample: Sample, client: ChatClient, data_root: Path, max_attempts: int, *,
                    allow_images_outside: bool = False) -> Outcome:
    """Fill in the caption or the question/answer of `sample` (generate, verify, retry with feedback).
    Its image is sent only from inside `data_root` unless `allow_images_outside` (`confined_image`)."""
    if sample.has_caption and sample.has_qa:
        return Outcome("unchanged", sample)
    if not sample.has_caption and not sample.has_qa:
        return Outcome("skipped", sample, reason="needs a question and answer or a caption to condition on")
    feedback = None
    try:
        image = confined_image(sample.image_path, data_root, allow_images_outside) if sample.image_path else None
        image_url = image_data_url(image) if image is not None and image.is_file() else None
        if not sample.has_caption:
            _, options = parse_multiple_choice(sample.question)
            if not options or sample.answer.strip() not in OPTION_LETTERS[:len(options)]:
                return Outcome("skipped", sample, reason="captioning needs a multiple-choice question with a letter answer")
            if image_url is None:
                return Outcome("error", sample, reason=f"image not found: {image}")
            for attempt in range(1, max_attempts + 1):
                caption = client.chat(caption_messages(sample, image_url, feedback)).strip().strip('"').strip()
                failure = ("the caption is empty" if not caption
                           else _verify(client, caption, sample.question, sample.answer.strip()))
                if failure is None:
                    sample.prompt = caption
                    return Outcome("completed", sample, attempts=attempt)
                feedback = (f"Attempt {attempt} failed a consistency check: caption \"{caption}\" - {failure}. "
                            "Write a caption that makes the correct answer clear.")
            return Outcome("rejected", sample, attempts=max_attempts, reason=failure)
        for attempt in range(1, max_attempts + 1):
            reply = client.chat(qa_messages(sample, image_url, feedback))
            try:
                stem, options, answer = parse_question_json(reply)
                question = format_multiple_choice(stem, options)
            except ValueError as err:
                failure = f"unusable reply ({err})"
            else:
                failure = _verify(client, sample.prompt, question, answer)
                if failure is None:
                    sample.question, sample.answer = question, answer
                    return Outcome("completed", sample, attempts=attempt)
            feedback = f"Attempt {attempt} failed: {failure}. Write a new question that the caption answers unambiguously."
        return Outcome("rejected", sample, attempts=max_attempts, reason=failure)
    except (CompletionError, ValueError, OSError) as err:  # one bad sample must not end the run
        return Outcome("error", sample, reason=str(err))


@dataclass
class CompletionReport:
    """Counts of one `complete_file` run."""

    counts: dict[str, int] = field(default_factory=dict)
    n_requests: int = 0
    n_cache_hits: int = 0
    n_retries: int = 0
    cache_entries: int = 0
    interrupted: bool = False
    first_error: str = ""  # the reason of the first sample that ended in "error" (all are in the rejected file)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_cache_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".cache.jsonl")


def rejected_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".rejected.jsonl")


def complete_file(input_path: str | os.PathLike, out: str | os.PathLike, config: CompletionConfig, *,
                  cache_path: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                  progress: bool = True, sleep=time.sleep, allow_images_outside: bool = False) -> CompletionReport:
    """Complete every sample of a source-set JSONL file into `out` (written atomically).

    Samples that end completed or were already complete are written to `out`, in input order;
    rejected, skipped and failed ones go to `<out>.rejected.jsonl` with a `completion_error`
    key. Replies are cached in `cache_path` (default `<out>.cache.jsonl`): rerunning after a
    crash, Ctrl-C or errors re-sends only the calls that never got an answer.
    `data_root` resolves image paths (default: the input file's folder); written image paths
    are relative to the folder of `out`. Images are sent only from inside `data_root` unless
    `allow_images_outside`. On Ctrl-C (KeyboardInterrupt) no later call starts, the temporary
    output files are removed and the interrupt is raised again.
    """
    from tqdm import tqdm

    config.check()
    root = Path(data_root) if data_root is not None else data_root_of(input_path)
    out_root = Path(out).resolve().parent
    cache = ResponseCache(cache_path or default_cache_path(out))
    client = ChatClient(config, cache, sleep=sleep)
    report = CompletionReport()
    window = max(4 * config.concurrency, 16)  # futures in flight, so memory does not grow with the file
    pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="complete")
    try:
        with atomic_writer(out) as good, atomic_writer(rejected_path(out)) as bad, \
                tqdm(desc="complete", unit="sample", disable=not progress) as bar:
            pending: collections.deque[Future] = collections.deque()

            def drain(limit: int) -> None:
                while len(pending) > limit:
                    outcome: Outcome = pending.popleft().result()
                    if outcome.sample.image_path:
                        outcome.sample.image_path = relocate_image_path(outcome.sample.image_path, root, out_root)
                    report.counts[outcome.status] = report.counts.get(outcome.status, 0) + 1
                    if outcome.status == "error" and not report.first_error:
                        report.first_error = outcome.reason
                    if outcome.status in ("completed", "unchanged"):
                        good.write(dumps_line(outcome.sample.to_ann()) + "\n")
                    else:
                        bad.write(dumps_line({**outcome.sample.to_ann(), "completion_error":
                                              f"{outcome.status}: {outcome.reason}"}) + "\n")
                    bar.update(1)
                    bar.set_postfix(done=report.counts.get("completed", 0), cached=client.n_cache_hits)

            for sample in iter_samples(input_path):
                pending.append(pool.submit(complete_sample, sample, client, root, config.max_attempts,
                                           allow_images_outside=allow_images_outside))
                drain(window)
            drain(0)
    except KeyboardInterrupt:
        report.interrupted = True
        client.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if not report.interrupted:
            pool.shutdown(wait=True)
        report.n_requests, report.n_cache_hits, report.n_retries = client.n_requests, client.n_cache_hits, client.n_retries
        report.cache_entries = len(cache)
        if not report.interrupted:  # else in-flight calls may still finish and land in the cache
            client.close()
            cache.close()
    return report
