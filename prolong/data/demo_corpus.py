"""A small offline corpus in ProLong's shape, for the embedded default recipe and tests.

Three packed domains, built from text present on any machine with Python and this repo's
requirements (plus, when installed, Debian's r-cran-janeaustenr and the system man pages):

* `code_repos` (long mode): each top-level package or module of the Python standard library is one
  repository document (files in sorted order, each under a header line with its path).
* `books` (long mode): Jane Austen's six novels from r-cran-janeaustenr's R data files (read with
  `rdata`); without that package, the docstrings of each standard-library module joined into one
  long document per module.
* `short` (short mode): man pages from /usr/share/man as plain text; without them, the docstrings of
  standard-library functions and classes, one per document.

Each domain is capped at `max_bytes_per_domain` bytes of text, so the demo builds in seconds.
"""

from __future__ import annotations

import ast
import gzip
import logging
import os
import re
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

import datasets

from .pack import pack_dataset
from .sources import read_repository
from .tokenize import tokenize_dataset, tokenizer_name

logger = logging.getLogger("prolong.data")

JANEAUSTENR_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")
MAN_ROOT = Path("/usr/share/man")
STDLIB_SKIP = {"test", "tests", "site-packages", "dist-packages", "lib-dynload", "__pycache__", "idlelib",
               "ensurepip", "turtledemo", "tkinter"}


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_entries() -> list[Path]:
    """Top-level packages (directories) and modules (.py files) of the standard library."""
    entries = []
    for path in sorted(_stdlib().iterdir()):
        if path.name in STDLIB_SKIP or path.name.startswith((".", "config-")):
            continue
        if (path.is_dir() and (path / "__init__.py").exists()) or path.suffix == ".py":
            entries.append(path)
    return entries


def capped(texts: Iterator[str], max_bytes: int) -> list[str]:
    """The non-blank texts in order until `max_bytes` of UTF-8 are kept."""
    kept, total = [], 0
    for text in texts:
        if not text.strip():
            continue
        kept.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return kept


def stdlib_repositories(min_bytes: int = 16_000) -> Iterator[str]:
    # In name order, public packages/modules only, and none too small to fill a long sequence.
    for entry in _stdlib_entries():
        if not entry.name.startswith("_") and _tree_size(entry) >= min_bytes:
            yield read_repository(entry)[0]


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*.py"))


def janeausten_novels(data_dir: Path = JANEAUSTENR_DATA) -> list[str]:
    """The six novels from r-cran-janeaustenr's lazy-load database (Rdata.rdx index, Rdata.rdb
    blobs: 4-byte length + zlib-compressed R serialization), one text per novel."""
    import rdata
    import warnings

    index = rdata.read_rds(data_dir / "Rdata.rdx")
    blobs = (data_dir / "Rdata.rdb").read_bytes()
    novels = []
    for name, (offset, size) in sorted(index["variables"].items(), key=lambda item: int(item[1][0])):
        blob = blobs[int(offset):int(offset) + int(size)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that the blob has no file-type header
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
        novels.append("\n".join(str(line) for line in lines))
    return novels


def _module_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def _stdlib_python_files() -> Iterator[Path]:
    for entry in _stdlib_entries():
        yield from ([entry] if entry.is_file() else sorted(entry.rglob("*.py")))


def stdlib_docstring_books() -> Iterator[str]:
    """Fallback long prose: every docstring of a module, joined, as one document per module."""
    files = sorted(_stdlib_python_files(), key=lambda p: (-p.stat().st_size, str(p)))
    for path in files:
        yield "\n\n".join(_module_docstrings(path))


def stdlib_docstrings() -> Iterator[str]:
    for path in _stdlib_python_files():
        yield from _module_docstrings(path)


_ROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\(em|\\\(en"), "-"),
                 (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
                 (re.compile(r"\\\(.."), ""), (re.compile(r"\\[&|^%]"), ""), (re.compile(r"\\s[-+]?\d"), "")]


def man_page_text(roff: str) -> str:
    """Plain text of a man page: macro arguments kept, layout requests and font escapes removed."""
    lines = []
    for line in roff.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request in {"SH", "SS"}:
                lines.extend(["", rest.strip('"').upper() if request == "SH" else rest.strip('"')])
            elif request in {"B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "TP", "IP", "Nm", "Nd", "Sh"}:
                if rest:
                    lines.append(rest.replace('"', ""))
            elif request in {"PP", "P", "LP", "sp", "br"}:
                lines.append("")
            continue
        lines.append(line)
    text = "\n".join(lines)
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def man_pages(root: Path = MAN_ROOT) -> Iterator[str]:
    for section in sorted(root.glob("man[1-8]")):
        for page in sorted(section.iterdir()):
            try:
                data = gzip.decompress(page.read_bytes()) if page.suffix == ".gz" else page.read_bytes()
                roff = data.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError):
                continue
            if roff.startswith(".so "):  # an alias of another page
                continue
            yield man_page_text(roff)


def demo_texts(max_bytes_per_domain: int, janeaustenr_data: Path = JANEAUSTENR_DATA) -> dict[str, list[str]]:
    """The raw documents of each demo domain."""
    if (Path(janeaustenr_data) / "Rdata.rdb").exists():
        books = janeausten_novels(Path(janeaustenr_data))
    else:
        logger.warning("r-cran-janeaustenr is not installed (apt-get install r-cran-janeaustenr): "
                       "the books domain uses standard-library docstrings instead")
        books = stdlib_docstring_books()
    short = man_pages() if any(MAN_ROOT.glob("man[1-8]/*")) else stdlib_docstrings()
    return {"code_repos": capped(stdlib_repositories(), max_bytes_per_domain),
            "books": capped(iter(books), max_bytes_per_domain),
            "short": capped(short, max_bytes_per_domain)}


DEMO_MODES = {"code_repos": "long", "books": "long", "short": "short"}


def build_demo_corpus(tokenizer, out_dir: str | os.PathLike, *, length: int = 1024,
                      max_bytes_per_domain: int = 2_000_000, num_proc: int = 1,
                      overwrite: bool = False, janeaustenr_data: str | os.PathLike = JANEAUSTENR_DATA
                      ) -> dict[str, Path]:
    """Build `out_dir/{code_repos,books,short}`: packed datasets of `length`-token sequences
    (long mode with min_length = length for code_repos and books, short mode for short).
    `janeaustenr_data` is the r-cran-janeaustenr `data` directory (Debian's path by default).
    Returns the directory of each domain."""
    out_dir = Path(out_dir)
    outputs = {}
    for domain, texts in demo_texts(max_bytes_per_domain, Path(janeaustenr_data)).items():
        raw = datasets.Dataset.from_dict({"text": texts})
        tokenized, _ = tokenize_dataset(raw, tokenizer, domain=domain, num_proc=num_proc)
        pack_dataset(tokenized, out_dir / domain, mode=DEMO_MODES[domain], length=length,
                     overwrite=overwrite, tokenizer_name=tokenizer_name(tokenizer))
        outputs[domain] = out_dir / domain
    return outputs
