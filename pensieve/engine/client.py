"""EngineClient: the async face of the engine. CONTRACT (implementation in progress).

class EngineClient:
    model_name: str
    context_length: int            # max prompt + output tokens per request
    def start(self) -> None        # starts the engine thread (idempotent)
    def shutdown(self) -> None
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationDelta]
        # yields GenerationDelta (see engine/types.py); the last one has finish_reason set.
        # Leaving the loop early (break, aclose, task cancelled on client disconnect) aborts
        # the request and frees its KV. Raises PromptTooLongError before any yield when
        # len(prompt_ids) >= context_length (message: "prompt is too long: N tokens > M maximum").
        # Raises EngineOverloadedError if the waiting queue is full.
"""
