"""The completion relay (/api/completion): request checks, key choice, the stream, its usage."""
