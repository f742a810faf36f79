"""ChatStream: a chat too large to hold whole, sent piece by piece from its open blob."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from qp.storage.blobs import BlobReader

# Chats up to this size are read whole (and cached); larger ones are sent in pieces of it.
CHUNK_BYTES = 256 * 1024


@dataclass
class ChatStream:
    """A chat too large to hold whole: its JSON is `head`, then `first` and the rest of the
    open blob, then `tail`. Whoever gets one sends it and closes it."""

    head: bytes
    first: bytes
    blob: BlobReader
    tail: bytes

    @property
    def size(self) -> int:
        return len(self.head) + self.blob.size + len(self.tail)

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        """The JSON in pieces of at most CHUNK_BYTES; the blob is closed at the end."""
        try:
            yield self.head
            yield self.first
            while piece := await self.blob.read(CHUNK_BYTES):
                yield piece
            yield self.tail
        finally:
            await self.blob.close()

    async def read_all(self) -> bytes:
        return b"".join([piece async for piece in self.pieces()])


async def read_to_end(reader: BlobReader) -> bytes:
    pieces = []
    while piece := await reader.read(CHUNK_BYTES):
        pieces.append(piece)
    return b"".join(pieces)
