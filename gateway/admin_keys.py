"""The admin API for API keys: create (the secret is in that answer only), list, show and revoke."""

from __future__ import annotations

from collections.abc import Callable

from litestar import Request, Router, delete, get, post
from litestar.params import FromPath, FromQuery

from gateway.auth import Authenticator, principal_of
from gateway.openapi import takes
from policies.api_keys import KeySpec, KeyStore
from protocol.errors import BadRequest
from protocol.openai import decode_struct

__all__ = ["keys_router"]


def _store(request: Request) -> KeyStore:
    keys: KeyStore | None = request.app.state.auth.keys
    if keys is None:
        raise BadRequest("API keys are kept in the database: set storage.database_url.")
    return keys


@post("/keys", status_code=201, summary="Create an API key; the answer holds its secret, shown only this once",
      operation_class=takes(KeySpec))
async def create_key(request: Request) -> dict:
    spec = decode_struct(await request.body(), KeySpec)
    described, secret = await _store(request).create(spec, principal_of(request.scope).key_id)
    return {**described, "key": secret}


@get("/keys", summary="List API keys (never their secrets); ?revoked=true includes revoked ones")
async def list_keys(request: Request, revoked: FromQuery[bool] = False) -> dict:
    return {"object": "list", "data": await _store(request).list(include_revoked=revoked)}


@get("/keys/{key_id:str}", summary="One API key")
async def get_key(request: Request, key_id: FromPath[str]) -> dict:
    return await _store(request).get(key_id)


@delete("/keys/{key_id:str}", status_code=200, summary="Revoke an API key, on every replica within a second")
async def revoke_key(request: Request, key_id: FromPath[str]) -> dict:
    described = await _store(request).revoke(key_id)
    auth: Authenticator = request.app.state.auth
    await auth.revoked(key_id)
    return {**described, "revoked": True}


def keys_router(guard: Callable, middleware: list) -> Router:
    return Router(path="/admin", route_handlers=[create_key, list_keys, get_key, revoke_key], guards=[guard],
                  middleware=middleware)
