"""The one exception type for bad user input, and the CLI wrapper that prints it without a traceback."""
import sys


class UserError(Exception):
    """Bad input (missing file, unknown key, misfit checkpoint, ...); the message names the problem and the fix."""


def run_cli(main, *args, cleanup=None):
    """Runs a command-line entry point: a UserError prints one `error:` line and exits with status 2."""
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if cleanup is not None:
            cleanup()
