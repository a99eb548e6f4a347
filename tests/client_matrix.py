"""The client matrix: every client people point at meterproxy, as the README sets it up.

Each entry calls the proxy the way its README line says (base URL, key, X-Meter-* headers)
and returns what the client itself saw: the text and, where the client exposes it, the
usage. tests/test_clients.py runs every entry streamed and not, and once against an
exhausted budget; tests/test_docs.py checks that the README's client table lists exactly
these entries with the refusal behaviour recorded here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5",
          "gemini": "gemini-2.5-flash"}
NODE_DIR = Path(__file__).parent / "clients"
# Where the Node clients are installed, one folder per package-lock.json, so CI's second
# run finds them there.
NODE_CACHE = Path(os.environ.get("METERPROXY_NODE_CACHE",
                                  Path.home() / ".cache" / "meterproxy" / "node-clients"))
NODE_INSTALL = "apt-get install -y nodejs npm   (the Node clients install themselves from npm)"
PY_NODEPS = NODE_DIR / "requirements-nodeps.txt"
PY_CACHE = NODE_CACHE.parent / "py-clients"
# METERPROXY_CLIENTS_LATEST=1: every client at its newest release instead of the pinned one
# (Node: npm's latest; Python: a venv of PyPI's newest, one a day, next to the Node ones).
LATEST = bool(os.environ.get("METERPROXY_CLIENTS_LATEST"))
PY_LATEST = ("openai", "anthropic", "google-genai", "langchain-openai", "langchain-anthropic",
             "langchain-google-genai", "pydantic-ai-slim[openai,anthropic,google]", "litellm",
             "llm", "pyyaml")
PY_LATEST_NODEPS = ("instructor",)  # its jiter pin conflicts with openai's (see PY_NODEPS)


@dataclass(frozen=True)
class Request:
    """One call as a test asks for it."""

    proxy: str
    key: str
    stream: bool
    prompt: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Answer:
    """What the client returned; tokens are None where the client does not expose usage."""

    text: str
    input_tokens: int | None
    output_tokens: int | None


class ClientFailed(Exception):
    """A client raised: its exception's name and the HTTP status it carried."""

    def __init__(self, name: str, status: int | None, message: str) -> None:
        super().__init__(f"{name} ({status}): {message}")
        self.name, self.status = name, status


@dataclass(frozen=True)
class Client:
    """One row of the README's client table."""

    name: str
    language: str  # Python, Node or shell
    provider: str  # which provider path it calls: openai, anthropic or gemini
    package: str  # the distribution whose version the report names ("" for curl)
    run: Callable[[Request], Answer]
    # What the client does when the proxy refuses a call for its budget (HTTP 429):
    attempts_on_429: int  # how many times it sends the refused call in all
    raises: str  # the exception (or outcome) the caller sees
    usage_streamed: bool = True  # whether the client hands the caller a stream's usage
    base: str = ""  # what it is set to after the proxy's address (README: P+"<base>")


