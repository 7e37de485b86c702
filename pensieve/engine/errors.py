"""Errors the engine raises to its callers; the API layer maps them to HTTP."""


class EngineError(Exception):
    """Base class for engine-side failures a caller can act on."""


class PromptTooLongError(EngineError):
    def __init__(self, num_tokens: int, max_tokens: int) -> None:
        super().__init__(f"prompt is too long: {num_tokens} tokens > {max_tokens} maximum")
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


class EngineOverloadedError(EngineError):
    """The waiting queue is full; retry later."""


class EngineDeadError(EngineError):
    """The engine loop stopped after an unrecoverable error."""


class EngineRequestRejected(EngineError):
    """The backend refused this request as invalid (an upstream server's 4xx): a 400."""
