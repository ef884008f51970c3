"""Bearer-token auth (issue item 8): every route but /healthz requires one of `CDSP_API_TOKENS`.

Tokens are compared with `hmac.compare_digest` on their SHA-256 digests, against every configured
token without stopping at the first match, so neither the length nor the position of a token
leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="One of the service's API tokens (CDSP_API_TOKENS).")


def token_matches(given: str, tokens: list[str]) -> bool:
    digest = hashlib.sha256(given.encode()).digest()
    results = [hmac.compare_digest(digest, hashlib.sha256(t.encode()).digest()) for t in tokens]
    return any(results)


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if credentials is None or not token_matches(credentials.credentials, request.app.state.ctx.tokens):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token (send 'Authorization: Bearer <token>')",
            headers={"WWW-Authenticate": "Bearer"},
        )