def _failed(exc: BaseException) -> ClientFailed:
    """The exception's name, and the HTTP status it (or an exception it wraps) carries."""
    status, seen = None, exc
    while seen is not None and status is None:
        for attr in ("status_code", "status", "code"):
            value = getattr(seen, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                status = value
                break
        seen = seen.__cause__ or seen.__context__
    return ClientFailed(type(exc).__name__, status, str(exc)[:1000])


def _catching(run: Callable[[Request], Answer]) -> Callable[[Request], Answer]:
    def wrapped(req: Request) -> Answer:
        try:
            return run(req)
        except ClientFailed:
            raise
        except Exception as exc:
            raise _failed(exc) from exc

    wrapped.__name__ = run.__name__
    return wrapped


# --- Python: the official SDKs ------------------------------------------------------------

def openai_sdk(req: Request) -> Answer:
    import openai

    client = openai.OpenAI(base_url=f"{req.proxy}/openai/v1", api_key=req.key,
                           default_headers=req.headers)
    messages = [{"role": "user", "content": req.prompt}]
    if not req.stream:
        r = client.chat.completions.create(model=MODELS["openai"], messages=messages)
        return Answer(r.choices[0].message.content, r.usage.prompt_tokens,
                      r.usage.completion_tokens)
    text, usage = "", None
    for chunk in client.chat.completions.create(model=MODELS["openai"], messages=messages,
                                                stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    return Answer(text, usage.prompt_tokens, usage.completion_tokens)


def anthropic_sdk(req: Request) -> Answer:
    import anthropic

    client = anthropic.Anthropic(base_url=f"{req.proxy}/anthropic", api_key=req.key,
                                 default_headers=req.headers)
    args = {"model": MODELS["anthropic"], "max_tokens": 256,
            "messages": [{"role": "user", "content": req.prompt}]}
    if req.stream:
        with client.messages.stream(**args) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**args)
    text = "".join(b.text for b in message.content if b.type == "text")
    return Answer(text, message.usage.input_tokens, message.usage.output_tokens)


def google_genai(req: Request) -> Answer:
    from google import genai

    client = genai.Client(api_key=req.key, http_options=genai.types.HttpOptions(
        base_url=f"{req.proxy}/gemini", headers=req.headers))
    if not req.stream:
        r = client.models.generate_content(model=MODELS["gemini"], contents=req.prompt)
        return Answer(r.text, r.usage_metadata.prompt_token_count,
                      r.usage_metadata.candidates_token_count)
    text, usage = "", None
    for chunk in client.models.generate_content_stream(model=MODELS["gemini"],
                                                       contents=req.prompt):
        text += chunk.text or ""
        usage = chunk.usage_metadata or usage
    return Answer(text, usage.prompt_token_count, usage.candidates_token_count)


# --- Python: frameworks -------------------------------------------------------------------

def _langchain(model: Any, req: Request) -> Answer:
    if not req.stream:
        message = model.invoke(req.prompt)
    else:
        message = None
        for chunk in model.stream(req.prompt):
            message = chunk if message is None else message + chunk
    usage = message.usage_metadata or {}
    return Answer(message.text, usage.get("input_tokens"), usage.get("output_tokens"))


def langchain_openai(req: Request) -> Answer:
    from langchain_openai import ChatOpenAI

    # stream_usage: ChatOpenAI turns stream usage off for a custom base_url.
    return _langchain(ChatOpenAI(model=MODELS["openai"], base_url=f"{req.proxy}/openai/v1",
                                 api_key=req.key, default_headers=req.headers,
                                 stream_usage=True), req)


def langchain_anthropic(req: Request) -> Answer:
    from langchain_anthropic import ChatAnthropic

    return _langchain(ChatAnthropic(model=MODELS["anthropic"], base_url=f"{req.proxy}/anthropic",
                                    api_key=req.key, default_headers=req.headers,
                                    max_tokens=256), req)


def langchain_google(req: Request) -> Answer:
    from langchain_google_genai import ChatGoogleGenerativeAI

    return _langchain(ChatGoogleGenerativeAI(model=MODELS["gemini"], google_api_key=req.key,
                                             base_url=f"{req.proxy}/gemini",
                                             additional_headers=req.headers), req)


def _pydantic_ai(model: Any, req: Request) -> Answer:
    from pydantic_ai import Agent

    agent = Agent(model, model_settings={"extra_headers": req.headers, "max_tokens": 256})

    async def go() -> Answer:
        if not req.stream:
            result = await agent.run(req.prompt)
            text, usage = result.output, result.usage()
        else:
            async with agent.run_stream(req.prompt) as result:
                text = await result.get_output()
                usage = result.usage()
        return Answer(text, usage.input_tokens, usage.output_tokens)

    return asyncio.run(go())


def pydantic_ai_openai(req: Request) -> Answer:
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=f"{req.proxy}/openai/v1", api_key=req.key)
    return _pydantic_ai(OpenAIChatModel(MODELS["openai"], provider=provider), req)


