"""The course as a static website, built from the stored, nbval-verified notebooks.

:func:`build` writes a Sphinx source tree into a temporary folder, generated from the
repository (README sections, the lesson notebooks with their stored outputs, the student copies,
the errata, the lecture coverage table when ``docs/coverage.md`` exists, an instructor page and
an API reference read from the package's docstrings), renders it with MyST-NB without executing
anything, and moves the finished HTML into place. Everything the pages load (theme, scripts,
fonts, the MathJax renderer) is copied into the output folder, so the site works offline and
from any static host.

On each lesson page the solution cells (those holding a ``### BEGIN SOLUTION`` region) are
collapsed behind a "Show solution" toggle, and a box links to the student notebook (download,
Colab, Binder). The Colab and Binder links are built from :data:`pedaPEFT.REPOSITORY_URL`;
the build fails if a path they point at is not part of the repository.
"""

import os
import pkgutil
import re
import shutil
import subprocess
import tempfile
from io import StringIO
from pathlib import Path

import nbformat

import pedaPEFT
from pedaPEFT import notebooks

REPO_DIR = Path(__file__).resolve().parent.parent
REPOSITORY_BRANCH = "main"
SOLUTION_TAG = "solution"
COVERAGE_PATH = "docs/coverage.md"
# Pages generated from repository files: repo path -> page in the site (links are rewritten).
PAGE_FOR_FILE = {"README.md": "index.md", "CONTRIBUTING.md": "instructor.md"}


class SiteError(RuntimeError):
    """The site cannot be built: a missing source, a dead launch link or a Sphinx warning."""


# ---------------------------------------------------------------------------------------------
# Markdown taken from the repository


