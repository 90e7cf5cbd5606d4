"""What /api/caption and the library routes take and answer, as pydantic models and the OpenAPI text
/docs shows. The decoding options' names, types, ranges and help come from their one table
(decoding_options.py)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..decoding_options import LIMITS, OPTIONS


def _option_field(name: str) -> tuple[Any, Any]:
    f = OPTIONS[name]
    text = f.metadata["help"]
    if name not in LIMITS:
        return type(f.default) | None, Field(None, description=f"{text}; default: the model's")
    low, high = LIMITS[name]
    return type(f.default) | None, Field(None, ge=low, le=high, description=f"{text}; {low:g} to {high:g}; "
                                                                             "default: the model's")


class _Strict(BaseModel):
    """Unknown fields are refused: a misspelt option silently ignored would hand the client default
    decoding it did not ask for."""

    model_config = ConfigDict(extra="forbid")


_BASE64 = "the image file, base64-encoded (a data: URL works too)"
_FIELDS: dict[str, Any] = {name: _option_field(name) for name in OPTIONS}
_FIELDS["attention"] = (bool, Field(False, description="also answer each word's attention map of the best caption"))
# Built from the table at import, so their type is their base's: read their fields with model_dump().
Options: type[_Strict] = create_model("Options", __base__=_Strict, __doc__="Decoding options of a request; any left "
                                      "out take the model's defaults.", **_FIELDS)
JsonRequest: type[_Strict] = create_model("JsonRequest", __base__=Options, image=(str, Field(description=_BASE64)))
# Hugging Face's JSON form of image-to-text, which /api/image-to-text takes too: its clients send it when given
# parameters; here the parameters are the decoding options.
_HUGGING_FACE: dict[str, Any] = {"inputs": (str, Field(description=_BASE64)), "parameters": (Options | None, Field(
    None, description="decoding options, as /api/caption takes them"))}
HuggingFaceRequest: type[_Strict] = create_model("HuggingFaceRequest", __base__=_Strict, **_HUGGING_FACE)


class CaptionOut(BaseModel):
    generated_text: str
    score: float | None = Field(description="log-probability, length-normalised when length_penalty > 0; null "
                                            "for a caption of a similar photo that consensus or the concept check "
                                            "chose")
    agreement: float | None = Field(None, description="where the captions of similar photos voted (consensus on, "
                                                      "the concept check fired, or the photo is unlike the model's "
                                                      "training photos): how far they agree with this one (the "
                                                      "decoder's get decoder_lean on top, none for such a photo)")
    source: Literal["decoder", "datastore"] | None = Field(None, description="where they voted: written by the "
                                                            "decoder, or a caption of a similar photo")


class Timing(BaseModel):
    total_ms: float = Field(description="from the request's arrival to its answer")
    decode_ms: float = Field(description="reading, checking and resizing the image")
    queue_ms: float = Field(description="waiting for the batch")
    model_ms: float = Field(description="the batch's encoder and decoder pass")
    batch_size: int = Field(description="images in the batch this one ran in")


class AttentionOut(BaseModel):
    words: list[str]
    grid: list[int] = Field(description="[rows, columns] of the encoder's feature map")
    maps: list[list[list[float]]] = Field(description="one rows x columns map per word, summing to 1; empty for a "
                                                      "caption of a similar photo, which the decoder did not write")


class ConceptOut(BaseModel):
    word: str = Field(description="a caption word for what the encoder's ImageNet head recognised")
    probability: float = Field(description="the head's probability of it, summed over the classes it names")


class NeighbourOut(BaseModel):
    caption: str = Field(description="a human caption of a similar photo, from the model's caption datastore")
    similarity: float = Field(description="cosine of the photo's vector and the caption's")


class SearchHit(BaseModel):
    file: str = Field(description="the photo's path in the library, as the JSONL names it; "
                                  "/api/thumbnail?file=... shows it")
    score: float = Field(description="cosine of the query and the photo's caption and concepts")
    caption: str
    concepts: list[ConceptOut]


class GeneratedText(BaseModel):
    generated_text: str


class CaptionResponse(BaseModel):
    model: str
    captions: list[CaptionOut]
    concepts: list[ConceptOut] = Field(description="what the encoder recognised, most probable first (for "
                                                   "tagging; captions mention the confident ones)")
    neighbours: list[NeighbourOut] | None = Field(None, description="a retrieval model's captions of similar photos, "
                                                                    "which it read while writing, nearest first")
    timing: Timing
    attention: AttentionOut | None = None


# The request body as /docs shows it (the route reads the body itself, to take multipart and JSON alike).
OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}, **Options.model_json_schema()["properties"]}}},
    "application/json": {"schema": JsonRequest.model_json_schema()}}}}
RAW_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "inputs": {"type": "string", "description": _BASE64},
        "parameters": {"type": "object", "description": HuggingFaceRequest.model_fields["parameters"].description,
                       "properties": Options.model_json_schema()["properties"]}}}}}}}
CAPTION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "not an image, corrupt, truncated or too narrow; an empty body; bad base64 in "
                         "Hugging Face's JSON"},
    401: {"description": "the server has an API key and the request did not bear it"},
    413: {"description": "file or pixel count over the server's limits"},
    415: {"description": "not multipart, JSON or an image body"},
    422: {"description": "bad or unknown option"},
    429: {"description": "this client has the most requests in flight the server allows"},
    500: {"description": "a fault of the server; its log has the details under error_id"},
    503: {"description": "the queue is full, or the server is shutting down"}}
