"""Request bodies, validated at the edge: every bad field is named in a 400 before anything runs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..hierarchy import DEFAULT_DOMAIN, DEFAULT_SWARM

MAX_PROMPT_CHARS = 32_000
MAX_TOKENS = 2048  # the model's context bounds it further (checked per request)
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid UTF-8 text (character {e.start} is a lone surrogate)") from None
    return text


def _integral(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Whole(**bounds):  # noqa: N802 - a type
    """An integer as JSON Schema has it: 3 and 3.0, never true or "3" (the bodies are strict)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_utf8)]
Stop = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_utf8)]


# Bounds that depend on the served model: the OpenAPI document states them (server.protocol.document_api).
CONTEXT = {"x-model-limit": "context"}  # new tokens: fewer than the model's context
VOCABULARY = {"x-model-limit": "vocabulary"}  # token ids: below the vocabulary's size


def streamed_only_if(plain: dict) -> dict:
    """The JSON schema of "stream: true only with these fields as given" (a stream sends text, one choice)."""
    return {"anyOf": [{"not": {"required": ["stream"]}}, {"properties": {"stream": {"const": False}}}, plain]}


def exactly_one_of(first: str, second: str) -> dict:
    """The JSON schema of "exactly one of these two fields" (pydantic states no model validator's rule)."""
    return {
        "oneOf": [
            {"required": [first], "not": {"required": [second]}},
            {"required": [second], "not": {"required": [first]}},
        ]
    }


class Body(BaseModel):
    # strict: a value is of its JSON type (no "true" for a boolean, no 1 for true); unknown fields are ignored
    # (the openai client sends fields we do not use)
    model_config = ConfigDict(extra="ignore", strict=True)


MAX_SEED = 2**53 - 1  # the largest integer every JSON reader holds exactly
MAX_PROMPTS = 16  # prompts in one /v1/completions request (one choice each)
MAX_TOP_LOGPROBS = 20


class Sampling(Body):
    model: str = Field(min_length=1, max_length=200)
    max_tokens: Whole(ge=0, le=MAX_TOKENS) | None = Field(
        default=None, description="0: score only (with echo)", json_schema_extra=CONTEXT
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Whole(ge=1, le=1) = 1
    stream: bool = False
    stop: Stop | list[Stop] | None = Field(default=None)
    stream_options: dict | None = None
    seed: Whole(ge=0, le=MAX_SEED) | None = Field(default=None, description="sampling: the same seed, the same tokens")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop[:4])


TokenIds = Annotated[list[Whole(ge=0, json_schema_extra=VOCABULARY)], Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class CompletionRequest(Sampling):
    model_config = ConfigDict(
        json_schema_extra=streamed_only_if(
            {
                "properties": {
                    "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]},
                    "echo": {"const": False},
                    "logprobs": {"type": "null"},
                }
            }
        )
    )
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="text, token ids, or a list of either (one choice each)")
    logprobs: Whole(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(
        default=None, description="log-probabilities of each token and this many top ones"
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
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {  # top_logprobs needs logprobs: true
                    "anyOf": [
                        {"not": {"required": ["top_logprobs"]}},
                        {"properties": {"top_logprobs": {"type": "null"}}},
                        {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
                    ]
                },
                streamed_only_if({"properties": {"logprobs": {"const": False}}}),
            ]
        }
    )
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: Whole(ge=1, le=MAX_TOKENS) | None = Field(
        default=None, description="a reply needs at least one", json_schema_extra=CONTEXT
    )
    max_completion_tokens: Whole(ge=1, le=MAX_TOKENS) | None = Field(default=None, json_schema_extra=CONTEXT)
    logprobs: bool = Field(default=False, description="log-probabilities of the reply's tokens")
    top_logprobs: Whole(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(default=None, description="needs logprobs")


# Optional fields of the bodies below default to None but are not nullable: an explicit null is rejected
# (defaults are not validated), so the schema's "a string, or absent" is what is served.
class PromptOrMessages(Body):
    """A prompt as text or as a conversation (exactly one), for the agent ``model``."""

    model_config = ConfigDict(json_schema_extra=exactly_one_of("prompt", "messages"))
    model: str = Field(min_length=1, max_length=200, description="the agent")
    prompt: Text = Field(default=None, description="the prompt as text (or give messages)")
    messages: list[Message] = Field(
        default=None, min_length=1, max_length=256, description="a conversation, read through the chat template"
    )

    @model_validator(mode="after")
    def one_prompt(self) -> PromptOrMessages:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (text) or messages (a conversation)")
        return self


class LearnRequest(PromptOrMessages):
    completion: Text = Field(description="the reply the agent should have given")
    critical: bool = False


class ForgetRequest(PromptOrMessages):
    """What the agent taught for this prompt is taken back."""


class RegisterRequest(Body):
    id: str = Field(pattern=NAME)
    swarm: str = Field(default=DEFAULT_SWARM, pattern=NAME)
    domain: str = Field(default=DEFAULT_DOMAIN, pattern=NAME)


class FeedbackRequest(Body):
    model_config = ConfigDict(json_schema_extra=exactly_one_of("accepted", "correction"))
    id: str = Field(min_length=1, max_length=100, description="the id of a completion this server gave")
    accepted: Literal[True] = Field(default=None, description="true: learn the reply as it was given")
    correction: Text = Field(default=None, description="the reply the agent should have given")

    @model_validator(mode="after")
    def one_verdict(self) -> FeedbackRequest:
        if (self.accepted is None) == (self.correction is None):
            raise ValueError("give exactly one of accepted: true (learn the reply) or correction (the right reply)")
        return self
