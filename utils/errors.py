"""The one exception type for bad user input, its warning, and the CLI wrapper that prints both without a
traceback."""
import argparse
import errno
import sys
import warnings


class UserError(ValueError):
    """Bad input (missing file, unknown key, misfit checkpoint, ...); the message names the problem and the fix.
    A ValueError, so Python callers of the pipeline can catch it as one."""


class InputWarning(UserWarning):
    """Input that runs, but not wholly as given (a prompt longer than the text encoder reads); the CLIs print it as
    one `warning:` line."""


def first_line(error):
    """The first line of an exception message, without a trailing period (ffmpeg's errors append its whole log)."""
    text = own_message(error)
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def own_message(error):
    """An exception's message; for one a DataLoader worker raised, the worker's message without its traceback."""
    text = str(error).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


# File-system conditions that are the user's to fix, and what to tell them.
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
FULL_TEXTS = ("No space left on device", "Disk quota exceeded")  # libraries that wrap the OSError (safetensors, ffmpeg)


def disk_error(error, path=None):
    """A UserError for a file-system condition (full disk, quota, read-only, permissions) hidden in `error`, its
    cause or its message; None when it is something else."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            reason = DISK_ERRNOS[seen.errno]
            path = path or seen.filename
            break
        if any(text in str(seen) for text in FULL_TEXTS):
            reason = DISK_ERRNOS[errno.ENOSPC]
            break
        seen = seen.__cause__ or seen.__context__
    else:
        return None
    full = "space" in reason or "quota" in reason
    where = (f" writing {path}" if full else f": {path}") if path else ""
    fix = "free some space or write elsewhere" if full else "use a file or folder you have access to"
    return UserError(f"{reason}{where}; {fix}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one `error:` line and exit status 2 through run_cli."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def run_cli(main, *args, cleanup=None, on_interrupt=None):
    """Runs a command-line entry point: a UserError, or a full disk or missing permission, prints one `error:` line
    and exits with status 2 (Ctrl-C: 130, with `on_interrupt`, what to do next); an InputWarning prints one
    `warning:` line."""
    try:
        with warnings.catch_warnings():  # restores the printer on the way out
            warnings.showwarning = _show_warning
            return main(*args)
    except UserError as e:
        _fail(own_message(e))
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which checkpoints first): no traceback
        _fail("interrupted (Ctrl-C)" + (f"; {on_interrupt}" if on_interrupt else ""), status=130)
    except Exception as e:  # a full disk can surface from deep inside torch, safetensors or ffmpeg
        found = disk_error(e)
        if found is None:
            raise
        _fail(found)
    finally:
        if cleanup is not None:
            cleanup()


def _fail(error, status=2):
    """Close the progress bars the failure left open (so the error starts a line of its own), print it, exit."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    print(f"error: {error}", file=sys.stderr)
    sys.exit(status)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """InputWarnings as one line above the progress bars; the others as Python prints them."""
    if not issubclass(category, InputWarning):
        return _default(message, category, filename, lineno, file, line)
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)
