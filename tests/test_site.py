"""The course website: built once per session from the stored notebooks, then checked page by
page in a real headless Chromium (the system's, /usr/bin/chromium).

Every page must load with no console error, request nothing outside localhost, show its math
rendered by the shipped MathJax, load every image, link only to files and anchors that exist,
keep its solutions collapsed until their toggle is clicked, and pass an axe-core scan with no
serious or critical violation. Each check is proven able to fail by planting its defect in a
copy of the site.
"""

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LESSONS = sorted(ROOT.glob("lessons/[0-9][0-9]_*.ipynb"))
MATH_OUTPUT = ".MathJax, .MathJax_Display, .MathJax_CHTML, .MathJax_SVG, mjx-container, .katex"
# axe-core takes 10-60 s a page on a 2-core machine, so it scans one page of each kind: the home
# page, a Markdown page with the largest table, the coverage table when it exists, and a lesson
# with figures, math and solutions (every lesson page comes from the same template and renderer).
AXE_PAGES = {"index.html", "errata.html", "docs/coverage.html", "lessons/02_svd_low_rank.html"}
RAW_MATH = r"\$\$|\\\(|\\\)|\\\[|\\\]|\$[^$\s][^$]*[\\^_{][^$]*\$"


def solution_cells(lesson: Path) -> int:
    """Solution regions in a lesson, counted from its notebook."""
    notebook = nbformat.read(lesson, as_version=4)
    return sum(line.strip() == "### BEGIN SOLUTION" for cell in notebook.cells
               if cell.cell_type == "code" for line in cell.source.splitlines())


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "_site"
    result = subprocess.run([sys.executable, "-m", "pedaPEFT", "site", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def site_pages(site_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(site_dir)) for path in site_dir.rglob("*.html")
                  if "_static" not in path.relative_to(site_dir).parts)


# ---------------------------------------------------------------------------------------------
# Without a browser: what the build wrote


def test_site_has_every_page(site_dir):
    pages = set(site_pages(site_dir))
    expected = {"index.html", "errata.html", "instructor.html", "api.html"}
    expected |= {f"lessons/{lesson.stem}.html" for lesson in LESSONS}
    if (ROOT / "docs" / "coverage.md").exists():
        expected.add("docs/coverage.html")
    assert expected <= pages, expected - pages


def test_home_page_maps_every_lesson_with_its_runtime(site_dir):
    home = (site_dir / "index.html").read_text()
    for lesson in LESSONS:
        row = re.search(rf'<tr[^>]*>\s*<td[^>]*><p>{int(lesson.name[:2])}</p></td>.*?</tr>',
                        home, re.S)
        assert row, lesson.name
        assert f'href="lessons/{lesson.stem}.html"' in row.group(0)
        assert re.search(r"<td[^>]*><p>\d+ s</p></td>\s*</tr>", row.group(0)), row.group(0)


def test_lesson_pages_link_student_notebooks_colab_and_binder(site_dir):
    import pedaPEFT

    slug = pedaPEFT.REPOSITORY_URL.removeprefix("https://github.com/")
    for lesson in LESSONS:
        html = (site_dir / "lessons" / f"{lesson.stem}.html").read_text()
        student_path = f"lessons/student/{lesson.name}"
        assert (ROOT / student_path).is_file()
        downloads = re.findall(r'class="reference download internal" download="" href="([^"]+)"',
                               html)
        student_downloads = [d for d in downloads if d.endswith(f"/{lesson.name}")]
        assert len(student_downloads) == 1, downloads
        served = (site_dir / "lessons" / student_downloads[0]).resolve()
        assert served.read_bytes() == (ROOT / student_path).read_bytes()
        assert (f"https://colab.research.google.com/github/{slug}/blob/main/{student_path}"
                in html)
        assert f"https://mybinder.org/v2/gh/{slug}/main?labpath={student_path}" in html


def test_every_solution_region_is_a_collapsed_cell(site_dir):
    for lesson in LESSONS:
        html = (site_dir / "lessons" / f"{lesson.stem}.html").read_text()
        collapsed = re.findall(r'<div class="cell tag_hide-input tag_solution[^"]*">\s*<details',
                               html)
        assert len(collapsed) == solution_cells(lesson) > 0, lesson.name


def test_no_page_or_stylesheet_points_outside_the_site(site_dir):
    """Static half of the offline check: no script, stylesheet, image, font or import from
    another host (the browser test catches what is requested at run time)."""
    remote = re.compile(r'(?:<script[^>]+src|<link[^>]+href|<img[^>]+src)="(?:https?:)?//'
                        r'|url\(\s*["\']?(?:https?:)?//|@import\s+["\']?(?:https?:)?//')
    offenders = [str(path.relative_to(site_dir)) for path in site_dir.rglob("*")
                 if path.suffix in (".html", ".css") and remote.search(path.read_text())]
    assert offenders == []
    assert (site_dir / "_static" / "mathjax" / "MathJax.js").is_file()


def test_site_refuses_to_overwrite_a_folder_that_is_not_a_site(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "pedaPEFT", "site", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "out=" in result.stderr and "not an earlier build" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_launch_links_must_point_at_files_of_the_repository():
    from pedaPEFT import site

    site.check_launch_targets(["lessons/student/01_matrix_rank.ipynb"], ROOT)
    with pytest.raises(site.SiteError, match="lessons/student/99_missing.ipynb"):
        site.check_launch_targets(["lessons/student/99_missing.ipynb"], ROOT)
    with pytest.raises(site.SiteError, match="REPOSITORY_URL"):
        site.github_slug("https://example.org/course")


def test_links_from_repository_markdown_point_at_the_site_or_the_repository():
    import pedaPEFT
    from pedaPEFT import site

    text = ("[a](lessons/01_matrix_rank.ipynb) [b](CONTRIBUTING.md) [c](benchmarks/README.md#x) "
            "[d](https://example.org) [e](no_such_file.md)")
    rewritten = site.rewrite_links(text, "", {"lessons/01_matrix_rank.ipynb"}, ROOT)
    assert rewritten == (
        "[a](lessons/01_matrix_rank.ipynb) [b](instructor.md) "
        f"[c]({pedaPEFT.REPOSITORY_URL}/blob/main/benchmarks/README.md#x) "
        "[d](https://example.org) [e](no_such_file.md)"
    )


def test_docstrings_read_as_written():
    from pedaPEFT import site

    lines = ["The block:", "", "    x = x + f(x)", "    y = |x|", "", "Pass if |a - b| <= tol, "
             "``a | b`` kept."]
    assert site.plain_docstring_lines(lines) == [
        "The block::", "", "    x = x + f(x)", "    y = |x|", "",
        "Pass if \\|a - b\\| <= tol, ``a | b`` kept."]


# ---------------------------------------------------------------------------------------------
# In the browser


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (CI installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Server:
    """A static file server on localhost for one folder, in a background thread."""

    def __init__(self, folder: Path):
        handler = functools.partial(QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.folder = folder
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def server(site_dir):
    server = Server(site_dir)
    yield server
    server.close()


WAIT_FOR_MATHJAX = """() => new Promise(resolve => {
    const start = Date.now();
    (function poll() {
        if (window.MathJax && MathJax.isReady && MathJax.Hub) return MathJax.Hub.Queue(
            () => resolve("typeset"));
        if (Date.now() - start > 20000) return resolve("MathJax did not start");
        setTimeout(poll, 50);
    })();
})"""

FIND_RAW_MATH = """pattern => {
    const raw = [], re = new RegExp(pattern);
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
        const node = walker.currentNode;
        if (node.parentElement.closest("pre, code, script, style, textarea")) continue;
        if (re.test(node.textContent)) raw.push(node.textContent.trim().slice(0, 80));
    }
    const unrendered = [...document.querySelectorAll(".math.nohighlight")]
        .filter(el => !el.querySelector(arguments_selector))
        .map(el => el.textContent.trim().slice(0, 80));
    return raw.concat(unrendered);
}"""

IMAGE_WIDTHS = """() => Promise.all([...document.images].map(img => {
    img.loading = "eager";
    return img.decode().then(() => [img.getAttribute("src"), img.naturalWidth],
                             () => [img.getAttribute("src"), 0]);
}))"""


def anchors(path: Path, cache: dict) -> set[str]:
    if path not in cache:
        cache[path] = set(re.findall(r'\bid="([^"]+)"', path.read_text(errors="replace")))
    return cache[path]


def check_page(browser, server: Server, page_path: str, solutions: int = 0,
               accessibility: bool = True, anchor_cache: dict | None = None) -> list[str]:
    """Every problem the page shows in the browser, as 'kind: detail' strings."""
    problems = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})

    def route(route):
        url = route.request.url
        if url.startswith(server.base) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            problems.append(f"external request: {url}")
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda message: problems.append(f"console error: {message.text}")
            if message.type == "error" else None)
    page.on("response", lambda response: problems.append(
        f"missing file: {response.status} {response.url}") if response.status >= 400 else None)
    page.on("pageerror", lambda error: problems.append(f"console error: {error}"))
    try:
        page.goto(server.base + page_path, wait_until="load")
        if page.locator('script[src*="MathJax.js"]').count():
            state = page.evaluate(WAIT_FOR_MATHJAX)
            if state != "typeset":
                problems.append(f"unrendered math: {state}")
        raw = page.evaluate(FIND_RAW_MATH.replace("arguments_selector", repr(MATH_OUTPUT)),
                            RAW_MATH)
        problems += [f"unrendered math: {text!r}" for text in raw]
        for src, width in page.evaluate(IMAGE_WIDTHS):
            if width == 0:
                problems.append(f"broken image: {src}")
        problems += dead_links(page, server, page_path, anchor_cache or {})
        if accessibility:
            problems += accessibility_violations(page)
        problems += solution_problems(page, solutions)
    finally:
        context.close()
    return problems


def dead_links(page, server: Server, page_path: str, anchor_cache: dict) -> list[str]:
    problems = []
    for href in set(page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")):
        if not href.startswith(server.base):
            continue
        parts = urlsplit(href)
        target = server.folder / unquote(parts.path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"dead link: {href} on {page_path}")
        elif parts.fragment and target.suffix == ".html" and \
                unquote(parts.fragment) not in anchors(target, anchor_cache):
            problems.append(f"dead link: #{parts.fragment} on {page_path}")
    return problems


def accessibility_violations(page) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    violations = Axe().run(page, options={"preload": False}).response["violations"]
    return [f"accessibility: {v['id']} ({v['impact']}, {len(v['nodes'])} elements): {v['help']}"
            for v in violations if v["impact"] in ("serious", "critical")]


def solution_problems(page, expected: int) -> list[str]:
    cells = page.locator(".tag_solution")
    if cells.count() != expected:
        return [f"solutions: {cells.count()} collapsed solution cells, expected {expected}"]
    problems = []
    for index in range(expected):
        cell = cells.nth(index)
        code = cell.locator(".cell_input")
        if code.is_visible():
            problems.append(f"solutions: solution {index + 1} is visible before its toggle")
            continue
        cell.locator("summary").click()
        if not code.is_visible():
            problems.append(f"solutions: solution {index + 1} stays hidden after its toggle")
    return problems


def expected_solutions(page_path: str) -> int:
    lesson = ROOT / "lessons" / (Path(page_path).stem + ".ipynb")
    return solution_cells(lesson) if page_path.startswith("lessons/") else 0


def test_every_page_passes_the_browser_checks(browser, server, site_dir):
    pages = site_pages(site_dir)
    assert len(pages) >= len(LESSONS) + 4
    cache, problems = {}, []
    for page_path in pages:
        problems += [f"{page_path}: {problem}" for problem in
                     check_page(browser, server, page_path, expected_solutions(page_path),
                                accessibility=page_path in AXE_PAGES, anchor_cache=cache)]
    assert problems == []


def test_screenshots_of_home_and_two_lessons(browser, server, tmp_path):
    import matplotlib.image

    pages = {"home": "index.html", "svd": "lessons/02_svd_low_rank.html",
             "nf4": "lessons/07_nf4.html"}
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    for name, page_path in pages.items():
        page.goto(server.base + page_path, wait_until="load")
        if page.locator('script[src*="MathJax.js"]').count():
            assert page.evaluate(WAIT_FOR_MATHJAX) == "typeset"
        if name == "nf4":  # its first figure, with the math around it
            page.locator(".cell_output img").first.scroll_into_view_if_needed()
        shot = tmp_path / f"{name}.png"
        page.screenshot(path=str(shot))
        pixels = matplotlib.image.imread(shot)
        assert shot.stat().st_size > 20_000, name
        assert pixels.shape[:2] == (1000, 1280)
        assert pixels[..., :3].std() > 0.05, f"{name} is blank"
    context.close()


# ---------------------------------------------------------------------------------------------
# The checks can fail: each defect planted in a copy of the site


def plant(html: str, defect: str) -> str:
    if defect == "console error":
        return html.replace("</body>", '<script>console.error("planted")</script></body>')
    if defect == "external request":
        return html.replace("</head>",
                            '<link rel="stylesheet" href="https://cdn.example.org/x.css"></head>')
    if defect == "unrendered math":  # the math renderer could not be loaded
        return re.sub(r'<script[^>]*MathJax\.js[^>]*></script>', "", html)
    if defect == "broken image":
        return re.sub(r'(<img[^>]+src=")[^"]+', r"\1../_images/missing.png", html, count=1)
    if defect == "dead link":
        return html.replace("</body>", '<a href="no_such_page.html">dead</a></body>')
    if defect == "solutions":  # a solution shown open
        return html.replace('<details class="admonition hide above-input">',
                            '<details class="admonition hide above-input" open>', 1)
    raise ValueError(defect)


@pytest.mark.parametrize("defect", ["console error", "external request", "unrendered math",
                                    "broken image", "dead link", "solutions"])
def test_checks_catch_a_planted_defect(defect, browser, site_dir, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(site_dir, copy)
    page_path = "lessons/02_svd_low_rank.html"  # has math, figures and solutions
    html = (copy / page_path).read_text()
    planted = plant(html, defect)
    assert planted != html, f"could not plant {defect}"
    (copy / page_path).write_text(planted)
    server = Server(copy)
    try:
        problems = check_page(browser, server, page_path, expected_solutions(page_path),
                              accessibility=False)
    finally:
        server.close()
    assert any(problem.startswith(defect) for problem in problems), problems
