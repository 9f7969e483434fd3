"""User-facing errors.

A `QccError` is a mistake in what the user gave us (a model, a recipe, an input):
the CLI prints it as one line and exits with code 2.  Anything else that escapes
is a bug in qcc and keeps its traceback.
"""


class QccError(Exception):
    """A user error: `what` went wrong, `where` (a file, op or field), `hint`."""

    def __init__(self, what: str, where: str | None = None, hint: str | None = None):
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: error: {self.what}" if self.where else f"error: {self.what}"
        return f"{text} ({self.hint})" if self.hint else text