def pydantic_ai_anthropic(req: Request) -> Answer:
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    provider = AnthropicProvider(base_url=f"{req.proxy}/anthropic", api_key=req.key)
    return _pydantic_ai(AnthropicModel(MODELS["anthropic"], provider=provider), req)


def pydantic_ai_google(req: Request) -> Answer:
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    provider = GoogleProvider(base_url=f"{req.proxy}/gemini", api_key=req.key)
    return _pydantic_ai(GoogleModel(MODELS["gemini"], provider=provider), req)


# The api_base each of litellm's routes needs (it appends only the method's own path).
LITELLM_BASE = {"openai": "/openai/v1", "anthropic": "/anthropic", "gemini": "/gemini/v1beta"}


def _litellm(provider: str, req: Request) -> Answer:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    import litellm

    args = {"model": f"{provider}/{MODELS[provider]}", "api_base": req.proxy
            + LITELLM_BASE[provider], "api_key": req.key, "extra_headers": req.headers,
            "max_tokens": 256, "messages": [{"role": "user", "content": req.prompt}]}
    if not req.stream:
        r = litellm.completion(**args)
        return Answer(r.choices[0].message.content, r.usage.prompt_tokens,
                      r.usage.completion_tokens)
    text, usage = "", None
    for chunk in litellm.completion(**args, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = getattr(chunk, "usage", None) or usage
    return Answer(text, usage.prompt_tokens, usage.completion_tokens)


def instructor_openai(req: Request) -> Answer:
    """instructor in JSON mode; the simulator is told to answer with the object's JSON."""
    nodeps_dir()
    import instructor
    import openai
    from pydantic import BaseModel

    class Greeting(BaseModel):
        greeting: str

    client = instructor.from_openai(openai.OpenAI(
        base_url=f"{req.proxy}/openai/v1", api_key=req.key, default_headers=req.headers),
        mode=instructor.Mode.JSON)
    args = {"model": MODELS["openai"], "response_model": Greeting,
            "messages": [{"role": "user", "content": req.prompt}]}
    if not req.stream:
        greeting, completion = client.chat.completions.create_with_completion(**args)
        return Answer(greeting.greeting, completion.usage.prompt_tokens,
                      completion.usage.completion_tokens)
    last = None
    for partial in client.chat.completions.create_partial(**args):
        last = partial
    return Answer(last.greeting, None, None)


def llm_cli(req: Request) -> Answer:
    """The `llm` command with an extra-openai-models.yaml entry for the proxy."""
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as home:
        Path(home, "extra-openai-models.yaml").write_text(yaml.safe_dump([{
            "model_id": "meter-4o-mini", "model_name": MODELS["openai"],
            "api_base": f"{req.proxy}/openai/v1", "api_key_name": "meterproxy",
            "headers": req.headers}]))
        Path(home, "keys.json").write_text(json.dumps({"meterproxy": req.key}))
        env = {**os.environ, "LLM_USER_PATH": home}
        mode = [] if req.stream else ["--no-stream"]
        out = subprocess.run([sys.executable, "-m", "llm", "-m", "meter-4o-mini", *mode,
                              req.prompt], capture_output=True, text=True, env=env, timeout=60)
        if out.returncode != 0:
            raise ClientFailed("llm exit " + str(out.returncode), None, out.stderr[-300:])
        logs = subprocess.run([sys.executable, "-m", "llm", "logs", "-n", "1", "--json"],
                              capture_output=True, text=True, env=env, timeout=60, check=True)
        entry = json.loads(logs.stdout)[0]
        return Answer(out.stdout.rstrip("\n"), entry["input_tokens"], entry["output_tokens"])


# --- curl -----------------------------------------------------------------------------

_CURL = {
    "openai": ("/openai/v1/chat/completions", "Authorization: Bearer {key}"),
    "anthropic": ("/anthropic/v1/messages", "x-api-key: {key}"),
    "gemini": ("/gemini/v1beta/models/{model}:{method}", "x-goog-api-key: {key}"),
}


def _curl(provider: str, req: Request) -> Answer:
    path, auth = _CURL[provider]
    model = MODELS[provider]
    if provider == "gemini":
        method = "streamGenerateContent?alt=sse" if req.stream else "generateContent"
        path = path.format(model=model, method=method)
        body: dict[str, Any] = {"contents": [{"parts": [{"text": req.prompt}]}]}
    else:
        body = {"model": model, "max_tokens": 256, "stream": req.stream,
                "messages": [{"role": "user", "content": req.prompt}]}
        if provider == "openai" and req.stream:
            body["stream_options"] = {"include_usage": True}
    headers = [auth.format(key=req.key), "Content-Type: application/json",
               *(f"{k}: {v}" for k, v in req.headers.items())]
    if provider == "anthropic":
        headers.append("anthropic-version: 2023-06-01")
    cmd = ["curl", "-sS", "-N", "--fail-with-body", req.proxy + path, "-d", json.dumps(body)]
    for header in headers:
        cmd += ["-H", header]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        status = json.loads(out.stdout).get("error", {}) if out.stdout.startswith("{") else {}
        raise ClientFailed("curl exit 22", status.get("code") if provider == "gemini" else None,
                           out.stdout[-300:])
    events = ([json.loads(line[5:]) for line in out.stdout.splitlines()
               if line.startswith("data:") and line[5:].strip() != "[DONE]"]
              if req.stream else [json.loads(out.stdout)])
    return _read_events(provider, events)


def _read_events(provider: str, events: list[dict[str, Any]]) -> Answer:
    """Text and usage from a provider's response body or stream events, read by hand."""
    text, tokens_in, tokens_out = "", None, None
    for e in events:
        if provider == "openai":
            for choice in e.get("choices", []):
                text += (choice.get("delta") or choice.get("message") or {}).get("content") or ""
            if e.get("usage"):
                tokens_in, tokens_out = e["usage"]["prompt_tokens"], e["usage"]["completion_tokens"]
        elif provider == "anthropic":
            text += "".join(b.get("text", "") for b in e.get("content", []))
            if e.get("type") == "content_block_delta":
                text += e["delta"].get("text", "")
            usage = e.get("usage") or e.get("message", {}).get("usage") or {}
            tokens_in = usage.get("input_tokens", tokens_in)
            tokens_out = usage.get("output_tokens", tokens_out)
        else:
            for candidate in e.get("candidates", []):
                text += "".join(p.get("text", "") for p in candidate["content"].get("parts", []))
            meta = e.get("usageMetadata") or {}
            tokens_in = meta.get("promptTokenCount", tokens_in)
            tokens_out = meta.get("candidatesTokenCount", tokens_out)
    return Answer(text, tokens_in, tokens_out)


def nodeps_dir() -> Path:
    """tests/clients/requirements-nodeps.txt, installed once without their dependency pins
    into a cached folder that joins the end of sys.path."""
    target = PY_CACHE / hashlib.sha256(PY_NODEPS.read_bytes()).hexdigest()[:16]
    done = target / ".installed"
    if not done.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), "-r", str(PY_NODEPS)], check=True, capture_output=True,
                       timeout=600)
        done.touch()
    if str(target) not in sys.path:
        sys.path.append(str(target))
    return target


