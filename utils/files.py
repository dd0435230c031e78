"""Atomic file writes: a result keeps its final name only once it is complete.

Every output of the project (PNG, MP4, JSON, YAML, safetensors) goes through `atomic_path`: the writer fills a
temporary file with a unique name in the same folder, which is renamed over the final name when it is complete
and removed when writing fails (a full disk, an interrupt). Two processes writing the same output never share a
temporary file, and a reader sees the old file or the new one, never half of one.
"""
import contextlib
import json
import os
import uuid


@contextlib.contextmanager
def atomic_path(path):
    """Yields a unique temporary path beside `path` (same extension, so writers infer the format); on success it
    replaces `path`, on any error it is removed and `path` is left as it was."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.{uuid.uuid4().hex[:12]}.tmp{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path, data):
    """Write indented JSON atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")