def markdown_sections(text: str) -> dict[str, str]:
    """Split a Markdown document at its level-2 headings: ``{heading: body}``.

    The text before the first ``## `` heading is stored under ``""``. Headings inside fenced
    code blocks are not headings.
    """
    sections, name, lines, in_fence = {}, "", [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            sections[name] = "\n".join(lines).strip() + "\n"
            name, lines = line[3:].strip(), []
        else:
            lines.append(line)
    sections[name] = "\n".join(lines).strip() + "\n"
    return sections


def find_section(sections: dict[str, str], word: str) -> tuple[str, str] | None:
    """The first section whose heading contains ``word`` (case-insensitive), or ``None``."""
    for heading, body in sections.items():
        if heading and word.lower() in heading.lower():
            return heading, body
    return None


def demote_headings(text: str, levels: int = 1) -> str:
    """Add ``levels`` to every Markdown heading outside fenced code blocks."""
    out, in_fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and re.match(r"#{1,5} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out) + "\n"


LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def rewrite_links(text: str, page_dir: str, site_pages: set[str], repo_dir: Path) -> str:
    """Point the relative links of a Markdown text taken from ``page_dir`` (a folder of the
    repository) at what the site holds.

    A link to a file that the site renders as a page is kept (a README or CONTRIBUTING link
    goes to the page generated from it); a link to any other file of the repository goes to
    that file on the repository's site. A link to a missing file is kept, so the build reports
    it.
    """

    def replace(match: re.Match) -> str:
        bang, label, target = match.groups()
        if re.match(r"[a-z][a-z0-9+.-]*:|#|/", target):
            return match.group(0)
        path, _, fragment = target.partition("#")
        repo_path = os.path.normpath(os.path.join(page_dir, path))
        if repo_path in PAGE_FOR_FILE:
            page = PAGE_FOR_FILE[repo_path]
            return f"{bang}[{label}]({os.path.relpath(page, page_dir or '.')})"
        if repo_path in site_pages or not (repo_dir / repo_path).exists():
            return match.group(0)
        kind = "tree" if (repo_dir / repo_path).is_dir() else "blob"
        url = f"{pedaPEFT.REPOSITORY_URL}/{kind}/{REPOSITORY_BRANCH}/{repo_path}"
        return f"{bang}[{label}]({url}{'#' + fragment if fragment else ''})"

    return LINK.sub(replace, text)


# ---------------------------------------------------------------------------------------------
# Lessons


def github_slug(url: str = pedaPEFT.REPOSITORY_URL) -> str:
    """``owner/name`` of a GitHub repository URL (Colab and Binder open GitHub repositories)."""
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", url)
    if not match:
        raise SiteError(
            f"pedaPEFT.REPOSITORY_URL must be https://github.com/OWNER/NAME for the Colab and "
            f"Binder links, got {url!r}"
        )
    return match.group(1)


def launch_links(student_path: str) -> dict[str, str]:
    """Colab and Binder addresses of a notebook, ``student_path`` relative to the repository."""
    slug = github_slug()
    return {
        "Colab": f"https://colab.research.google.com/github/{slug}/blob/{REPOSITORY_BRANCH}/"
                 f"{student_path}",
        "Binder": f"https://mybinder.org/v2/gh/{slug}/{REPOSITORY_BRANCH}?labpath={student_path}",
    }


def tracked_files(repo_dir: Path) -> set[str] | None:
    """Paths git tracks in ``repo_dir``, or ``None`` outside a git checkout."""
    if not (repo_dir / ".git").exists():
        return None
    listing = subprocess.run(["git", "-C", str(repo_dir), "ls-files", "-z"], capture_output=True,
                             text=True, check=False)
    if listing.returncode != 0:
        return None
    return set(filter(None, listing.stdout.split("\0")))


def check_launch_targets(paths: list[str], repo_dir: Path) -> None:
    """Fail unless every path a Colab or Binder link opens is a file of the repository
    (tracked by git when ``repo_dir`` is a checkout, present on disk otherwise)."""
    tracked = tracked_files(repo_dir)
    missing = [path for path in paths if not (repo_dir / path).is_file()
               or (tracked is not None and path not in tracked)]
    if missing:
        raise SiteError("Colab/Binder links point at files the repository does not hold: "
                        + ", ".join(missing))


def is_solution_cell(cell: nbformat.NotebookNode) -> bool:
    """A code cell holding at least one ``### BEGIN SOLUTION`` region."""
    return cell.cell_type == "code" and bool(notebooks.solution_regions(cell.source))


def split_solution_cell(cell: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """A solution cell as consecutive cells: the code around the solutions stays visible, each
    ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region becomes a cell tagged ``solution``
    (collapsed by MyST-NB's ``hide-input``); the outputs go with the last piece."""
    lines = cell.source.splitlines()
    pieces, start = [], 0
    for begin, end in notebooks.solution_regions(cell.source):
        pieces += [(lines[start:begin], False), (lines[begin:end + 1], True)]
        start = end + 1
    pieces.append((lines[start:], False))
    pieces = [(piece, hidden) for piece, hidden in pieces if "\n".join(piece).strip()]
    cells = []
    for piece, hidden in pieces:
        part = nbformat.v4.new_code_cell("\n".join(piece))
        if hidden:
            part.metadata["tags"] = ["hide-input", SOLUTION_TAG]
            part.metadata["mystnb"] = {"code_prompt_show": "Show solution",
                                       "code_prompt_hide": "Hide solution"}
        cells.append(part)
    cells[-1].outputs, cells[-1].execution_count = cell.outputs, cell.execution_count
    return cells


def lesson_page(notebook: nbformat.NotebookNode, lesson: Path,
                student: Path) -> nbformat.NotebookNode:
    """The notebook as the site shows it: solutions collapsed (:func:`split_solution_cell`),
    and a box under the title linking to the student notebook (download, Colab, Binder) and to
    the lesson itself."""
    notebook.cells = [piece for cell in notebook.cells for piece in
                      (split_solution_cell(cell) if is_solution_cell(cell) else [cell])]
    first = notebook.cells[0]
    if first.cell_type != "markdown" or not first.source.startswith("# "):
        raise SiteError(f"{lesson.name}: the first cell must be markdown starting with its title")
    title, _, intro = first.source.partition("\n")
    links = launch_links(f"lessons/{notebooks.STUDENT_DIR_NAME}/{student.name}")
    box = (
        "```{admonition} Work through this lesson\n:class: tip\n"
        f"The exercises are at the end. Student notebook, solutions removed: "
        f"{{download}}`download <{notebooks.STUDENT_DIR_NAME}/{student.name}>` · "
        f"[open in Colab]({links['Colab']}) · [launch on Binder]({links['Binder']}).  \n"
        f"This lesson with its solutions and outputs: "
        f"{{download}}`download <{lesson.stem}_with_solutions.ipynb>`.\n"
        "```\n"
    )
    cells = [nbformat.v4.new_markdown_cell(title), nbformat.v4.new_markdown_cell(box)]
    if intro.strip():
        cells.append(nbformat.v4.new_markdown_cell(intro.strip()))
    notebook.cells = cells + notebook.cells[1:]
    return notebook


# ---------------------------------------------------------------------------------------------
# The source tree


def api_page() -> str:
    """One section per module of the package, documented by autodoc from its docstrings."""
    modules = sorted(info.name for info in pkgutil.iter_modules(pedaPEFT.__path__)
                     if not info.name.startswith("_"))
    parts = ["# API reference\n",
             "Generated from the docstrings of the `pedaPEFT` package, one section per module.\n"]
    for name in modules:
        parts.append(f"## `pedaPEFT.{name}`\n\n```{{eval-rst}}\n.. automodule:: pedaPEFT.{name}\n"
                     "   :members:\n   :no-index:\n```\n")
    return "\n".join(parts)


def write_sources(source: Path, repo_dir: Path = REPO_DIR) -> list[str]:
    """Write the Sphinx source tree of the site into ``source``; return its page names."""
    readme = markdown_sections((repo_dir / "README.md").read_text(encoding="utf-8"))
    lessons_dir = repo_dir / "lessons"
    lesson_files = sorted(lessons_dir.glob("[0-9][0-9]_*.ipynb"))
    if not lesson_files:
        raise SiteError(f"no lesson notebooks in {lessons_dir}")
    site_pages = {f"lessons/{path.name}" for path in lesson_files}
    coverage = repo_dir / COVERAGE_PATH
    if coverage.exists():
        site_pages.add(COVERAGE_PATH)

    def from_repo(text: str, page_dir: str = "") -> str:
        return rewrite_links(text, page_dir, site_pages, repo_dir)

    (source / "lessons" / notebooks.STUDENT_DIR_NAME).mkdir(parents=True)
    student_paths = []
    for lesson in lesson_files:
        student = lessons_dir / notebooks.STUDENT_DIR_NAME / lesson.name
        if not student.exists():
            raise SiteError(f"{lesson.name} has no student copy; run python -m pedaPEFT lessons")
        student_paths.append(f"lessons/{notebooks.STUDENT_DIR_NAME}/{lesson.name}")
        notebook = nbformat.read(lesson, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "markdown":
                cell.source = from_repo(cell.source, "lessons")
        nbformat.write(lesson_page(notebook, lesson, student), source / "lessons" / lesson.name)
        shutil.copy2(student, source / "lessons" / notebooks.STUDENT_DIR_NAME / lesson.name)
        shutil.copy2(lesson, source / "lessons" / f"{lesson.stem}_with_solutions.ipynb")
    check_launch_targets(student_paths, repo_dir)

    pages = ["errata", "instructor", "api"]
    more = ["- [Errata of the lecture](errata.md): every statement of the lecture that does not "
            "hold, with the correct value and the lesson that shows it"]
    if coverage.exists():
        (source / "docs").mkdir()
        (source / COVERAGE_PATH).write_text(from_repo(coverage.read_text(encoding="utf-8"),
                                                      "docs"), encoding="utf-8")
        pages.insert(1, "docs/coverage")
        more.append(f"- [Lecture coverage]({COVERAGE_PATH}): where each part of the lecture is "
                    "taught")
    more += ["- [For instructors](instructor.md): handing out exercises, changing a lesson, "
             "publishing this website",
             "- [API reference](api.md): the package the lessons build"]

    intro = readme[""].split("\n", 1)[1]  # drop the "# pedaPEFT" title
    lessons_heading, lessons_body = find_section(readme, "lessons") or ("", "")
    if not lessons_heading:
        raise SiteError("README.md has no '## Lessons' section with the lesson map")
    toctree = "\n".join(f"lessons/{path.stem}" for path in lesson_files)
    home = (
        f"# pedaPEFT\n\n{from_repo(intro)}\n## Lessons\n\n{from_repo(lessons_body)}"
        f"\n## Quickstart\n\n{from_repo(readme.get('Quickstart', ''))}\n## More\n\n"
        + "\n".join(more)
        + f"\n\n```{{toctree}}\n:hidden:\n:caption: Lessons\n\n{toctree}\n```\n\n"
        + "```{toctree}\n:hidden:\n:caption: Course\n\n" + "\n".join(pages) + "\n```\n"
    )
    (source / "index.md").write_text(home, encoding="utf-8")

    errata = find_section(readme, "errata")
    if not errata:
        raise SiteError("README.md has no errata section")
    errata_body = re.sub(r"\| (\d+) \|\s*$", lambda m: lesson_cell(m, lesson_files),
                         errata[1], flags=re.M)
    (source / "errata.md").write_text(f"# {errata[0]}\n\n{from_repo(errata_body)}",
                                      encoding="utf-8")

    instructor = ["# For instructors\n"]
    readme_instructors = find_section(readme, "instructor")
    if readme_instructors:
        instructor.append(f"## {readme_instructors[0]}\n\n{from_repo(readme_instructors[1])}")
    exercises = re.search(r"### Exercises\n(.*?)(?=\n## |\n### |\Z)", lessons_body, re.S)
    if exercises:
        instructor.append(f"## Exercises and student notebooks\n{from_repo(exercises.group(1))}")
    website = find_section(readme, "website")
    if website:
        instructor.append(f"## Publishing this website\n\n{from_repo(website[1])}")
    contributing = (repo_dir / "CONTRIBUTING.md").read_text(encoding="utf-8")
    instructor.append(from_repo(demote_headings(contributing)))
    (source / "instructor.md").write_text("\n".join(instructor), encoding="utf-8")

    (source / "api.md").write_text(api_page(), encoding="utf-8")
    return ["index", *[f"lessons/{path.stem}" for path in lesson_files], *pages]


def lesson_cell(match: re.Match, lesson_files: list[Path]) -> str:
    """An errata table's lesson number, as a link to that lesson's page."""
    number = int(match.group(1))
    for path in lesson_files:
        if int(path.name[:2]) == number:
            return f"| [{number}](lessons/{path.name}) |"
    return match.group(0)


# ---------------------------------------------------------------------------------------------
# Sphinx


def plain_docstring_lines(lines: list[str]) -> list[str]:
    """Read the package's docstrings as they are written: a paragraph that ends with ``:``
    before an indented block introduces preformatted text (formulas, tables), ``|`` is
    an absolute value, not a reStructuredText substitution, and ``$x$`` (as in the lessons'
    headings) is inline math."""
    out, literal_indent = [], None
    for number, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None and line.strip() and indent <= literal_indent:
            literal_indent = None
        if literal_indent is None:
            following = next((later for later in lines[number + 1:] if later.strip()), "")
            follows_indented = (number + 1 < len(lines) and not lines[number + 1].strip()
                                and len(following) - len(following.lstrip()) > indent)
            if line.rstrip().endswith(":") and not line.rstrip().endswith("::") \
                    and follows_indented and not line.lstrip().startswith(":"):
                line, literal_indent = line.rstrip() + ":", indent
            else:
                parts = re.split(r"(``.*?``)", line)
                line = "".join(part if part.startswith("``") else
                               re.sub(r"\$([^$\s][^$]*?)\$", _inline_math,
                                      part.replace("|", "\\|"))
                               for part in parts)
        out.append(line)
    return out


def _inline_math(match: re.Match) -> str:
    """``$x$`` as the ``:math:`` role; a backslash doubled for reST text is single in LaTeX."""
    return ":math:`" + match.group(1).replace("\\\\", "\\") + "`"


def on_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """Sphinx hook: rewrite a docstring in place with :func:`plain_docstring_lines`."""
    lines[:] = plain_docstring_lines(lines)


def setup(app) -> dict:
    """Sphinx extension entry point: the site's own docstring reading."""
    app.connect("autodoc-process-docstring", on_docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def mathjax_dir() -> Path:
    """The MathJax 2 distribution shipped by the ``jupyter-server-mathjax`` package."""
    import jupyter_server_mathjax

    return Path(jupyter_server_mathjax.__file__).parent / "static"


def sphinx_config() -> dict:
    """The Sphinx configuration of the site (no conf.py: every value is set here)."""
    return {
        "project": "pedaPEFT",
        "author": "the pedaPEFT authors",
        "copyright": "the pedaPEFT authors",
        "version": pedaPEFT.__version__,
        "release": pedaPEFT.__version__,
        "extensions": ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
                       "pedaPEFT.site"],
        "exclude_patterns": ["lessons/student/**", "lessons/*_with_solutions.ipynb"],
        "nb_execution_mode": "off",
        "nb_merge_streams": True,
        "myst_enable_extensions": ["dollarmath", "amsmath"],
        "myst_update_mathjax": False,
        "myst_heading_anchors": 3,
        "autodoc_member_order": "bysource",
        "highlight_language": "text",  # preformatted docstring blocks are formulas, not code
        "autodoc_typehints": "signature",
        "html_theme": "sphinx_book_theme",
        "html_title": "pedaPEFT",
        "html_static_path": ["_static"],
        "html_css_files": ["pedapeft.css"],
        "html_context": {"default_mode": "light"},
        "html_copy_source": False,
        "html_show_sourcelink": False,
        "html_theme_options": {
            "repository_url": pedaPEFT.REPOSITORY_URL,
            "repository_branch": REPOSITORY_BRANCH,
            "use_repository_button": True,
            "use_download_button": False,
            "show_toc_level": 2,
            "navigation_with_keys": False,
        },
        # MathJax 2 from the build folder with its STIX web fonts; the tex2jax preprocessor
        # looks only inside the elements Sphinx marks as math. MathJax 2 declares a blank
        # font at about:blank, which Chromium refuses with a console error: it points at
        # no file here instead. No fast preview (it would want the TeX fonts, not shipped).
        "mathjax_path": "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full",
        "mathjax2_config": {
            "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]],
                        "processEscapes": True, "ignoreClass": ".*",
                        "processClass": "math|output_area"},
            "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web",
                         "imageFont": None,
                         "styles": {"@font-face": {"font-family": "MathJax_Blank",
                                                   "src": "local('MathJax_Blank')"}}},
            "fast-preview": {"disabled": True},
            "showMathMenu": False,
            "messageStyle": "none",
        },
    }


SITE_CSS = """\
/* MathJax keeps a visually hidden MathML copy of each formula for screen readers; its own
   style would have Chromium fetch MathJax's TeX web fonts (not shipped) for that copy. */
.MJX_Assistive_MathML, .MJX_Assistive_MathML * { font-family: serif !important; }
"""


def run_sphinx(source: Path, html: Path, doctrees: Path) -> None:
    """Render ``source`` into ``html``; any Sphinx warning fails the build."""
    from sphinx.application import Sphinx
    from sphinx.util.docutils import docutils_namespace, patch_docutils

    shutil.copytree(mathjax_dir(), source / "_static" / "mathjax",
                    ignore=shutil.ignore_patterns("SVG", "*.md"))
    (source / "_static" / "pedapeft.css").write_text(SITE_CSS, encoding="utf-8")
    warnings = StringIO()
    with patch_docutils(source), docutils_namespace():
        app = Sphinx(str(source), None, str(html), str(doctrees), "html",
                     confoverrides=sphinx_config(), status=None, warning=warnings,
                     freshenv=True)
        app.build()
    if warnings.getvalue().strip():
        raise SiteError("the site build warned:\n" + warnings.getvalue())


def build(out: Path, repo_dir: Path = REPO_DIR) -> list[Path]:
    """Build the website into ``out`` and return its HTML pages.

    The site is rendered in a temporary folder next to ``out`` and moved into place only when
    the build succeeded; an existing ``out`` is replaced only if it holds a previous build
    (Sphinx's ``.buildinfo`` file) or nothing.
    """
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / ".buildinfo").exists())):
        raise ValueError(f"out={str(out)!r} exists and is not an earlier build of the site; "
                         "choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_sources(staging / "source", repo_dir)
        run_sphinx(staging / "source", staging / "html", staging / "doctrees")
        if out.exists():
            os.replace(out, staging / "previous")
        os.replace(staging / "html", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pages(out)


def pages(site_dir: Path) -> list[Path]:
    """The HTML pages of a built site (not the theme's template fragments under ``_static``)."""
    return sorted(path for path in Path(site_dir).rglob("*.html")
                  if "_static" not in path.relative_to(site_dir).parts)
