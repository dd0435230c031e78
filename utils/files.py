"""Atomic file writes: a result keeps its final name only once it is complete.

Every output of the project (PNG, MP4, JSON, YAML, safetensors) goes through `atomic_path`: the writer fills a
temporary file with a unique name in the same folder, which is renamed over the final name when it is complete
and removed when writing fails (a full disk, an interrupt). Two processes writing the same output never share a
temporary file, and a reader sees the old file or the new one, never half of one. A full disk or a folder that
cannot be written is one UserError naming the file.
"""
import contextlib
import json
import os
import uuid

from utils.errors import UserError, disk_error


def check_output_dir(path, what="output folder"):
    """UserError unless `path` is a folder or can become one: it must not be a file, nor lie under one."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a file, not a folder; choose a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{what} '{path}' cannot be created: '{parent}' is a file; choose a folder")


def make_dir(path, what="output folder"):
    """os.makedirs(path, exist_ok=True), with one UserError for a file in the way or a folder that cannot be made."""
    check_output_dir(path, what)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise (disk_error(e, path) or UserError(f"cannot create {what} '{path}': {e.strerror}")) from None
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yields a unique temporary path beside `path` (same extension, so writers infer the format); on success it
    replaces `path`, on any error it is removed and `path` is left as it was."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"'{path}' is a folder, not a file; give a file name")
    folder, name = os.path.split(os.path.abspath(path))
    make_dir(folder, "folder")
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.{uuid.uuid4().hex[:12]}.tmp{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        found = disk_error(e, path)
        if found is None:
            raise
        raise found from None
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


def file_stamp(path):
    """[name, size, mtime_ns] of a file, or of every file under a folder (names relative to it): a file that is
    rewritten, replaced or copied anew gets another stamp."""
    path = os.fspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
    stamps = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            stamps.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return stamps


def read_text(path, what="file"):
    """A UTF-8 text file's contents, without the byte-order mark some Windows editors put first; one UserError for
    a missing, unreadable or non-UTF-8 file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        f"save it as UTF-8") from None
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' not found") from None
    except IsADirectoryError:
        raise UserError(f"{what} '{path}' is a folder, not a file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} '{path}': {e.strerror}") from None
