"""The dashboard in a real headless Chromium: it renders, shows the seeded data, no script."""

from __future__ import annotations

import contextlib
import html
import json
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from proxy.storage import open_usage_log
from proxy.storage.row import UsageRow
from tests.conftest import VIRTUAL_KEY, Stack, http
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
    with page_server(page) as url:
        yield url


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


@contextlib.contextmanager
def page_server(page: bytes) -> Iterator[str]:
    """One page on a loopback port (no CSP: the measuring script may run there)."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# Appended to a copy of the dashboard: where Chromium laid out the chart and its y labels.
MEASURE = b"""<script>
const svg = document.querySelector('svg.chart');
const box = r => { const b = r.getBoundingClientRect();
                   return {left: b.left, right: b.right, top: b.top, bottom: b.bottom}; };
const out = {svg: box(svg), axis: box(svg.querySelector('line.axis')),
             labels: [...svg.querySelectorAll('text.ylabel')].map(
                 t => ({text: t.textContent, ...box(t)}))};
const pre = document.createElement('pre');
pre.id = 'measured';
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


@pytest.mark.parametrize("daily_usd", [Decimal("0.00353055"), Decimal("12345.678901")])
def test_chart_axis_labels_fit_and_share_one_precision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, daily_usd: Decimal) -> None:
    """The y-axis labels of the spend chart, as Chromium lays them out at two window
    widths, lie inside the SVG and left of the axis, and all show USD to 6 places (the
    money rule), for sub-cent and for five-figure days. Before: `$0.00000` next to
    `$0.001250`, and long labels cut off at the SVG's left edge."""
    monkeypatch.setenv("METERPROXY_TEST_CHART_ADMIN", ADMIN_KEY)
    now = datetime.now(UTC)
    log = open_usage_log(f"sqlite:///{tmp_path / 'usage.db'}", spool_dir=str(tmp_path / "spool"))
    log.open()
    log.write([UsageRow(
        id=f"chart-{n}", ts=(now - timedelta(days=n, minutes=1)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"), duration_ms=100.0, key_name="team-a",
        provider="openai", endpoint="chat.completions", status=200, model="gpt-4o-mini",
        input_tokens=1, output_tokens=1, cost_usd=float(daily_usd * (1 + n % 3)),
        pricing_version="v1", usage_source="provider") for n in range(10)])
    log.close()
    stack = Stack(tmp_path, {"server": {"admin_key_env": "METERPROXY_TEST_CHART_ADMIN"}})
    try:
        reply = http("GET", f"{stack.url}/_meter/?since=30d", None,
                     {"Authorization": f"Bearer {ADMIN_KEY}"})
        assert reply.status_code == 200, reply.content
        page = reply.content.replace(b"</body>", MEASURE + b"</body>")
        for width in (1280, 760):
            with page_server(page) as url:
                dom = headless(url, "--dump-dom", f"--window-size={width},1600",
                               "--virtual-time-budget=3000")
            assert dom.returncode == 0, dom.stderr[-2000:]
            found = re.search(r'<pre id="measured">(.*?)</pre>', dom.stdout, re.S)
            assert found, dom.stdout[-2000:]
            measured = json.loads(html.unescape(found.group(1)))
            svg, axis, labels = measured["svg"], measured["axis"], measured["labels"]
            assert len(labels) == 5
            for label in labels:
                assert re.fullmatch(r"\$[0-9,]+\.[0-9]{6}", label["text"]), label
                assert svg["left"] <= label["left"] and label["right"] <= axis["left"], \
                    (width, label, svg, axis)
                assert svg["top"] <= label["top"] and label["bottom"] <= svg["bottom"]
            assert labels[0]["text"] == "$0.000000"
    finally:
        stack.close()
