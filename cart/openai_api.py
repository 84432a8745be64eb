"""Request bodies of ``cart serve``'s OpenAI-compatible API, as strict pydantic models.

Strict: an unknown field, a wrong type or an out-of-range value is a 400 that names the field,
never silently ignored -- a client that asks for ``logprobs`` or ``top_p=0.9`` learns that it
is not supported instead of getting something else. Two fields extend OpenAI's API, as vLLM
does: ``cartridges`` (compose these cartridges for this request) and ``ignore_eos``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 4
MAX_STOP_CHARS = 256  # each stop string is looked for in the text at every token
MAX_N = 8


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _encodable(v: str) -> str:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python keeps it, and the tokenizer
    then fails on it (an internal error). Text must be valid Unicode."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode: a lone surrogate ({v[e.start]!r}) at character "
                         f"{e.start}") from None
    return v


Text = Annotated[str, AfterValidator(_encodable)]  # text that reaches the tokenizer


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """Fields shared by both endpoints."""

    model: str = Field(min_length=1)
    cartridges: Optional[list[str]] = Field(default=None, min_length=1, max_length=16)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[Text, list[Text]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    ignore_eos: bool = False

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if v is not None and v != 1:
            raise ValueError("only top_p=1 is supported (sampling uses the whole distribution)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _unsupported(v):
    """For fields accepted only when they ask for nothing (false, 0 or null)."""
    if v:
        raise ValueError("not supported by this server")
    return v


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = None

    _no_logprobs = field_validator("logprobs")(_unsupported)


class CompletionRequest(Sampling):
    prompt: Union[Text, list[Text]]
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= MAX_N:
            raise ValueError(f"give 1 to {MAX_N} prompts")
        return v

    _no_echo_or_logprobs = field_validator("echo", "logprobs")(_unsupported)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of the 400 for a request that failed validation (pydantic's
    ``errors()``): ``param`` is the field's dotted path. A value error wins over the others: in
    a union (a prompt is a string or a list of them) it is the branch the value had the shape
    of, and the others only say that it is not of their type."""
    err = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # a union's branch name (str, list[...]) in the location says nothing to the user
    loc = [p for p in loc if not (p in ("str", "int", "float", "bool") or "[" in p
                                  or p.startswith("function-"))]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (not supported by this server)"
    elif err.get("type") == "json_invalid":
        msg, param = "the body is not valid JSON", None
    return (f"{param}: {msg}" if param else msg), param


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
