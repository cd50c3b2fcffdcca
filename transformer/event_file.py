"""TensorBoard's event file format, written by hand: each record is TFRecord-framed (length,
masked CRC-32C of the length, data, masked CRC-32C of the data) and holds one `Event` protocol
buffer (tensorflow/core/util/event.proto), encoded here field by field.

No tensorboardX and no TensorFlow: tensorboardX's package imports PyTorch whenever it is
installed (the export extra installs it), which cost every `transformer.train` start several
seconds for a few dozen bytes a scalar.
"""

from __future__ import annotations

import math
import struct

# Event's fields (event.proto) and those of the messages it holds.
_WALL_TIME, _STEP, _FILE_VERSION, _SUMMARY, _SESSION_LOG = 1, 2, 3, 5, 7
_SUMMARY_VALUE, _VALUE_TAG, _VALUE_SIMPLE_VALUE = 1, 1, 2
_SESSION_LOG_STATUS, SESSION_START = 1, 1
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):  # Castagnoli's polynomial, bit-reversed
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord frames use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    # TFRecord's mask, so that a CRC of data holding CRCs stays informative.
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    length = struct.pack('<Q', len(data))
    return (length + struct.pack('<I', _masked(crc32c(length))) + data
            + struct.pack('<I', _masked(crc32c(data))))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf writes a negative one: ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _message(field: int, body: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(body)) + body


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    # proto3 leaves fields at their defaults out; fields in number order, as protobuf does.
    out = _key(_WALL_TIME, _FIXED64) + struct.pack('<d', wall_time) if wall_time else b''
    if step:
        out += _key(_STEP, _VARINT) + _varint(step)
    return out + body


def file_version_event(wall_time: float) -> bytes:
    """The event every event file starts with."""
    return _event(wall_time, 0, _message(_FILE_VERSION, b'brain.Event:2'))


def session_start_event(wall_time: float, step: int) -> bytes:
    """SessionLog START at `step`: TensorBoard hides the events of steps >= `step` that earlier
    files wrote (the steps a resumed run writes again)."""
    status = _key(_SESSION_LOG_STATUS, _VARINT) + _varint(SESSION_START)
    return _event(wall_time, step, _message(_SESSION_LOG, status))


def scalar_event(wall_time: float, step: int, tag: str, value: float) -> bytes:
    """One scalar (Summary.Value.simple_value, a float32) under `tag` at `step`."""
    try:
        single = struct.pack('<f', value)
    except OverflowError:  # beyond float32: infinite, as protobuf stores it
        single = struct.pack('<f', math.copysign(math.inf, value))
    value_body = _message(_VALUE_TAG, tag.encode()) + _key(_VALUE_SIMPLE_VALUE, _FIXED32) + single
    return _event(wall_time, step, _message(_SUMMARY, _message(_SUMMARY_VALUE, value_body)))
