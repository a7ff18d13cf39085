"""TensorBoard scalars without TensorFlow: `EventWriter(logdir, keep_until=step, primary=...)` writes the standard
event file format (docs/tensorboard.md), which `tensorboard --logdir` and any event reader read.

The format is small enough to write here rather than depend on tensorboardX: a file is a sequence of TFRecords
(length, masked CRC-32C of the length, the bytes, their masked CRC-32C), each an `Event` protocol buffer; the first
one names the file version, the others hold a `Summary` of scalar values at a step. Encoding those three messages
takes a few lines, and reading them back is what the purge on resume needs anyway.

On resume, the events of steps after the restored one are purged from the existing files (rewritten, not merely
hidden), so that a curve has exactly one value per step whatever reads it.
"""
import glob
import os
import socket
import struct
import time

FILE_VERSION = b"brain.Event:2"


# ------------------------------------------------------------------------------------------------ framing
def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data):
    """CRC-32C (Castagnoli), the checksum of TFRecords."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data):
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data):
    """One TFRecord: uint64 length, masked CRC of the length, the bytes, masked CRC of the bytes (little endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def read_records(path):
    """The records of a TFRecord file, up to the first incomplete or damaged one (a write cut off by a kill)."""
    with open(path, "rb") as f:
        blob = f.read()
    records, at = [], 0
    while at + 12 <= len(blob):
        length_bytes = blob[at:at + 8]
        (length,), (length_crc,) = struct.unpack("<Q", length_bytes), struct.unpack("<I", blob[at + 8:at + 12])
        end = at + 12 + length + 4
        if length_crc != _masked_crc(length_bytes) or end > len(blob):
            break
        data = blob[at + 12:at + 12 + length]
        if struct.unpack("<I", blob[end - 4:end])[0] != _masked_crc(data):
            break
        records.append(data)
        at = end
    return records


# ------------------------------------------------------------------------------------------------ protos
def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, wire_type):
    return _varint(number << 3 | wire_type)


def _bytes_field(number, data):
    return _field(number, 2) + _varint(len(data)) + data


def scalar_event(step, values, wall_time=None):
    """An Event{wall_time=1, step=2, summary=5: Summary{value=1: Value{tag=1, simple_value=2}}} of `values`
    ({tag: number})."""
    summary = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(value)))
        for tag, value in values.items())
    return (_field(1, 1) + struct.pack("<d", time.time() if wall_time is None else wall_time)
            + _field(2, 0) + _varint(int(step)) + _bytes_field(5, summary))


def version_event():
    return _field(1, 1) + struct.pack("<d", time.time()) + _bytes_field(3, FILE_VERSION)


def event_step(event):
    """The `step` field of an encoded Event (0 when absent, as protobuf reads it)."""
    at = 0
    while at < len(event):
        key, at = _read_varint(event, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = _read_varint(event, at)
            if number == 2:
                return value
        elif wire_type == 1:
            at += 8
        elif wire_type == 5:
            at += 4
        elif wire_type == 2:
            length, at = _read_varint(event, at)
            at += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
    return 0


def _read_varint(data, at):
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


# ------------------------------------------------------------------------------------------------ the writer
def event_files(logdir):
    return sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))


def purge_after(logdir, step):
    """Drop the events of steps after `step` from the event files in `logdir` (a file left with none is removed);
    each file is rewritten through a temporary name that TensorBoard does not read."""
    for path in event_files(logdir):
        records = read_records(path)
        kept = [r for r in records[1:] if event_step(r) <= step]
        if not kept:
            os.remove(path)
        elif len(kept) != len(records) - 1 or os.path.getsize(path) != sum(len(frame(r)) for r in records):
            temporary = os.path.join(logdir, ".purge.tmp")
            with open(temporary, "wb") as f:
                f.write(b"".join(frame(r) for r in records[:1] + kept))
            os.replace(temporary, path)


class EventWriter:
    """Scalars of one run into `logdir` (e.g. `<workdir>/tb`): a new event file per session, after the events of
    steps past `keep_until` were purged from the earlier ones (None: keep all). Only `primary` (process 0) writes;
    elsewhere every method is a no-op. Each call is flushed, so a killed run loses nothing it logged."""

    def __init__(self, logdir, keep_until=None, primary=True):
        self.file = None
        if not primary:
            return
        os.makedirs(logdir, exist_ok=True)
        if keep_until is not None:
            purge_after(logdir, keep_until)
        existing = len(event_files(logdir))
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.{existing}"
        self.file = open(os.path.join(logdir, name), "wb")
        self._write(version_event())

    def _write(self, event):
        self.file.write(frame(event))
        self.file.flush()

    def scalars(self, step, values):
        """`values` ({tag: number}, e.g. {"train/loss": 0.3}) at `step`, as one event."""
        if self.file is not None and values:
            self._write(scalar_event(step, values))

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def epoch_scalars(record):
    """The TensorBoard scalars of a metrics.jsonl record: evaluations as eval/<key> (top1, ema_top1, ...), the
    epoch's training means and images/s as epoch/<key>, the teacher's evaluation as teacher/<key>."""
    out = {}
    for key, value in record.items():
        if key in ("epoch", "step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("teacher_"):
            out[f"teacher/{key[len('teacher_'):]}"] = value
        elif key.startswith("train_") or key in ("images_per_s", "elapsed_s", "skipped_steps"):
            out[f"epoch/{key}"] = value
        else:
            out[f"eval/{key}"] = value
    return out
