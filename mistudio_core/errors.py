"""The one exception type for mistakes a user can make.

Every error a person can cause (a bad model id, an unreadable corpus, a parameter out of range,
too little memory) is raised as `MistudioError` with a message that says what is wrong and a hint
that says how to fix it. The CLI prints both and exits with status 2; the daemon sends both back
as `{code, message, hint}`. Anything else that escapes is a bug, and is reported as one.
"""

from __future__ import annotations


class MistudioError(Exception):
    """A user-facing error: `message` says what went wrong, `hint` how to put it right."""

    def __init__(self, message: str, hint: str = "", code: str = "bad_input",
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
        self.field = field  # the request field at fault, when there is one (forms mark it)

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, str]:
        document = {"code": self.code, "message": self.message, "hint": self.hint}
        if self.field is not None:
            document["field"] = self.field
        return document
