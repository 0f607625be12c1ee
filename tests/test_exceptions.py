"""The error tree: what every error carries, and new errors made from caught ones."""

from __future__ import annotations

from trioproxy._exceptions import (
    HTTPRefusal,
    ModelNotFoundError,
    NotFoundError,
    RateLimitedError,
    TrioproxyError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    exception_leaves,
)


def test_every_error_may_carry_retry_after_and_characters_delivered() -> None:
    plain = TrioproxyError("boom")
    assert (plain.retry_after, plain.characters_delivered) == (None, None)
    assert RateLimitedError("slow down", code="too_many_requests", retry_after=3).retry_after == 3
    assert UpstreamStatusError("busy", status=429, retry_after=2.5).retry_after == 2.5


def test_after_delivery_is_a_new_error_of_the_same_class() -> None:
    caught = UpstreamTimeoutError("the upstream sent no further token", kind="silence_timeout")
    ended = caught.after_delivery(27, content_delivered=True)
    assert type(ended) is UpstreamTimeoutError
    assert ended is not caught
    assert (ended.status, ended.kind, ended.characters_delivered) == (504, "silence_timeout", 27)
    assert ended.message.endswith(" token (after 27 characters were delivered; they are not repeated)")
    assert str(ended) == ended.message
    assert ended.__cause__ is caught
    assert (caught.message, caught.characters_delivered) == ("the upstream sent no further token", None)


def test_after_delivery_of_nothing_leaves_the_message() -> None:
    caught = UpstreamStatusError("bad gateway", status=502, retry_after=1)
    ended = caught.after_delivery(0, content_delivered=False)
    assert (ended.message, ended.characters_delivered, ended.status, ended.retry_after) == ("bad gateway", 0, 502, 1)


def test_with_message_keeps_everything_else() -> None:
    caught = UpstreamStatusError("overloaded", status=503, type="overloaded_error", retry_after=4)
    renamed = caught.with_message("all 2 routes failed: ...")
    assert type(renamed) is UpstreamStatusError
    assert (renamed.status, renamed.type, renamed.retry_after) == (503, "overloaded_error", 4)
    assert caught.message == "overloaded"


def test_not_found_errors_and_http_refusals_have_their_own_status_and_type() -> None:
    assert isinstance(ModelNotFoundError("no model"), NotFoundError)
    assert (NotFoundError("no stream").status, NotFoundError("no stream").type) == (404, "not_found_error")
    refusal = HTTPRefusal("The method is not allowed for the requested URL.", status=405)
    assert (refusal.status, refusal.type) == (405, "invalid_request_error")
    assert HTTPRefusal("Not Found", status=404).type == "not_found_error"


def test_exception_leaves_are_the_exceptions_inside_however_deeply_grouped() -> None:
    a, b, c = ValueError("a"), KeyError("b"), RuntimeError("c")
    nested = BaseExceptionGroup("outer", [a, ExceptionGroup("inner", [b, ExceptionGroup("deeper", [c])])])
    assert list(exception_leaves(nested)) == [a, b, c]
    assert list(exception_leaves(a)) == [a]  # no group: itself
