"""Files -> numbered text: each reader returns Sections (a page, or the whole file) of numbered lines.

The numbers are what an answer cites: lines of a text or source file, lines within a PDF page,
paragraphs of a .docx or web page, rows of a CSV (the header is row 1, as a spreadsheet shows it).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, missing_package

TEXT_SUFFIXES = {
    ".txt", ".md", ".markdown", ".rst", ".log", ".tex",
    # source code and configuration
    ".py", ".js", ".ts", ".tsx", ".jsx", ".java", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".go", ".rs", ".rb",
    ".php", ".swift", ".kt", ".scala", ".sh", ".bash", ".sql", ".r", ".lua", ".pl", ".css", ".yaml", ".yml",
    ".toml", ".json", ".ini", ".cfg", ".xml",
}
TEXT_NAMES = {"README", "LICENSE", "Makefile", "Dockerfile"}

# What one document may expand to. A small file can unpack into a great deal (a .docx is a zip: 53 KB held millions
# of empty paragraphs), and one document must not take a server's memory or minutes of its time.
MAX_FILE_BYTES = 64 * 2**20       # a text, HTML or CSV file as read
MAX_UNPACKED_BYTES = 64 * 2**20   # a .docx once unzipped
MAX_UNITS = 200_000               # lines, paragraphs or rows
MAX_PAGES = 5_000                 # of a PDF
MAX_SECONDS = 120.0               # reading one document


class UnreadableDocument(Exception):
    """A file that cannot be turned into text; str() says why, in a few words."""


@dataclass
class Section:
    """Numbered lines of text from one file (from one page of it, for a PDF)."""
    lines: list[tuple[int, str]]
    unit: str = "line"          # what the numbers count: line, paragraph or row
    page: int | None = None     # 1-based, for PDFs


def read_document(path: Path) -> list[Section]:
    """The file's text as Sections; raises UnreadableDocument with the reason when there is none to be had."""
    reader = _reader(path)
    if reader is None:
        raise UnreadableDocument(f"not a supported document type ({path.suffix or 'no suffix'})")
    try:
        if path.stat().st_size > MAX_FILE_BYTES and reader in (read_text, read_html, read_csv):
            raise UnreadableDocument(f"larger than {MAX_FILE_BYTES // 2**20} MiB")
        sections = reader(path)
        if sum(len(s.lines) for s in sections) > MAX_UNITS:
            raise UnreadableDocument(f"more than {MAX_UNITS:,} lines, paragraphs or rows")
    except UnreadableDocument:
        raise
    except UserError as e:  # its library is not installed: skip the file, saying how to read it
        raise UnreadableDocument(str(e)) from None
    except OSError as e:
        raise UnreadableDocument(f"cannot open it ({e.strerror or e})") from None
    except Exception as e:  # a damaged file: the parsing library's own words
        raise UnreadableDocument(f"cannot parse it ({type(e).__name__}: {e})") from None
    sections = [s for s in sections if any(text.strip() for _, text in s.lines)]
    if not sections:
        raise UnreadableDocument("it holds no text")
    return sections


def _reader(path: Path) -> Callable[[Path], list[Section]] | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES or (not suffix and path.name in TEXT_NAMES):
        return read_text
    return OTHER_READERS.get(suffix)


def suffixes() -> list[str]:
    """Every file suffix there is a reader for (for upload pickers)."""
    return sorted(TEXT_SUFFIXES | set(OTHER_READERS))


