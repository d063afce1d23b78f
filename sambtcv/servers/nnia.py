"""Arrays on the wire of the nnInteractive remote protocol (`nninteractive-client` 2.x): the "NNIA" framing.

One array is one message, all integers little-endian:

    magic b"NNIA" | version u8 (1) | codec u8 (1 zstd, 2 lz4) | ndim u8 | len(dtype name) u8 | dtype name
    | shape: ndim x i64 | chunk count u32 | per chunk: raw bytes u64, compressed bytes u64, one Blosc2 chunk

The payload is the array's C-order bytes cut into chunks of at most CHUNK_BYTES, each compressed on its own
(Blosc2, its own header says which filter). `unpack` checks every length against the declared shape before it
decompresses anything, and refuses more than `max_bytes` (a small message cannot ask for gigabytes).
"""
from __future__ import annotations

import struct

import numpy as np

from sambtcv.core.errors import PipelineError

MAGIC = b"NNIA"
VERSION = 1
CODECS = {1: "ZSTD", 2: "LZ4"}
CHUNK_BYTES = 1 << 30
CLEVEL = 3
DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32",
          "float64")
MAX_NDIM = 8


def pack(array: np.ndarray) -> bytes:
    """`array` (any shape, a dtype of DTYPES, at least one element) as one NNIA message (zstd, no filter)."""
    import blosc2

    arr = np.ascontiguousarray(array)
    name = arr.dtype.name
    if name not in DTYPES or arr.size == 0:
        raise PipelineError(f"cannot send an array of {arr.dtype} with shape {arr.shape}")
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    raw = memoryview(arr.reshape(-1).view(np.uint8))
    chunks = [raw[i:i + CHUNK_BYTES] for i in range(0, len(raw), CHUNK_BYTES)]
    out = [struct.pack(f"<4sBBBB{len(name)}s", MAGIC, VERSION, 1, arr.ndim, len(name), name.encode()),
           struct.pack(f"<{arr.ndim}q", *arr.shape), struct.pack("<I", len(chunks))]
    for c in chunks:
        packed = blosc2.compress2(bytes(c), typesize=arr.dtype.itemsize, codec=blosc2.Codec.ZSTD, clevel=CLEVEL,
                                  filters=[blosc2.Filter.NOFILTER])
        out.append(struct.pack("<QQ", len(c), len(packed)))
        out.append(packed)
    return b"".join(out)


def unpack(data: bytes, max_bytes: int, what: str = "the array") -> np.ndarray:
    """One NNIA message -> the array; PipelineError (one line) for anything malformed or over `max_bytes`."""
    import blosc2

    view = memoryview(data)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise PipelineError(f"{what} is cut short (an NNIA message of {len(view)} bytes)")
        pos += n
        return view[pos - n:pos]

    magic, version, codec, ndim, name_len = struct.unpack("<4sBBBB", take(8))
    if magic != MAGIC or version != VERSION or codec not in CODECS:
        raise PipelineError(f"{what} is not an NNIA array (version {VERSION}, zstd or lz4)")
    name = bytes(take(name_len)).decode("ascii", "replace")
    if name not in DTYPES or not 1 <= ndim <= MAX_NDIM:
        raise PipelineError(f"{what} has dtype {name!r} and {ndim} axes; expected one of {', '.join(DTYPES)}")
    shape = struct.unpack(f"<{ndim}q", take(8 * ndim))
    dtype = np.dtype(name)
    if min(shape) < 1:
        raise PipelineError(f"{what} has shape {list(shape)}; every axis needs at least one element")
    total = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if total > max_bytes:
        raise PipelineError(f"{what} would hold {total / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB allowed")
    (count,) = struct.unpack("<I", take(4))
    chunks = []  # every chunk's header checked before any memory is taken for the array
    for _ in range(count):
        ulen, clen = struct.unpack("<QQ", take(16))
        chunks.append((ulen, take(clen)))
    if pos != len(view) or sum(u for u, _ in chunks) != total or any(u % dtype.itemsize for u, _ in chunks):
        raise PipelineError(f"{what}'s chunks do not add up to its shape {list(shape)}")
    out = np.empty(total, np.uint8)
    done = 0
    for ulen, chunk in chunks:
        try:
            if blosc2.get_cbuffer_sizes(bytes(chunk[:32]))[0] != ulen:
                raise ValueError("its header gives another size")
            out[done:done + ulen] = np.frombuffer(blosc2.decompress2(bytes(chunk)), np.uint8)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise PipelineError(f"{what} holds a chunk that does not decompress ({exc})") from None
        done += ulen
    return out.view(dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
