"""Hostile request bodies, on every backend: a body past a route's limit (the webhook's
``CREDITS_WEBHOOK_MAX_BYTES``, the other routes' ``CREDITS_MAX_CONTENT_LENGTH``, the app's
``MAX_CONTENT_LENGTH``), sent chunked or with a ``Content-Length``, is 413 and never read more than a
byte past the limit; a body of exactly the limit is read whole."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from _browser_server import live_server
from helpers import (
    BODY_LIMIT,
    CHECKOUT,
    CHUNK,
    FORM,
    LIMIT,
    TOO_LARGE,
    WEBHOOK,
    Counted,
    Padded,
    newest_purchase,
    nothing_changed,
    send,
    stripe_calls,
    stripe_signature,
)

MULTIPART = "multipart/form-data; boundary=b"
MULTIPART_BODY = b'--b\r\nContent-Disposition: form-data; name="quantity"\r\n\r\n1\r\n--b\r\n'
MULTIPART_BODY += b'Content-Disposition: form-data; name="padding"\r\n\r\n'


@pytest.mark.parametrize(
    ("path", "content_type", "prefix", "filler", "answer"),
    [
        pytest.param(WEBHOOK, "application/json", b"{", b" ", "json", id="webhook JSON"),
        pytest.param(WEBHOOK, FORM, b"a=", b"x", "json", id="webhook form, answered in JSON all the same"),
        pytest.param(
            CHECKOUT, "application/json", b'{"quantity": 1}', b" ", "json", id="checkout JSON, valid if cut"
        ),
        pytest.param(CHECKOUT, FORM, b"quantity=1&padding=", b"x", "html", id="checkout form, valid if cut"),
        pytest.param(
            CHECKOUT, MULTIPART, MULTIPART_BODY, b"x", "html", id="checkout multipart, valid if cut"
        ),
        pytest.param(CHECKOUT, "application/json", b"", b"[", "json", id="checkout JSON of [ only"),
    ],
)
@pytest.mark.parametrize("sent", ["chunked", "with Content-Length"])
def test_a_body_over_a_routes_limit_is_413_and_never_read_past_it(
    shop, path, content_type, prefix, filler, answer, sent
):
    """Chunked: 200 MiB offered, at most one byte past the limit read (plus what the server hands out
    in one read), where Werkzeug alone would cut the body at the limit and parse what it had (a valid
    checkout here). With a Content-Length over the limit: 413 before a byte is read."""
    before = shop.state()
    limit = LIMIT if path == WEBHOOK else BODY_LIMIT
    size = 200 * 1024 * 1024 if sent == "chunked" else limit + 1
    body = Counted(Padded(size, prefix, filler))
    headers = {"Content-Type": content_type, "Stripe-Signature": stripe_signature("{}")}
    response = send(shop.client("alice"), path, body, headers, None if sent == "chunked" else size)
    assert response.status_code == 413
    if answer == "json":
        assert response.json == TOO_LARGE
    else:
        assert response.mimetype == "text/html"
        assert f"larger than the {limit} bytes" in response.get_data(as_text=True)
    if sent == "chunked":
        assert limit < body.pulled <= limit + 1 + CHUNK
    else:
        assert body.pulled == 0
    assert stripe_calls(shop) == 0
    nothing_changed(shop, before)


def test_a_client_claiming_more_than_the_webhook_limit_is_413_whatever_it_sends(shop):
    before = shop.state()
    response = shop.client().post(
        WEBHOOK,
        input_stream=io.BytesIO(b"{}"),
        headers={"Stripe-Signature": stripe_signature("{}")},
        environ_overrides={"CONTENT_LENGTH": str(LIMIT + 1)},
    )
    assert (response.status_code, response.json) == (413, TOO_LARGE)
    nothing_changed(shop, before)


def test_a_checkout_of_exactly_the_body_limit_sent_chunked_is_read_whole_and_sold(shop):
    """The other side of the line: a body of exactly ``CREDITS_MAX_CONTENT_LENGTH`` bytes is not
    refused for the byte the server could not tell was missing."""
    body = Counted(Padded(BODY_LIMIT, b'{"quantity": 2}'))
    response = send(shop.client("alice"), CHECKOUT, body, {"Content-Type": "application/json"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert body.pulled == BODY_LIMIT
    assert stripe_calls(shop) == 1
    assert newest_purchase(shop) == (200, 200, "alice", None)


def test_a_webhook_delivery_past_the_checkout_limit_is_read_whole_and_credited(shop):
    """The webhook reads up to its own ``CREDITS_WEBHOOK_MAX_BYTES``, not the blueprint's smaller
    ``CREDITS_MAX_CONTENT_LENGTH``: a signed delivery padded to exactly that many bytes is credited."""
    payload = shop.open_payload + " " * (LIMIT - len(shop.open_payload))
    body = Counted(Padded(LIMIT, payload.encode()))
    headers = {"Content-Type": "application/json", "Stripe-Signature": stripe_signature(payload)}
    response = send(shop.client(), WEBHOOK, body, headers)
    assert (response.status_code, response.json["outcome"]) == (200, "fulfilled")
    assert shop.credits.balance("bob") == 100


@pytest.mark.parametrize("path", [WEBHOOK, CHECKOUT])
def test_the_apps_max_content_length_caps_every_route_of_the_blueprint(shop, path):
    before = shop.state()
    shop.app.config["MAX_CONTENT_LENGTH"] = 1000
    body = Counted(Padded(10 * 1024 * 1024, b'{"quantity": 1}'))
    response = send(shop.client("alice"), path, body, {"Content-Type": "application/json"})
    assert (response.status_code, response.json) == (413, TOO_LARGE)
    assert body.pulled <= 1001 + CHUNK
    nothing_changed(shop, before)


def test_a_chunked_five_mib_webhook_body_through_a_real_server_is_413(shop):
    """Werkzeug's own server, on loopback, dechunking a real ``Transfer-Encoding: chunked`` body sent by
    http.client: 413, after the app pulled at most one byte past the limit from the server."""
    before = shop.state()
    inputs: list[Counted] = []
    app = shop.app.wsgi_app

    def counting(environ: dict[str, Any], start_response: Any) -> Any:
        inputs.append(Counted(environ["wsgi.input"]))
        environ["wsgi.input"] = inputs[-1]
        return app(environ, start_response)

    def five_mib() -> Iterator[bytes]:
        for _ in range(80):
            yield b" " * CHUNK

    shop.app.wsgi_app = counting  # type: ignore[method-assign]
    try:
        with live_server(shop.app) as url:
            connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
            try:
                # The server may stop reading once it has answered; the answer is still there to read.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    connection.request(
                        "POST", WEBHOOK, body=five_mib(), headers={"Content-Type": "application/json"}
                    )
                response = connection.getresponse()
                status, answer = response.status, json.loads(response.read())
            finally:
                connection.close()
    finally:
        shop.app.wsgi_app = app  # type: ignore[method-assign]
    assert (status, answer) == (413, TOO_LARGE)
    assert len(inputs) == 1
    assert LIMIT < inputs[0].pulled <= LIMIT + 1 + CHUNK
    nothing_changed(shop, before)
