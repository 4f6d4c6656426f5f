"""One exception type for bad user input (flags, files, data), so the CLIs can print a
single line that names the fix and exit with status 2 instead of a deep traceback."""


class NanoQ4Error(Exception):
    """A problem the user can fix; the message is one line and says how."""