def decode(data: bytes) -> str:
    """UTF-8 (with or without a byte-order mark), else Windows-1252, the usual legacy encoding; never binary."""
    if b"\x00" in data[:8192]:
        raise UnreadableDocument("a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            raise UnreadableDocument("not UTF-8 or Windows-1252 text") from None


def read_text(path: Path) -> list[Section]:
    text = decode(path.read_bytes())
    return [Section(list(enumerate(text.splitlines(), start=1)))]


def read_pdf(path: Path) -> list[Section]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import FileNotDecryptedError
    except ImportError:
        raise missing_package("pypdf", "docs", "reading PDF files") from None
    reader = PdfReader(path)
    if reader.is_encrypted and not reader.decrypt(""):
        raise UnreadableDocument("the PDF is encrypted with a password")
    if len(reader.pages) > MAX_PAGES:
        raise UnreadableDocument(f"more than {MAX_PAGES:,} pages")
    deadline = _Deadline()
    sections = []
    try:
        for number, page in enumerate(reader.pages, start=1):
            deadline.check()
            lines = (page.extract_text() or "").splitlines()
            sections.append(Section(list(enumerate(lines, start=1)), page=number))
    except FileNotDecryptedError:
        raise UnreadableDocument("the PDF is encrypted with a password") from None
    if not any(text.strip() for s in sections for _, text in s.lines):
        raise UnreadableDocument("the PDF has no text layer (a scan: OCR is not supported)")
    return sections


def read_html(path: Path) -> list[Section]:
    try:
        from bs4 import BeautifulSoup
    except ImportError:
        raise missing_package("beautifulsoup4", "docs", "reading web pages") from None
    soup = BeautifulSoup(decode(path.read_bytes()), "html.parser")
    for hidden in soup(["script", "style", "noscript", "template"]):
        hidden.decompose()
    blocks = [line.strip() for line in soup.get_text("\n").splitlines() if line.strip()]
    return [Section(list(enumerate(blocks, start=1)), unit="paragraph")]


def read_docx(path: Path) -> list[Section]:
    try:
        import docx
    except ImportError:
        raise missing_package("python-docx", "docs", "reading .docx files") from None
    _check_unpacked_docx(path)
    document = docx.Document(str(path))
    blocks = [p.text.strip() for p in document.paragraphs if p.text.strip()]
    for table in document.tables:  # after the body text: python-docx lists tables apart from paragraphs
        for row in table.rows:
            cells = [cell.text.strip() for cell in row.cells if cell.text.strip()]
            if cells:
                blocks.append(" | ".join(dict.fromkeys(cells)))  # merged cells repeat their text
    return [Section(list(enumerate(blocks, start=1)), unit="paragraph")]


def _check_unpacked_docx(path: Path) -> None:
    """Before python-docx builds its tree: what the zip unpacks to, and how many paragraphs and rows it holds
    (counted in the XML's bytes, which is fast)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            if sum(info.file_size for info in archive.infolist()) > MAX_UNPACKED_BYTES:
                raise UnreadableDocument(f"unpacks to more than {MAX_UNPACKED_BYTES // 2**20} MiB")
            xml = archive.read("word/document.xml")
    except (zipfile.BadZipFile, KeyError):
        raise UnreadableDocument("not a .docx file (no Word document inside)") from None
    elements = sum(xml.count(tag) for tag in (b"<w:p>", b"<w:p ", b"<w:p/>", b"<w:tr>", b"<w:tr ", b"<w:tr/>"))
    if elements > MAX_UNITS:
        raise UnreadableDocument(f"more than {MAX_UNITS:,} paragraphs and table rows")


class _Deadline:
    def __init__(self, seconds: float = MAX_SECONDS):
        import time
        self._clock, self._end = time.monotonic, time.monotonic() + seconds

    def check(self) -> None:
        if self._clock() > self._end:
            raise UnreadableDocument(f"reading it took more than {MAX_SECONDS:.0f} s")


def read_csv(path: Path) -> list[Section]:
    """Each row as 'column: value; ...' so that a passage says what its numbers mean."""
    rows = []
    for row in csv.reader(io.StringIO(decode(path.read_bytes()))):
        rows.append(row)
        if len(rows) > MAX_UNITS:
            raise UnreadableDocument(f"more than {MAX_UNITS:,} rows")
    if not rows:
        return []
    header, lines = rows[0], []
    for number, row in enumerate(rows[1:], start=2):
        cells = [f"{name}: {value}" for name, value in zip(header, row, strict=False) if value.strip()]
        cells += [value for value in row[len(header):] if value.strip()]
        if cells:
            lines.append((number, "; ".join(cells)))
    return [Section(lines, unit="row")]


OTHER_READERS = {".pdf": read_pdf, ".html": read_html, ".htm": read_html, ".docx": read_docx, ".csv": read_csv}
