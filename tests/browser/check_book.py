"""Open every page of the built book in headless Chromium and fail on anything broken.

    python tests/browser/check_book.py [_build/html]

Serves the build on 127.0.0.1 (a free port) with http.server and drives Debian's
``chromium`` through ``/usr/bin/chromedriver`` with selenium, offline. A page fails on

* a SEVERE console message (JavaScript errors, resources that failed to load),
* a request that fails or answers with status >= 400,
* an image that did not load (``naturalWidth == 0``),
* TeX left as text outside code (``$$``, ``\\[``, ``\\(``, ``\\begin{``, ``\\frac``, ``$W_0$``, ...),
  or a MathJax error box (``mjx-merror``),
* math (a ``.math`` element) without MathJax's SVG output inside it (``mjx-container > svg``);
  MathJax typesets asynchronously, so the check awaits ``MathJax.startup.promise``,
* display math wider than the text that is clipped instead of scrolling.

Prints one line per page and a total; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900"]

# Runs in the page once it has loaded: make lazy images load, wait for images and for
# MathJax's first typeset, then report what the page shows.
INSPECT = r"""
const done = arguments[arguments.length - 1];
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  for (let i = 0; i < 100 && !(document.readyState === "complete" && document.body); i++) await sleep(100);
  const images = [...document.images];
  for (const img of images) if (img.loading === "lazy") img.loading = "eager";
  await Promise.all(images.map(img => img.complete ? null :
    new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); })));
  const mathNodes = [...document.querySelectorAll(".math")];
  let mathjax = "absent";
  if (mathNodes.length) {
    // the config object exists before MathJax's script runs; wait for startup (up to 10 s)
    for (let i = 0; i < 100 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++) await sleep(100);
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      try { await MathJax.startup.promise; mathjax = MathJax.version; } catch (e) { mathjax = "failed: " + e; }
    } else mathjax = "never started";
  }
  const unrendered = mathNodes.filter(n => !n.querySelector("mjx-container > svg"));
  // display math wider than the text must scroll, not be clipped: walk up from each equation's
  // SVG to the page; a scrolling box makes it reachable (then that box must fit), a box that
  // hides its overflow must contain it
  const clipped = [...document.querySelectorAll("div.math mjx-container > svg")].filter(svg => {
    let target = svg;
    for (let n = svg.parentElement; n && n !== document.body; n = n.parentElement) {
      const overflow = getComputedStyle(n).overflowX, a = target.getBoundingClientRect(), b = n.getBoundingClientRect();
      if (["auto", "scroll"].includes(overflow)) target = n;
      else if (["hidden", "clip"].includes(overflow) && (a.left < b.left - 1 || a.right > b.right + 1)) return true;
    }
    return false;
  }).map(svg => svg.closest("div.math"));
  const text = document.body.cloneNode(true);
  text.querySelectorAll("pre, code, script, style, textarea, mjx-container, .highlight").forEach(n => n.remove());
  done({
    images: images.length,
    brokenImages: images.filter(img => img.naturalWidth === 0).map(img => img.currentSrc || img.src),
    math: mathNodes.length,
    unrenderedMath: unrendered.map(n => n.textContent.trim().slice(0, 80)),
    clippedMath: clipped.map(n => n.textContent.trim().slice(0, 60)),
    svgMath: document.querySelectorAll("mjx-container[jax='SVG'] > svg").length,
    mathErrors: [...document.querySelectorAll("mjx-merror")].map(n => n.getAttribute("data-mjx-error") || n.textContent),
    mathjax: mathjax,
    text: text.textContent,
  });
})().catch(error => done({crashed: String(error && error.stack || error), url: location.href,
                           readyState: document.readyState}));
