"""`python -m qp check`: what in the database and the blob store cannot be served, and,
with --repair, its removal.

Findings younger than `min_age` seconds are left alone, so a check next to a running
server never mistakes a write in progress for damage.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime

import orjson

from qp.blobs import BlobStore, chat_key
from qp.chat_model import CHAT_ID_PATTERN, is_messages_array
from qp.chat_store import ChatStore, blob_matches
from qp.db import Database

CHAT_KEY = re.compile(rf"chats/({CHAT_ID_PATTERN.pattern})\.json")


@dataclass(frozen=True)
class Finding:
    kind: str  # interrupted-write, row-without-blob, blob-without-row, unreadable-blob
    chat_id: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.chat_id}" + (f" ({self.detail})" if self.detail else "")


async def find_problems(db: Database, blobs: BlobStore, min_age: float) -> list[Finding]:
    """Everything that cannot be served, oldest first by kind."""
    cutoff = time.time() - min_age
    findings: list[Finding] = []
    pending_rows = await db.pending_chats()
    pending = {row.chat_id for row, _ in pending_rows}
    for row, intent in pending_rows:
        if _epoch(row.updated_at) > cutoff:
            continue
        # A write whose blob was stored is done; only its bookkeeping lagged behind.
        note = orjson.loads(intent)
        if not await blob_matches(blobs, row.chat_id, note["sha256"]):
            findings.append(Finding("interrupted-write", row.chat_id, note["op"]))
    stored = {}
    async for blob in blobs.listing("chats/"):
        match = CHAT_KEY.fullmatch(blob.key)
        if match:
            stored[match.group(1)] = blob
    rows = dict(await db.all_chat_ids())
    for chat_id, updated_at in sorted(rows.items()):
        if chat_id in pending or _epoch(updated_at) > cutoff:
            continue
        if chat_id not in stored:
            findings.append(Finding("row-without-blob", chat_id))
        else:
            content = await blobs.get(chat_key(chat_id))
            if content is not None and not is_messages_array(content):
                findings.append(Finding("unreadable-blob", chat_id, "not a JSON array"))
    for chat_id, blob in sorted(stored.items()):
        if chat_id not in rows and blob.modified <= cutoff:
            findings.append(Finding("blob-without-row", chat_id))
    return findings


async def repair(
    findings: list[Finding], db: Database, blobs: BlobStore, store: ChatStore
) -> list[str]:
    """Finish or undo interrupted writes; remove rows and blobs that cannot be served."""
    done: list[str] = []
    if any(f.kind == "interrupted-write" for f in findings):
        finished, undone = await store.recover()
        done.append(f"interrupted writes: {finished} finished, {undone} undone")
    for finding in findings:
        if finding.kind in ("row-without-blob", "unreadable-blob"):
            await store.delete(finding.chat_id)
            done.append(f"removed chat {finding.chat_id} ({finding.kind})")
        elif finding.kind == "blob-without-row":
            await blobs.delete(chat_key(finding.chat_id))
            done.append(f"removed blob {chat_key(finding.chat_id)} (no row)")
    return done


def _epoch(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0
