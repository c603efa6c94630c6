"""Text event files (CSV, JSONL; optionally gzip'd): the first bytes say what they are.

A ``TextFile`` is refused before it is read when it is another kind of file, binary, or UTF-16
without a byte order mark; its encoding is the one given, or read from its byte order mark.
A byte not of that encoding, or a gzip stream cut short, becomes a refusal naming the place.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np
import pyarrow as pa

from keel.ingest.file_checks import CONTROL_BYTES, FORMAT_NAMES, READ_ERRORS, SNIFF_BYTES, FileFormatError, magic

# Text has a few stray control bytes at most; random or binary data has about one in nine.
BINARY_SHARE = 0.05
# Read size when a file is decoded again to find its first bad byte (an error's path only).
SCAN_BYTES = 1 << 20


def check_encoding(name: str) -> str:
    """``name`` as Python's codec knows it; ValueError naming it when there is no such encoding."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ValueError(f"encoding {name!r} is not known (use e.g. utf-8, latin-1, cp1252 or utf-16)") from None


class TextFile:
    """A CSV or JSONL file checked from its first bytes: not another kind of file, not binary,
    and in an encoding (from its byte order mark, or the one given)."""

    def __init__(self, path: Path, fmt: str, encoding: str | None) -> None:
        self.path, self.fmt = path, fmt
        self.packed = path.suffix.lower() == ".gz"
        if self.packed:
            with path.open("rb") as fh:
                if fh.read(2) != b"\x1f\x8b":
                    raise FileFormatError(
                        path,
                        "is not gzip-compressed, though its name ends in .gz",
                        fix="drop .gz from its name, or compress it with gzip",
                    )
        try:
            with self.open() as stream:
                sample = stream.read(SNIFF_BYTES + 1)
        except READ_ERRORS as exc:
            raise self.stream_error(exc, rows=0) from None
        self.whole = len(sample) <= SNIFF_BYTES
        self.sample = sample[:SNIFF_BYTES]
        found = magic(self.sample)
        if found:
            raise FileFormatError(path, f"is {found[0]}, not {FORMAT_NAMES[fmt]}", fix=found[1])
        self.encoding = self._encoding(encoding)
        if not self.encoding.startswith(("utf-16", "utf-32")):
            self._refuse_binary()

    def open(self) -> pa.NativeFile:
        return pa.input_stream(str(self.path), compression="gzip" if self.packed else None)

    def _encoding(self, given: str | None) -> str:
        if given is not None:
            name = check_encoding(given)
            # A UTF-8 file may start with a byte order mark (spreadsheet programs' "CSV UTF-8"): skipped.
            return "utf-8-sig" if name == "utf-8" else name
        for bom, name in (
            (codecs.BOM_UTF32_LE, "utf-32"),
            (codecs.BOM_UTF32_BE, "utf-32"),
            (codecs.BOM_UTF16_LE, "utf-16"),
            (codecs.BOM_UTF16_BE, "utf-16"),
        ):
            if self.sample.startswith(bom):
                return name
        return "utf-8-sig"

    def _refuse_binary(self) -> None:
        if not self.sample:
            return
        data = np.frombuffer(self.sample, dtype=np.uint8)
        control = CONTROL_BYTES[data]
        if control.mean() < BINARY_SHARE:
            return
        zeros_odd, zeros_even = (data[1::2] == 0).mean(), (data[0::2] == 0).mean()
        if max(zeros_odd, zeros_even) > 0.9 and min(zeros_odd, zeros_even) < 0.1:
            raise FileFormatError(
                self.path,
                "is UTF-16 text without a byte order mark",
                fix=f"ingest it with --encoding utf-16-{'le' if zeros_odd > zeros_even else 'be'}, or save it as UTF-8",
            )
        first = int(np.argmax(control))
        raise FileFormatError(
            self.path,
            f"is binary, not text (byte 0x{data[first]:02X})",
            self._place(first, self.sample[:first].count(b"\n") + 1),
            f"check that this is the {FORMAT_NAMES[self.fmt]} export itself, not another kind of file renamed",
        )

    def _place(self, offset: int, line: int) -> str:
        return f"byte {offset}{' of the uncompressed data' if self.packed else ''} (line {line})"

    def encoding_error(self) -> FileFormatError | None:
        """The refusal naming the first byte that is not of the file's encoding (None if every byte is)."""
        found = self.first_bad_byte()
        return None if found is None else self._bad_byte(*found)

    def first_bad_byte(self) -> tuple[int, int, int] | None:
        """(offset, line, byte) of the first byte that is not of the file's encoding, read from the start."""
        codec, skip = self.encoding, 0
        if codec == "utf-8-sig":
            # Plain UTF-8 after the mark: utf-8-sig reports positions past the mark, not in the file.
            codec, skip = "utf-8", len(codecs.BOM_UTF8) if self.sample.startswith(codecs.BOM_UTF8) else 0
        decoder = codecs.getincrementaldecoder(codec)("strict")
        offset, lines = skip, 0
        try:
            with self.open() as stream:
                stream.read(skip)
                while True:
                    chunk = stream.read(SCAN_BYTES)
                    # The decoder holds back the bytes of a character split between reads.
                    pending = len(decoder.getstate()[0])
                    try:
                        decoder.decode(chunk, final=not chunk)
                    except UnicodeDecodeError as exc:
                        at = offset - pending + exc.start
                        byte = exc.object[exc.start] if exc.start < len(exc.object) else 0
                        return at, lines + chunk[: max(at - offset, 0)].count(b"\n") + 1, byte
                    if not chunk:
                        return None
                    offset += len(chunk)
                    lines += chunk.count(b"\n")
        except READ_ERRORS:
            return None

    def _bad_byte(self, at: int, line: int, byte: int) -> FileFormatError:
        utf8 = self.encoding.startswith("utf-8")
        name = "UTF-8" if utf8 else self.encoding.upper() if self.encoding.startswith("utf") else self.encoding
        fix = (
            "if it was saved as Latin-1 or Windows-1252, ingest it with --encoding latin-1 or --encoding cp1252; "
            "otherwise save it as UTF-8"
            if utf8
            else f"it is not {name}: give the encoding it was saved in with --encoding, or save it as UTF-8"
        )
        return FileFormatError(self.path, f"is not valid {name} (byte 0x{byte:02X})", self._place(at, line), fix)

    def stream_error(self, exc: BaseException, rows: int) -> FileFormatError:
        """A decompression or read failure as a refusal: cut short, or damaged."""
        size = self.path.stat().st_size
        after = f", after row {rows}" if rows else ""
        message = str(exc)
        if self.packed and (isinstance(exc, EOFError) or "truncated" in message.lower() or "end of" in message):
            return FileFormatError(
                self.path,
                "is cut short: its gzip stream ends early",
                f"byte {size} (its end){after}",
                "send the whole file again",
            )
        return FileFormatError(
            self.path,
            f"cannot be read{' as gzip' if self.packed else ''} ({message})",
            f"the data after row {rows}" if rows else None,
            "send the file again",
        )
