"""Chat with your documents (--langchain_mode=UserData --user_path=DIR, or MyData: this session's uploads).

readers.py turns a file into numbered lines of text (lines, pages, paragraphs or rows, whatever the file has);
ingest.py splits those into passages, embeds them and keeps a collection in step with a folder;
store.py holds the collections (Chroma, on disk) and the embedding model; engine.py puts the passages that
best match a question into the prompt, and every front end lists them as the answer's sources.
Its libraries (chromadb, sentence-transformers, pypdf, python-docx, beautifulsoup4) are the `docs` extra.
"""