def latest_python() -> Path:
    """A venv over this environment holding the newest release of every Python client
    (PY_LATEST), installed from the package index once a day into the cache; with
    METERPROXY_CLIENTS_LATEST each Python client's call runs in it (`python -m
    tests.client_matrix`), so the pinned versions the test process imported are not in
    the way."""
    target = PY_CACHE / f"latest-{time.strftime('%Y%m%d')}"
    python = target / "bin" / "python"
    if not (target / ".installed").exists():
        # On top of this environment: only the clients (and what they need) are upgraded.
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--system-site-packages",
                        str(target)], check=True, capture_output=True, timeout=300)
        for extra, names in (([], PY_LATEST), (["--no-deps"], PY_LATEST_NODEPS)):
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", *extra,
                            *names], check=True, capture_output=True, timeout=1800)
        (target / ".installed").touch()
    return python


def _in_latest(name: str) -> Callable[[Request], Answer]:
    def run(req: Request) -> Answer:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run([str(latest_python()), "-m", "tests.client_matrix", name,
                              json.dumps(dataclasses.asdict(req))], cwd=root,
                             env={**os.environ, "PYTHONPATH": str(root)},
                             capture_output=True, text=True, timeout=180)
        try:
            result = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise ClientFailed(f"python exit {out.returncode}", None,
                               out.stderr[-500:]) from None
        if "error" in result:
            error = result["error"]
            raise ClientFailed(error["name"], error["status"], error["message"])
        return Answer(result["text"], result["input_tokens"], result["output_tokens"])

    run.__name__ = f"latest_{name}"
    return run


