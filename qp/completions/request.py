"""A CompletionRequest as the contract defines it: validation, key choice, upstream body."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from qp.config import app_key_variable
from qp.errors import ApiError
from qp.policy.policy import INVALID_APP, AppPolicy, Policy
from qp.text import is_storable_text

Payer = Literal["server", "app", "user"]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    system_message: str
    messages: list[Any]
    tools: list[Any]
    app: str | None
    provider: Any
    # The app's policy when the server's or the app's key would pay; None: the client's own.
    rules: AppPolicy | None


class AppRefusal(ApiError):
    """A completion the app's policy refuses (metrics and the admin page count them by
    app and reason: unknown_app, model, cap, prefix)."""

    def __init__(self, app: str | None, reason: str, status: int, error: str, **extra: Any):
        super().__init__(status, error, **extra)
        self.app, self.reason = app, reason


def parse_completion(body: Any, policy: Policy, paid_by_us: bool) -> CompletionRequest:
    """Contract checks 4 and 5: the request's shape (400), then its size (413); and, when
    the server's or the app's key would pay (`paid_by_us`), the app's policy: an app it
    does not know (400), its smaller limits (413)."""
    if not (
        isinstance(body, dict)
        and isinstance(body.get("model"), str)
        and is_storable_text(body["model"])
        and isinstance(body.get("systemMessage"), str)
        and isinstance(body.get("messages"), list)
        and (body.get("tools") is None or isinstance(body["tools"], list))
        and _is_provider(body.get("provider"))
        and _encodable(body)
    ):
        raise ApiError(400, "Invalid completion request")
    app = body.get("app")
    if app is not None and not isinstance(app, str):
        raise ApiError(400, INVALID_APP)
    if app:
        policy.check_app(app)
    rules = None
    if paid_by_us:
        # Its own policy, else the "*" one, else none beyond the contract's: unless the
        # operator wants every app the server's keys pay for to have one.
        rules = policy.app_rules.of(app or None)
        if rules is None and policy.app_rules.require_listed:
            raise AppRefusal(app or None, "unknown_app", 400, "Unknown app")
    messages = body["messages"]
    most = policy.max_messages
    if rules is not None and rules.max_messages is not None and rules.max_messages < most:
        most = rules.max_messages
    if len(messages) > most:
        message = f"Too many messages: {len(messages)} (max: {most})"
        if most < policy.max_messages:
            raise AppRefusal(app or None, "cap", 413, "Request validation failed", message=message)
        raise ApiError(413, "Request validation failed", message=message)
    total = 0
    for index, message in enumerate(messages):
        length = message_chars(message)
        if length > policy.max_message_chars:
            raise ApiError(
                413,
                "Request validation failed",
                message=f"Message {index} too large: {length} characters"
                f" (max: {policy.max_message_chars})",
            )
        total += length
    if rules is not None and rules.max_request_chars is not None:
        total += _js_length(body["systemMessage"])
        if total > rules.max_request_chars:
            raise AppRefusal(
                app or None,
                "cap",
                413,
                "Request validation failed",
                message=f"Request too large: {total} characters (max: {rules.max_request_chars})",
            )
    return CompletionRequest(
        model=body["model"],
        system_message=body["systemMessage"],
        messages=messages,
        tools=body.get("tools") or [],
        app=app or None,
        provider=body.get("provider"),
        rules=rules,
    )


def _is_provider(provider: Any) -> bool:
    """A provider named by a string holds no NUL (it names one of upstream's providers);
    any other JSON value goes upstream as it came."""
    return not isinstance(provider, str) or is_storable_text(provider)


def _encodable(body: dict[str, Any]) -> bool:
    """What goes upstream can be written as JSON again (orjson reads 1,024 levels deep but
    writes 254)."""
    try:
        orjson.dumps([body["messages"], body.get("tools"), body.get("provider")])
    except orjson.JSONEncodeError:
        return False
    return True


def message_chars(message: Any) -> int:
    """A message's text as JavaScript counts string length (UTF-16 code units): a string
    `content`, or the sum of its `text` parts."""
    if not isinstance(message, dict):
        return 0
    content = message.get("content")
    if isinstance(content, str):
        return _js_length(content)
    if isinstance(content, list):
        return sum(
            _js_length(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _js_length(text: str) -> int:
    """len() counts code points; JavaScript counts a character beyond U+FFFF as two."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def choose_key(
    completion: CompletionRequest,
    user_key: str | None,
    policy: Policy,
    server_key: str | None,
    app_keys: Mapping[str, str],
) -> tuple[str, Payer]:
    """Contract checks 6 and 7: whose OpenRouter key pays for this completion."""
    if user_key:
        return user_key, "user"
    rules = completion.rules
    if rules is not None and rules.models is not None:
        if completion.model not in rules.models:
            raise AppRefusal(
                completion.app,
                "model",
                400,
                f"OpenRouter key required for model: {completion.model}",
            )
    elif completion.model not in policy.cheap_model_set:
        raise ApiError(400, f"OpenRouter key required for model: {completion.model}")
    if completion.app is not None:
        app_key = app_keys.get(app_key_variable(completion.app))
        if app_key:
            return app_key, "app"
    if server_key:
        return server_key, "server"
    raise ApiError(500, "API key not configured")


def check_system_message(completion: CompletionRequest, policy: Policy) -> None:
    """Contract check 8: every group of required phrases has one phrase in the message;
    then, when the app's policy pins prefixes, the message starts with one of them."""
    system = completion.system_message
    groups = policy.required_phrase_groups
    if not all(any(phrase in system for phrase in group) for group in groups):
        raise ApiError(400, "First message must contain the correct system message")
    rules = completion.rules
    prefixes = rules.system_prompt_prefixes if rules is not None else None
    if prefixes is not None and not system.lstrip().startswith(tuple(prefixes)):
        raise AppRefusal(
            completion.app, "prefix", 400, f"System message not allowed for app {completion.app}"
        )


def cache_key(completion: CompletionRequest, payer: Payer) -> str:
    """The response cache's key of a request: a digest of everything that reaches upstream
    (the upstream body is made of exactly these), its app and who pays, in a canonical
    form (object keys sorted)."""
    canonical = orjson.dumps(
        [
            completion.app,
            payer,
            completion.model,
            completion.system_message,
            completion.messages,
            completion.tools,
            completion.provider,
            max_completion_tokens(completion),
        ],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def upstream_body(completion: CompletionRequest) -> bytes:
    """The JSON POSTed to OpenRouter but its model (the relay names the model it asks for);
    usage accounting asked for, so the last chunk has it."""
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": completion.system_message},
            *completion.messages,
        ],
        "stream": True,
        "tools": completion.tools,
    }
    if completion.provider:
        body["provider"] = {"only": [completion.provider]}
    cap = max_completion_tokens(completion)
    if cap is not None:
        body["max_tokens"] = cap
    body["usage"] = {"include": True}
    return orjson.dumps(body)


def max_completion_tokens(completion: CompletionRequest) -> int | None:
    """The app's cap on completion tokens, when the server's or the app's key pays."""
    return completion.rules.max_completion_tokens if completion.rules is not None else None
