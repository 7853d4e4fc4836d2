"""PackBits (PSD "RLE") for 8-bit planes, vectorised where runs do not pay.

Profiling ``write_variants`` (benchmarks/bench_psd_io.py, 4000 x 3000) showed psd-tools'
``encode_rle`` spending more time copying (a read per row, a join, a BytesIO) than in
its C row encoder, and photographic rows have almost no runs to gain from: PackBits
of such a row is a literal packet per 128 bytes either way. So rows are split:

* rows with few runs of equal samples are written as literal packets by numpy reshaping
  (one copy, no per-row Python), at most 1/128 larger than raw;
* the other rows (flat areas: pinned backgrounds, the opaque transparency plane) go
  through psd-tools' own C encoder, which finds their runs.

Both produce standard PackBits that every reader decodes. The row lengths are kept
apart from the data so that the flattened image, which stores all channels' lengths
first, can reuse a layer's encoded rows instead of encoding them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from psd_tools.compression import encode_rle

__all__ = ["EncodedPlane", "encode_plane", "image_data"]

#: A row goes to the run-finding encoder when more than 1/this of its samples start a
#: run of three: then runs shrink it by about that share; below, speed wins.
_RUN_SHARE_DIVISOR = 16

_SAMPLE_STEP = 16
_PACKET = 128  # the longest literal packet PackBits allows


@dataclass(frozen=True)
class EncodedPlane:
    """One PackBits plane: ``lengths`` (per row) and ``payload``, a layer channel's RLE
    data (the row lengths, 2 bytes each or 4 in PSB, then the rows)."""

    lengths: np.ndarray
    # bytes, or a bytearray filled in place (no copy); psd-tools only writes and
    # measures channel data, which takes either.
    payload: bytes | bytearray

    @property
    def rows(self) -> memoryview:
        """The rows' bytes without the lengths (a view: no copy)."""
        return memoryview(self.payload)[len(self.payload) - int(self.lengths.sum()) :]


def _lengths(lengths: np.ndarray, version: int) -> bytes:
    return lengths.astype(">u2" if version == 1 else ">u4").tobytes()


def image_data(planes: list[EncodedPlane], version: int) -> bytes:
    """The flattened image's RLE payload: every channel's row lengths, then every row."""
    counts = np.concatenate([plane.lengths for plane in planes])
    return b"".join([_lengths(counts, version), *(plane.rows for plane in planes)])


def encode_plane(plane: np.ndarray, version: int = 1) -> EncodedPlane:
    """PackBits of an (H, W) uint8 plane, one packet stream per row."""
    if plane.dtype != np.uint8 or plane.ndim != 2:
        raise ValueError(
            f"encode_plane takes an (H, W) uint8 plane, not {plane.dtype} {plane.shape}"
        )
    height, width = plane.shape
    plane = np.ascontiguousarray(plane)
    # Three equal samples in a row start a run that pays (a pair saves nothing); every
    # 16th position (250 in a 4000-pixel row) estimates their share at 1/7 the cost.
    first, second, third = (plane[:, k : width - 2 + k : _SAMPLE_STEP] for k in range(3))
    sampled = (first == second) & (second == third)
    run_starts = sampled.view(np.uint8).sum(axis=1, dtype=np.uint32)
    runny = run_starts * _RUN_SHARE_DIVISOR > sampled.shape[1]
    if runny.all():  # flat planes (the opaque transparency): the C encoder alone
        run_rows, run_lengths = _run_rows(plane, version)
        return EncodedPlane(run_lengths, b"".join([_lengths(run_lengths, version), run_rows]))
    literal_length = _literal_length(width)
    lengths = np.full(height, literal_length, np.int64)
    if not runny.any():  # photographic planes: written straight into the payload
        header = _lengths(lengths, version)
        payload = bytearray(len(header) + height * literal_length)
        payload[: len(header)] = header
        body = np.frombuffer(payload, np.uint8, offset=len(header))
        _literal_rows(plane, body.reshape(height, literal_length))
        return EncodedPlane(lengths, payload)
    # Every row as literals (one copy, cheaper than picking rows out first) ...
    literal = _literal_rows(plane, np.empty((height, literal_length), np.uint8))
    # ... and the rows with runs again through the C encoder; then the rows back in
    # order, one slice per stretch of rows of the same kind, joined once.
    run_rows, run_lengths = _run_rows(plane[runny], version)
    lengths[runny] = run_lengths
    pieces: list[memoryview] = []
    literal_view = memoryview(literal.reshape(-1))
    run_offsets = np.concatenate([[0], np.cumsum(run_lengths)])
    edges = np.flatnonzero(np.diff(runny.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [height]])
    run_done = 0
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        if runny[start]:
            count = stop - start
            pieces.append(run_rows[run_offsets[run_done] : run_offsets[run_done + count]])
            run_done += count
        else:
            pieces.append(literal_view[start * literal_length : stop * literal_length])
    return EncodedPlane(lengths, b"".join([_lengths(lengths, version), *pieces]))


def _literal_length(width: int) -> int:
    """Bytes of a row written as literal packets: a header byte per 128 samples."""
    full, rest = divmod(width, _PACKET)
    return full * (_PACKET + 1) + (rest + 1 if rest else 0)


def _literal_rows(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows as literal packets only, into ``out`` (rows, literal length): one numpy copy."""
    count, width = rows.shape
    full, rest = divmod(width, _PACKET)
    body = out[:, : full * (_PACKET + 1)].reshape(count, full, _PACKET + 1)
    body[:, :, 0] = _PACKET - 1  # header n - 1: copy the next n bytes
    body[:, :, 1:] = rows[:, : full * _PACKET].reshape(count, full, _PACKET)
    if rest:
        out[:, full * (_PACKET + 1)] = rest - 1
        out[:, full * (_PACKET + 1) + 1 :] = rows[:, full * _PACKET :]
    return out


def _run_rows(rows: np.ndarray, version: int) -> tuple[memoryview, np.ndarray]:
    """Rows through psd-tools' C encoder: (their bytes, each row's length)."""
    count, width = rows.shape
    encoded = encode_rle(rows.tobytes(), width, count, 8, version)
    size = 2 if version == 1 else 4
    lengths = np.frombuffer(encoded, ">u2" if version == 1 else ">u4", count).astype(np.int64)
    return memoryview(encoded)[count * size :], lengths
