"""The dashboard in a real headless Chromium: it renders, shows the seeded data, no script."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai

from tests.conftest import VIRTUAL_KEY
from tests.services import chromium
from tests.test_admin import ADMIN_KEY, NASTY, seeded_stack

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@contextlib.contextmanager
def login_page_for(proxy_url: str) -> Iterator[str]:
    """A page on another loopback port (the same site) whose form POSTs the admin key to
    the proxy's login, as a person would: the browser then holds a session cookie."""
    page = (f'<form method="post" action="{proxy_url}/_meter/login">'
            f'<input name="key" value="{ADMIN_KEY}"></form>'
            "<script>document.forms[0].submit()</script>").encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def headless(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="meterproxy-chromium-") as profile:
        return subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args, url],
            capture_output=True, text=True, timeout=90)


def test_dashboard_renders_in_chromium(tmp_path: Path) -> None:
    """Chromium logs in through the form's POST, follows the redirect, and shows the seeded
    customers and budgets; the screenshot is kept in test-artifacts/dashboard.png."""
    stack = seeded_stack(tmp_path / "stack")
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        for customer in ("acme", NASTY):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}],
                extra_headers={"X-Meter-Customer": customer, "X-Meter-Feature": "search"})
        stack.rows(3002)
        with login_page_for(stack.url) as url:
            dom = headless(url, "--dump-dom", "--virtual-time-budget=5000")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        for text in ("meterproxy", "Spend per day", "acme", "globex", "acme-monthly",
                     "feature=search", "Month forecast", "Unit economics", "gemini-2.5-flash"):
            assert text in html, text
        assert "<svg" in html and "<rect" in html  # the chart drew bars
        assert "<script" not in html  # the customer named <script> stayed text
        assert "name=\"key\"" not in html  # the cookie worked: no login form
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        with login_page_for(stack.url) as url:
            result = headless(url, f"--screenshot={shot}", "--window-size=1280,1800",
                              "--virtual-time-budget=5000")
        assert result.returncode == 0, result.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 50_000  # a page with content, not a blank one
    finally:
        stack.close()
