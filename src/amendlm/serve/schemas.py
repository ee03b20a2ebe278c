"""Request bodies of the OpenAI-compatible endpoints (pydantic): OpenAI's fields plus RAM's.

RAM's rule and its parameters are extra top-level fields (``mode``, ``kl_threshold``, ...; the
``openai`` client sends them with ``extra_body=``); unset ones take the server's defaults.  Fields
outside OpenAI's and RAM's, and OpenAI features this server does not implement (``n`` > 1,
``logprobs``, ``echo``, penalties), are refused with a 400 naming the field rather than ignored.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with token counts (OpenAI's)."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class RAMFields(BaseModel):
    """RAM's rule (:class:`amendlm.ram.decoding.DecodeConfig`): ``None`` = the server's default."""

    model_config = ConfigDict(extra="forbid", strict=True)
    mode: Optional[str] = Field(None, description="par, par-kl, sir, sir-best (best of n), mds, proposal or aligner")
    candidates: Optional[int] = Field(None, description="sir: proposal draws per token")
    kl_threshold: Optional[float] = Field(None, description="par-kl: KL(P_M||Q) in nats above which the proposal is used")
    proposal_top_p: Optional[float] = None
    proposal_top_k: Optional[int] = None
    aligner_top_p: Optional[float] = None
    proposal_temperature: Optional[float] = None
    aligner_temperature: Optional[float] = None
    eos_priority: Optional[bool] = None
    repetition_penalty: Optional[float] = None

    def decode_overrides(self) -> dict:
        """The RAM fields the request set."""
        return {name: value for name in RAMFields.model_fields if (value := getattr(self, name)) is not None}


class SamplingFields(RAMFields):
    """Fields both endpoints share (OpenAI's names and ranges)."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt (n > 1 is not implemented)")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not implemented: only 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not implemented: only 0")
    user: Optional[str] = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a text, a list of texts, token ids, or a list of token-id lists."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = Field(False, description="not implemented: only false")


class TextPart(BaseModel):
    """A text part of a message's content (other part types are refused)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat turn; ``content`` is a text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name of max_tokens")
