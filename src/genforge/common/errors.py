"""The one error type users see. Every failure a user can cause raises a subclass.

The CLI prints `str(err)` on one line and exits 2; the server maps `status` and `param`
onto an OpenAI-style error object.
"""

from __future__ import annotations


class GenforgeError(Exception):
    """A failure the user caused and can fix; the message says what was wrong and how to fix it."""

    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ConfigError(GenforgeError):
    """A recipe or option is wrong: unknown key, bad type, value out of range."""


class DataError(GenforgeError):
    """Input data is missing, empty, corrupt or does not support what was asked."""


class RunError(GenforgeError):
    """A run directory is missing, incomplete, or incompatible with what was asked."""


class NotFoundError(GenforgeError):
    status = 404
    type = "not_found_error"


class AuthError(GenforgeError):
    status = 401
    type = "authentication_error"


class OverloadedError(GenforgeError):
    status = 503
    type = "server_overloaded"
