"""Decode Foxglove protobuf messages the way the Foxglove app does: from the schema's FileDescriptorSet that
travels with the data (in the MCAP file, or in a WebSocket ``advertise``), not from our own encoder.

``read_mcap(path)`` reads a file with the ``mcap`` library's streaming reader, which needs no summary: a
file cut short by a SIGKILL is read up to its last complete record and ``truncated`` says whether it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from mcap.exceptions import McapError
from mcap.records import Channel, Message, Schema
from mcap.stream_reader import StreamReader


class SchemaDecoder:
    """Protobuf message classes built from FileDescriptorSets, one pool per decoder."""

    def __init__(self) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        self._classes: dict[str, Any] = {}

    def add(self, name: str, data: bytes) -> None:
        if name in self._classes:
            return
        fds = descriptor_pb2.FileDescriptorSet.FromString(data)
        for fd in fds.file:
            try:
                self.pool.Add(fd)
            except TypeError:  # already added by another schema (shared dependencies)
                pass
        self._classes[name] = message_factory.GetMessageClass(self.pool.FindMessageTypeByName(name))

    def decode(self, name: str, data: bytes) -> Any:
        return self._classes[name].FromString(data)


@dataclass
class Recording:
    channels: dict[int, Channel] = field(default_factory=dict)
    schemas: dict[int, Schema] = field(default_factory=dict)
    messages: list[tuple[str, int, Any]] = field(default_factory=list)  # (topic, log_time, decoded)
    truncated: bool = False
    has_footer: bool = False

    def topic(self, name: str) -> list[tuple[int, Any]]:
        return [(t, m) for top, t, m in self.messages if top == name]


def read_mcap(path: Path) -> Recording:
    rec = Recording()
    dec = SchemaDecoder()
    with open(path, "rb") as f:
        reader = StreamReader(f, emit_chunks=False)
        try:
            for r in reader.records:
                if isinstance(r, Schema):
                    rec.schemas[r.id] = r
                    dec.add(r.name, r.data)
                elif isinstance(r, Channel):
                    rec.channels[r.id] = r
                elif isinstance(r, Message):
                    ch = rec.channels[r.channel_id]
                    schema = rec.schemas[ch.schema_id]
                    assert ch.message_encoding == "protobuf" and schema.encoding == "protobuf"
                    rec.messages.append((ch.topic, r.log_time, dec.decode(schema.name, r.data)))
                elif type(r).__name__ == "Footer":
                    rec.has_footer = True
        except (McapError, EOFError, ValueError):  # cut short: a record (or chunk) incomplete at the end
            rec.truncated = True
    return rec


def depth_array(msg: Any) -> np.ndarray:
    assert msg.encoding == "32FC1" and msg.step == 4 * msg.width
    return np.frombuffer(msg.data, "<f4").reshape(msg.height, msg.width)


def cloud_xyz(msg: Any) -> np.ndarray:
    names = {f.name: f.offset for f in msg.fields}
    assert [names[k] for k in "xyz"] == [0, 4, 8]
    raw = np.frombuffer(msg.data, np.uint8).reshape(-1, msg.point_stride)
    return np.ascontiguousarray(raw[:, :12]).view("<f4").reshape(-1, 3)
