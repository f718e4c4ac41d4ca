"""The response components of OpenAI's published OpenAPI document that loraserve answers
with, written out as JSON Schema (required fields, types, nullability, enums), for
tests/server/test_api_shapes.py. Names are the document's component names.

Where OpenAI's own service differs from its document, the service wins and a comment
says so. vLLM's extra fields (`stop_reason`, `prompt_logprobs`, `token_ids`, ...) are
allowed: the document's objects do not forbid additional properties.
"""

from __future__ import annotations

from typing import Any


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}

CompletionUsage = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER},
}

ChatCompletionTokenLogprob = {
    "type": "object",
    "required": ["token", "logprob", "bytes", "top_logprobs"],
    "properties": {
        "token": STRING,
        "logprob": NUMBER,
        "bytes": nullable({"type": "array", "items": INTEGER}),
        "top_logprobs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["token", "logprob", "bytes"],
                "properties": {
                    "token": STRING,
                    "logprob": NUMBER,
                    "bytes": nullable({"type": "array", "items": INTEGER}),
                },
            },
        },
    },
}

ChatLogprobs = nullable(
    {
        "type": "object",
        "required": ["content", "refusal"],
        "properties": {
            "content": nullable({"type": "array", "items": ChatCompletionTokenLogprob}),
            "refusal": nullable({"type": "array", "items": ChatCompletionTokenLogprob}),
        },
    }
)

ChatCompletionMessageToolCall = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": STRING,
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": STRING, "arguments": STRING},
        },
    },
}

ChatCompletionResponseMessage = {
    "type": "object",
    "required": ["role", "content", "refusal"],
    "properties": {
        "role": {"enum": ["assistant"]},
        "content": nullable(STRING),
        "refusal": nullable(STRING),
        "tool_calls": {"type": "array", "items": ChatCompletionMessageToolCall},
    },
}

CHAT_FINISH_REASONS = ["stop", "length", "tool_calls", "content_filter", "function_call"]

CreateChatCompletionResponse = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": STRING,
        "object": {"enum": ["chat.completion"]},
        "created": INTEGER,
        "model": STRING,
        "system_fingerprint": STRING,
        "usage": CompletionUsage,
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason", "logprobs"],
                "properties": {
                    "index": INTEGER,
                    "message": ChatCompletionResponseMessage,
                    "finish_reason": {"enum": CHAT_FINISH_REASONS},
                    "logprobs": ChatLogprobs,
                },
            },
        },
    },
}

ChatCompletionMessageToolCallChunk = {
    "type": "object",
    "required": ["index"],
    "properties": {
        "index": INTEGER,
        "id": STRING,
        "type": {"enum": ["function"]},
        "function": {"type": "object", "properties": {"name": STRING, "arguments": STRING}},
    },
}

ChatCompletionStreamResponseDelta = {
    "type": "object",
    "properties": {
        "content": nullable(STRING),
        # Not nullable: sent with the first chunk, left out after (OpenAI's service too).
        "role": {"enum": ["developer", "system", "user", "assistant", "tool"]},
        "tool_calls": {"type": "array", "items": ChatCompletionMessageToolCallChunk},
        "refusal": nullable(STRING),
    },
}

CreateChatCompletionStreamResponse = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": STRING,
        "object": {"enum": ["chat.completion.chunk"]},
        "created": INTEGER,
        "model": STRING,
        "usage": nullable(CompletionUsage),
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "delta", "finish_reason"],
                "properties": {
                    "index": INTEGER,
                    "delta": ChatCompletionStreamResponseDelta,
                    "finish_reason": nullable({"enum": CHAT_FINISH_REASONS}),
                    "logprobs": ChatLogprobs,
                },
            },
        },
    },
}

CompletionLogprobs = nullable(
    {
        "type": "object",
        "properties": {
            "text_offset": {"type": "array", "items": INTEGER},
            # The document says numbers; the service sends null for the first echoed token.
            "token_logprobs": {"type": "array", "items": nullable(NUMBER)},
            "tokens": {"type": "array", "items": STRING},
            "top_logprobs": {
                "type": "array",
                "items": nullable({"type": "object", "additionalProperties": NUMBER}),
            },
        },
    }
)

CreateCompletionResponse = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": STRING,
        "object": {"enum": ["text_completion"]},
        "created": INTEGER,
        "model": STRING,
        "system_fingerprint": STRING,
        "usage": CompletionUsage,
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "text", "finish_reason", "logprobs"],
                "properties": {
                    "index": INTEGER,
                    "text": STRING,
                    # Null in a stream's chunks before the last (OpenAI's service does so).
                    "finish_reason": nullable({"enum": ["stop", "length", "content_filter"]}),
                    "logprobs": CompletionLogprobs,
                },
            },
        },
    },
}

Model = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": STRING,
        "object": {"enum": ["model"]},
        "created": INTEGER,
        "owned_by": STRING,
    },
}

ListModelsResponse = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"enum": ["list"]}, "data": {"type": "array", "items": Model}},
}

ErrorResponse = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": STRING,
                "type": STRING,
                "param": nullable(STRING),
                "code": nullable(STRING),
            },
        }
    },
}