"""

# TeX that MathJax should have turned into SVG; code and MathJax's own output are removed first.
TEX_LEFT = ["$$", "\\[", "\\]", "\\(", "\\)", "\\begin{", "\\end{"]
TEX_COMMANDS = ["\\frac", "\\sum", "\\mathrm", "\\mathbf", "\\operatorname", "\\Delta", "\\Lambda",
                "\\sigma", "\\odot", "\\cdot", "\\times", "\\ll", "\\min", "\\sqrt", "\\top", "\\left"]


DOLLAR_TEX = re.compile(r"\$[^$\s][^$\n]{0,80}?[\^_\\{][^$\n]{0,80}?\$")  # $W_0$ left as text
REFRESH = re.compile(r"""<meta[^>]+http-equiv=["']?refresh["']?[^>]+url=([^"'>\s]+)""", re.IGNORECASE)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(root: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_browser(profile: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})  # count every byte per page
    driver.get("about:blank")
    driver.get_log("browser"), driver.get_log("performance")  # drop what the browser did on its own at start
    return driver


def network(driver: webdriver.Chrome) -> tuple[list[str], dict[str, int]]:
    """Failed requests and bytes per URL, from the performance log since the last call."""
    urls, failures, sizes = {}, [], {}
    web = lambda url: url.startswith(("http://", "https://"))  # noqa: E731 (not data:, chrome:, blob:)
    # Chromium asks for /favicon.ico on its own; the book declares no icon, so that 404 is not the book's
    browser_own = lambda url: url.endswith("/favicon.ico")  # noqa: E731
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message["method"], message.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.responseReceived":
            response = params["response"]
            urls[params["requestId"]] = response["url"]
            if response["status"] >= 400 and web(response["url"]) and not browser_own(response["url"]):
                failures.append(f"HTTP {response['status']} {response['url']}")
        elif method == "Network.loadingFailed":
            if browser_own(urls.get(params["requestId"], "")):
                continue
            failures.append(f"{params.get('errorText', 'failed')} {urls.get(params['requestId'], params['requestId'])}")
        elif method == "Network.loadingFinished":
            url = urls.get(params["requestId"], "")
            if web(url):
                sizes[url] = sizes.get(url, 0) + int(params.get("encodedDataLength", 0))
    return failures, sizes


def redirect_target(page: Path) -> str | None:
    """Where a page that only redirects (index.html: <meta http-equiv="Refresh">) points, else None."""
    match = REFRESH.search(page.read_text(encoding="utf-8", errors="replace")[:2000])
    return match.group(1) if match else None


def check_redirect(url: str, target: str) -> tuple[list[str], str]:
    """A redirect page is not opened (the browser would leave it mid-check); its target must exist."""
    try:
        with urllib.request.urlopen(urllib.parse.urljoin(url, target), timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return ([] if status < 400 else [f"redirect target {target} answers HTTP {status}"]), f"redirects to {target}"


def check_page(driver: webdriver.Chrome, url: str) -> tuple[list[str], str]:
    driver.get(url)
    report = driver.execute_async_script(INSPECT)
    if "crashed" in report:
        raise RuntimeError(f"the page check threw on {report['url']} ({report['readyState']}): {report['crashed']}")
    problems = [f"console {entry['level']}: {entry['message'][:300]}" for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "/favicon.ico - " not in entry["message"]]
    failures, sizes = network(driver)
    problems += [f"request: {failure}" for failure in failures]
    problems += [f"image not loaded: {src}" for src in report["brokenImages"]]
    problems += [f"math not rendered as SVG: {tex!r}" for tex in report["unrenderedMath"]]
    problems += [f"MathJax error: {error}" for error in report["mathErrors"]]
    problems += [f"display math cut off: {tex!r}" for tex in report["clippedMath"]]
    if report["math"] and report["mathjax"][:1] not in "0123456789":
        problems.append(f"MathJax {report['mathjax']}")
    text = report["text"]
    for token in TEX_LEFT + TEX_COMMANDS:
        if (at := text.find(token)) >= 0:
            problems.append(f"unrendered TeX {token!r}: ...{' '.join(text[max(0, at - 40):at + 40].split())}...")
    if match := DOLLAR_TEX.search(text):
        problems.append(f"unrendered TeX: {match.group(0)!r}")
    mathjax_bytes = sum(n for u, n in sizes.items() if "/mathjax/" in u.lower())
    mathjax_files = sum(1 for u in sizes if "/mathjax/" in u.lower())
    summary = (f"{report['math']:3d} math ({report['svgMath']} SVG), {report['images']:2d} images, "
               f"{len(sizes):3d} requests {sum(sizes.values()) / 1e6:5.2f} MB "
               f"(MathJax: {mathjax_files} files {mathjax_bytes / 1e6:.2f} MB)")
    return problems, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", nargs="?", default="_build/html", type=Path)
    args = parser.parse_args()
    root = args.build.resolve()
    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html")
                   if not p.relative_to(root).parts[0].startswith("_"))
    if not pages:
        print(f"no pages under {root}: build the book first (make book)")
        return 1
    server = serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    profile = tempfile.mkdtemp(prefix="check-book-")
    driver = start_browser(profile)
    failed, start = 0, time.time()
    try:
        for page in pages:
            t0 = time.time()
            target = redirect_target(root / page)
            for attempt in (1, 2):  # a check that hangs or crashes is tried once more, then fails the page
                try:
                    if target:
                        problems, summary = check_redirect(base + page, target)
                    else:
                        problems, summary = check_page(driver, base + page)
                    break
                except Exception as error:
                    problems, summary = [f"check crashed: {type(error).__name__}: {str(error).splitlines()[0]}"], ""
                    print(f"       attempt {attempt}: {problems[0]}")
                    driver.get("about:blank")
                    driver.get_log("browser"), driver.get_log("performance")
            status = "FAIL" if problems else "ok"
            print(f"{status:4s} {page:28s} {summary} {time.time() - t0:4.1f} s")
            for problem in problems[:20]:
                print(f"       {problem}")
            if len(problems) > 20:
                print(f"       ... and {len(problems) - 20} more")
            failed += bool(problems)
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"{len(pages) - failed} of {len(pages)} pages ok, {failed} failed ({time.time() - start:.0f} s, Chromium, {base})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