# --- Node -----------------------------------------------------------------------------

def node_dir() -> Path:
    """The Node clients of tests/clients/package-lock.json, installed once from npm; with
    METERPROXY_CLIENTS_LATEST=1 the newest release of each instead (one folder a day)."""
    if not (shutil.which("node") and shutil.which("npm")):
        raise FileNotFoundError(NODE_INSTALL)
    pinned = json.loads((NODE_DIR / "package.json").read_text())
    if LATEST:
        target = NODE_CACHE / f"latest-{time.strftime('%Y%m%d')}"
        latest = {**pinned, "dependencies": dict.fromkeys(pinned["dependencies"], "latest")}
        files = {"package.json": json.dumps(latest, indent=2)}
        install = ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"]
    else:
        names = ("package.json", "package-lock.json")
        digest = hashlib.sha256(b"".join((NODE_DIR / n).read_bytes() for n in names))
        target = NODE_CACHE / digest.hexdigest()[:16]
        files = {n: (NODE_DIR / n).read_text() for n in names}
        install = ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"]
    if not (target / "node_modules" / ".package-lock.json").exists():
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (target / name).write_text(text)
        subprocess.run(install, cwd=target, check=True, capture_output=True, timeout=600)
    # ES modules resolve packages next to the script, so the driver runs from there.
    shutil.copy(NODE_DIR / "drive.mjs", target / "drive.mjs")
    return target


