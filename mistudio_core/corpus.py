"""Text corpora: read documents from a file and pack their tokens into fixed-size windows.

Three formats, told apart by the file's suffix:
- `.txt` (or `.md`, `.text`): one document per blank-line-separated block,
- `.jsonl`: one JSON object per line, the document in a text field (`text` by default),
- `.parquet`: one row per document, the text in a column (`text` by default).

Packing concatenates every document's tokens, with the end-of-text token between documents, and
cuts the stream into windows of `context_size` tokens, each opening with the BOS token when
`prepend_bos` is set (as SAELens does). The last partial window is dropped. The packing is a
pure function of the corpus and the tokenizer, so a window index is a stable position in the
data: resuming a run only needs the number of windows it has consumed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mistudio_core.demo import DEMO_MODEL_ALIAS, demo_corpus_path, ensure_demo_model
from mistudio_core.errors import MistudioError
from mistudio_core.files import file_sha256

TEXT_SUFFIXES = (".txt", ".text", ".md")
CORPUS_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
_TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class Corpus:
    """A validated corpus file and the field that holds its text."""

    path: Path
    text_field: str = "text"

    @classmethod
    def open(cls, path: str | Path, text_field: str = "text") -> Corpus:
        """Check that the file exists, has a known format and yields at least one document."""
        if str(path) == DEMO_MODEL_ALIAS:  # the demo model's held-out corpus
            path = demo_corpus_path(ensure_demo_model())
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise MistudioError(
                f"corpus file {path} does not exist",
                hint="give a .txt, .jsonl or .parquet file (or `demo` for the demo corpus)",
                code="bad_corpus",
            )
        if resolved.suffix.lower() not in CORPUS_SUFFIXES:
            raise MistudioError(
                f"corpus {resolved.name} has an unsupported format ({resolved.suffix or 'none'})",
                hint="use one of " + ", ".join(CORPUS_SUFFIXES),
                code="bad_corpus",
            )
        corpus = cls(resolved, text_field)
        if next(iter(corpus.documents()), None) is None:
            raise MistudioError(
                f"corpus {resolved} holds no text",
                hint=f"each document needs non-empty text (field {text_field!r} for JSONL/Parquet)",
                code="bad_corpus",
            )
        return corpus

    def documents(self) -> Iterator[str]:
        suffix = self.path.suffix.lower()
        if suffix == ".jsonl":
            return self._jsonl_documents()
        if suffix == ".parquet":
            return self._parquet_documents()
        return self._text_documents()

    def fingerprint(self) -> str:
        """SHA-256 of the file's bytes: ties a cache or a trained SAE to exactly this data."""
        return file_sha256(self.path)

    def _text_documents(self) -> Iterator[str]:
        lines: list[str] = []
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).strip()
                    lines = []
        if lines:
            yield "".join(lines).strip()

    def _jsonl_documents(self) -> Iterator[str]:
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MistudioError(
                        f"{self.path.name} line {number} is not valid JSON ({exc.msg})",
                        hint="each line must be one JSON object, e.g. {\"text\": \"...\"}",
                        code="bad_corpus",
                    ) from exc
                text = record.get(self.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise MistudioError(
                        f"{self.path.name} line {number} has no string field "
                        f"{self.text_field!r}",
                        hint="name the field that holds the text with --text-field",
                        code="bad_corpus",
                    )
                if text.strip():
                    yield text

    def _parquet_documents(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise MistudioError(
                f"{self.path.name} is not a readable Parquet file ({exc})",
                hint="check the file, or export the corpus as JSONL",
                code="bad_corpus",
            ) from exc
        if self.text_field not in table.schema_arrow.names:
            raise MistudioError(
                f"{self.path.name} has no column {self.text_field!r} "
                f"(columns: {', '.join(table.schema_arrow.names)})",
                hint="name the text column with --text-field",
                code="bad_corpus",
            )
        for batch in table.iter_batches(columns=[self.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text


def pack_windows(
    documents: Iterable[str], tokenizer, context_size: int, prepend_bos: bool = True
) -> Iterator[list[int]]:
    """Token windows of exactly `context_size` ids, documents separated by end-of-text."""
    separator = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else separator
    if prepend_bos and bos is None:
        raise MistudioError(
            "the tokenizer has neither a BOS nor an EOS token to open windows with",
            hint="train with --no-prepend-bos",
        )
    body = context_size - 1 if prepend_bos else context_size
    pending: list[int] = []
    for texts in _batched(documents, _TOKENIZE_BATCH):
        # verbose=False: documents longer than the model's context are expected, packing cuts them.
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            pending.extend(ids)
            if separator is not None:
                pending.append(separator)
        start = 0
        while len(pending) - start >= body:
            chunk = pending[start : start + body]
            yield [bos, *chunk] if prepend_bos else chunk
            start += body
        pending = pending[start:]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
