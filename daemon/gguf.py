"""What a GGUF file says about itself (architecture, trained context, quantisation), read from its header.

Reading the header takes milliseconds and no memory for the weights, so ``locod models pull`` and
``locod models list`` can describe a model without loading it into llama.cpp. The header comes from any
server a user pulls from, so it is read within bounds: arrays no longer than the file, nesting at most
MAX_DEPTH deep, strings at most MAX_STRING, the whole header at most MAX_HEADER bytes; anything else that
goes wrong while parsing is NotGGUF too, naming the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MAGIC = b"GGUF"
# Value types of the GGUF key-value section: struct format of the fixed-size ones.
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_STRING = 16 << 20  # chat templates are kilobytes; more means a damaged header, not a bigger buffer
MAX_HEADER = 256 << 20  # the largest vocabularies (256k tokens and their merges) take tens of MB
MAX_DEPTH = 4  # arrays of arrays occur (merges as pairs); deeper is no GGUF llama.cpp writes
# llama.cpp's llama_ftype (general.file_type): how most of the weights are quantised.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0",
}  # fmt: skip


class NotGGUF(ValueError):
    """The file is not a GGUF model, or its header is damaged."""


class CutShort(NotGGUF):
    """The file ends before its last tensor's data, or within its header: a copy or download stopped."""


@dataclass(frozen=True)
class GgufInfo:
    context_length: int | None  # the context the model was trained for
    quantisation: str


def is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def describe(path: Path) -> GgufInfo:
    """Trained context and quantisation of the GGUF at ``path``; raises NotGGUF."""
    return summary(read_metadata(path))


def summary(meta: dict[str, Any]) -> GgufInfo:
    """Trained context (a key under the architecture's name) and quantisation from a header's metadata."""
    arch = str(meta.get("general.architecture", "unknown"))
    context = meta.get(f"{arch}.context_length")
    file_type = meta.get("general.file_type")
    quant = FILE_TYPES.get(file_type, f"type {file_type}") if isinstance(file_type, int) else "unknown"
    return GgufInfo(int(context) if isinstance(context, int) else None, quant)


def kv_bytes_per_token(meta: dict[str, Any]) -> int:
    """What one token of context takes in llama.cpp's KV cache (f16 keys and values), from the metadata:
    read from the file's header (numbers) or from llama.cpp (text); 0 when the fields are absent."""
    arch = meta.get("general.architecture", "")
    try:
        layers = int(meta[f"{arch}.block_count"])
        heads = int(meta[f"{arch}.attention.head_count"])
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        width = int(meta[f"{arch}.embedding_length"])
    except (KeyError, ValueError, TypeError):  # absent, or per-layer arrays (a few architectures)
        return 0
    return 2 * layers * kv_heads * (width // heads) * 2 if heads else 0


def read_metadata(path: Path) -> dict[str, Any]:
    """The header's scalar and string values by key; arrays (the tokenizer's vocabulary) are skipped."""
    return _read_header(path, with_tensors=False)


def check_whole(path: Path) -> dict[str, Any]:
    """The metadata (``read_metadata``) of a file that reaches its last tensor's data; CutShort when ``path``
    ends before that data begins, as its header places it: a copy or download cut short has a model's header,
    and llama.cpp fails every load of it (a reload took one as the default, and each local turn after failed)."""
    return _read_header(path, with_tensors=True)


def _read_header(path: Path, with_tensors: bool) -> dict[str, Any]:
    """The metadata (``read_metadata``); ``with_tensors``: then the tensors' table too, checking that the
    file reaches where the last tensor's data begins."""
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise NotGGUF(f"{path} is not a GGUF file")
        size = os.fstat(f.fileno()).st_size
        try:
            version, tensors, count = struct.unpack("<IQQ", _exact(f, 20))
            if version < 2:
                raise NotGGUF(f"GGUF version {version} is too old (llama.cpp reads 2 and later)")
            end = min(size, MAX_HEADER)
            meta: dict[str, Any] = {}
            for _ in range(count):
                key = _string(f)
                kind = _unpack(f, "<I")
                value = _value(f, kind, end, 0)
                if value is not _SKIPPED:
                    meta[key] = value
                if f.tell() > end:
                    raise NotGGUF(f"the header runs past {end} bytes")
            last_tensor = _last_tensor_start(f, tensors, size, meta.get("general.alignment")) if with_tensors else 0
        except NotGGUF as exc:
            raise NotGGUF(f"{path}: the GGUF header is damaged ({exc})") from None
        except EOFError:  # the file ends within its header: what a copy or download stopped early leaves
            raise CutShort(f"{path} is cut short: {size} bytes, ending within its GGUF header") from None
        except Exception as exc:  # struct, UTF-8, seek overflow...: whatever the bytes make the parser do
            raise NotGGUF(f"{path}: the GGUF header is damaged ({type(exc).__name__}: {exc})") from None
    if last_tensor >= size:
        raise CutShort(f"{path} is cut short: {size} bytes, where its last tensor begins at byte {last_tensor}")
    return meta


def _last_tensor_start(f: IO[bytes], tensors: int, size: int, alignment: Any) -> int:
    """Where the last tensor's data begins (0: no tensors), from the tensors' table that follows the
    metadata: each entry's name, dimensions, type and offset into the aligned data section."""
    if tensors * 24 > size - f.tell():  # an entry takes at least 24 bytes
        raise NotGGUF(f"a table of {tensors} tensors runs past the file's end")
    last = 0
    for _ in range(tensors):
        _string(f)
        dims = _unpack(f, "<I")
        if dims > 8:
            raise NotGGUF(f"a tensor of {dims} dimensions")
        f.seek(8 * dims + 4, 1)  # the dimensions, the type
        last = max(last, _unpack(f, "<Q"))
    align = alignment if isinstance(alignment, int) and alignment > 0 else 32
    return -(-f.tell() // align) * align + last if tensors else 0


_SKIPPED = object()


def _value(f: IO[bytes], kind: int, end: int, depth: int) -> Any:
    if kind in _FIXED:
        return _unpack(f, _FIXED[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        if depth >= MAX_DEPTH:
            raise NotGGUF(f"arrays nested more than {MAX_DEPTH} deep")
        item, count = struct.unpack("<IQ", _exact(f, 12))
        smallest = struct.calcsize(_FIXED[item]) if item in _FIXED else 8  # a string is at least its length
        if count * smallest > end - f.tell():
            raise NotGGUF(f"an array of {count} items runs past the header's end")
        if item in _FIXED:
            f.seek(smallest * count, 1)
        else:
            for _ in range(count):
                _value(f, item, end, depth + 1)
                if f.tell() > end:
                    raise NotGGUF(f"the header runs past {end} bytes")
        return _SKIPPED
    raise NotGGUF(f"unknown GGUF value type {kind}")


def _string(f: IO[bytes]) -> str:
    size = _unpack(f, "<Q")
    if size > MAX_STRING:
        raise NotGGUF(f"a header string claims {size} bytes")
    return _exact(f, size).decode("utf-8")


def _unpack(f: IO[bytes], fmt: str) -> Any:
    return struct.unpack(fmt, _exact(f, struct.calcsize(fmt)))[0]


def _exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"header ends after {f.tell()} bytes")
    return data