def _node(name: str) -> Callable[[Request], Answer]:
    def run(req: Request) -> Answer:
        args = {"client": name, "proxy": req.proxy, "key": req.key, "stream": req.stream,
                "prompt": req.prompt, "headers": req.headers}
        out = subprocess.run(["node", str(node_dir() / "drive.mjs"), json.dumps(args)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise ClientFailed("node exit " + str(out.returncode), None, out.stderr[-500:])
        result = json.loads(out.stdout)
        if "error" in result:
            error = result["error"]
            raise ClientFailed(error["name"], error["status"], error["message"])
        return Answer(result["text"], result["input_tokens"], result["output_tokens"])

    run.__name__ = f"node_{name}"
    return run


def _on(provider: str, fn: Callable[[str, Request], Answer]) -> Callable[[Request], Answer]:
    def run(req: Request) -> Answer:
        return fn(provider, req)

    run.__name__ = f"{fn.__name__}_{provider}"
    return run


_PY = "Python"
MATRIX: tuple[Client, ...] = (
    Client("openai", _PY, "openai", "openai", openai_sdk, 1, "RateLimitError",
           base="/openai/v1"),
    Client("anthropic", _PY, "anthropic", "anthropic", anthropic_sdk, 1, "RateLimitError",
           base="/anthropic"),
    Client("google-genai", _PY, "gemini", "google-genai", google_genai, 1, "ClientError",
           base="/gemini"),
    Client("langchain-openai", _PY, "openai", "langchain-openai", langchain_openai, 1,
           "RateLimitError", base="/openai/v1"),
    Client("langchain-anthropic", _PY, "anthropic", "langchain-anthropic",
           langchain_anthropic, 1, "RateLimitError", base="/anthropic"),
    Client("langchain-google-genai", _PY, "gemini", "langchain-google-genai",
           langchain_google, 6, "GoogleRateLimitError", base="/gemini"),
    Client("pydantic-ai (openai)", _PY, "openai", "pydantic-ai-slim", pydantic_ai_openai, 1,
           "ModelRateLimitError", base="/openai/v1"),
    Client("pydantic-ai (anthropic)", _PY, "anthropic", "pydantic-ai-slim",
           pydantic_ai_anthropic, 1, "ModelRateLimitError", base="/anthropic"),
    Client("pydantic-ai (google)", _PY, "gemini", "pydantic-ai-slim", pydantic_ai_google, 1,
           "ModelRateLimitError", base="/gemini"),
    Client("litellm (openai)", _PY, "openai", "litellm", _on("openai", _litellm), 1,
           "RateLimitError", base=LITELLM_BASE["openai"]),
    Client("litellm (anthropic)", _PY, "anthropic", "litellm", _on("anthropic", _litellm), 1,
           "RateLimitError", base=LITELLM_BASE["anthropic"]),
    Client("litellm (gemini)", _PY, "gemini", "litellm", _on("gemini", _litellm), 1,
           "RateLimitError", base=LITELLM_BASE["gemini"]),
    Client("instructor", _PY, "openai", "instructor", instructor_openai, 1,
           "InstructorRetryException", usage_streamed=False, base="/openai/v1"),
    Client("llm CLI", _PY, "openai", "llm", llm_cli, 1, "exit 1", base="/openai/v1"),
    Client("curl (openai)", "shell", "openai", "", _on("openai", _curl), 1, "exit 22",
           base=_CURL["openai"][0]),
    Client("curl (anthropic)", "shell", "anthropic", "", _on("anthropic", _curl), 1,
           "exit 22", base=_CURL["anthropic"][0]),
    Client("curl (gemini)", "shell", "gemini", "", _on("gemini", _curl), 1, "exit 22",
           base=_CURL["gemini"][0].split("{")[0]),
    Client("openai (Node)", "Node", "openai", "openai", _node("openai"), 1, "RateLimitError",
           base="/openai/v1"),
    Client("@anthropic-ai/sdk", "Node", "anthropic", "@anthropic-ai/sdk", _node("anthropic"), 1,
           "RateLimitError", base="/anthropic"),
    Client("@google/genai", "Node", "gemini", "@google/genai", _node("google-genai"), 1,
           "ApiError", base="/gemini"),
    Client("ai + @ai-sdk/openai", "Node", "openai", "@ai-sdk/openai", _node("ai-sdk-openai"), 3,
           "RetryError", base="/openai/v1"),
    Client("ai + @ai-sdk/anthropic", "Node", "anthropic", "@ai-sdk/anthropic",
           _node("ai-sdk-anthropic"), 3, "RetryError", base="/anthropic/v1"),
    Client("ai + @ai-sdk/google", "Node", "gemini", "@ai-sdk/google", _node("ai-sdk-google"), 3,
           "RetryError", base="/gemini/v1beta"),
)
RAW = {c.name: c.run for c in MATRIX}  # the driver functions, for reading their set-up
# Each client in this process at the installed (pinned) version, whatever LATEST says.
PINNED = {c.name: _catching(c.run) for c in MATRIX}
MATRIX = tuple(dataclasses.replace(c, run=_in_latest(c.name) if LATEST and c.language == _PY
                                   else PINNED[c.name]) for c in MATRIX)


def _main(name: str, request: str) -> None:
    """One Python client's call, in this interpreter (the newest-clients venv): its answer
    or its failure as one JSON line."""
    try:
        answer = PINNED[name](Request(**json.loads(request)))
    except ClientFailed as exc:
        print(json.dumps({"error": {"name": exc.name, "status": exc.status,
                                    "message": str(exc)}}))
        return
    print(json.dumps(dataclasses.asdict(answer)))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
