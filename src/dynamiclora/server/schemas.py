"""Request bodies, validated at the edge: every bad field is named in a 400 before anything runs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 32_000
MAX_TOKENS = 2048  # the model's context bounds it further (checked per request)
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid UTF-8 text (character {e.start} is a lone surrogate)") from None
    return text


Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_utf8)]
Stop = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_utf8)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the openai client sends fields we do not use


MAX_PROMPTS = 16  # prompts in one /v1/completions request (one choice each)
MAX_TOP_LOGPROBS = 20


class Sampling(Body):
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS, description="0: score only (with echo)")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stop: Stop | list[Stop] | None = Field(default=None)
    stream_options: dict | None = None
    seed: int | None = Field(default=None, ge=0, le=2**62, description="sampling: the same seed, the same tokens")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop[:4])


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class CompletionRequest(Sampling):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="text, token ids, or a list of either (one choice each)")
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="log-probabilities of each token and this many top ones"
    )
    echo: bool = Field(default=False, description="return (and with logprobs, score) the prompt too")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class Message(Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool = Field(default=False, description="log-probabilities of the reply's tokens")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs")


class LearnRequest(Body):
    model: str = Field(min_length=1, max_length=200, description="the agent that learns")
    prompt: Text | None = Field(default=None, description="the prompt as text (or give messages)")
    messages: list[Message] | None = Field(
        default=None, min_length=1, max_length=256, description="a conversation, read through the chat template"
    )
    completion: Text = Field(description="the reply the agent should have given")
    critical: bool = False

    @model_validator(mode="after")
    def one_prompt(self) -> LearnRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (text) or messages (a conversation)")
        return self


class RegisterRequest(Body):
    id: str = Field(pattern=NAME)
    swarm: str | None = Field(default=None, pattern=NAME)
    domain: str | None = Field(default=None, pattern=NAME)


class FeedbackRequest(Body):
    id: str = Field(min_length=1, max_length=100, description="the id of a completion this server gave")
    accepted: bool | None = Field(default=None, description="true: learn the reply as it was given")
    correction: Text | None = Field(default=None, description="the reply the agent should have given")

    @model_validator(mode="after")
    def one_verdict(self) -> FeedbackRequest:
        if (self.accepted is True) == (self.correction is not None):
            raise ValueError("give exactly one of accepted: true (learn the reply) or correction (the right reply)")
        return self
