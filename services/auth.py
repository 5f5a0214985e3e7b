"""JWT verification with pyjwt: which user a token belongs to, or `invalid_token`.

The key is chosen from the algorithm the server allows, never from the token alone:
HS* tokens verify only against the shared secret and RS/ES/PS/EdDSA tokens only against
the public key, so a token HMAC-signed with the public key as its secret cannot pass.
"""

from __future__ import annotations

import jwt

from services.errors import ChatError

LEEWAY_SECONDS = 10


class TokenVerifier:
    def __init__(
        self,
        *,
        secret: str = "",
        public_key: str = "",
        algorithms: tuple[str, ...] = ("HS256",),
        audience: str = "",
        issuer: str = "",
        user_id_claim: str = "sub",
        require_exp: bool = True,
    ) -> None:
        self.enabled = bool(secret or public_key)
        self._secret = secret
        self._public_key = public_key
        self._algorithms = algorithms
        self._audience = audience or None
        self._issuer = issuer or None
        self._claim = user_id_claim
        # a token without `exp` would be valid forever once leaked
        self._required = ["exp"] if require_exp else []

    def user_id(self, token: object) -> str | None:
        """None for anonymous (no token, or JSON null); the user id for a valid token."""
        if token is None:
            return None
        if not isinstance(token, str):
            raise ChatError("invalid_request", "token must be a string or null.")
        if not token.strip():
            raise ChatError("invalid_token", "The token is empty.")
        if not self.enabled:
            raise ChatError("invalid_token", "This server does not accept tokens: authentication is not configured.")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if algorithm not in self._algorithms:
                raise ChatError("invalid_token", "The token is signed with an algorithm this server does not accept.")
            key = self._secret if algorithm.startswith("HS") else self._public_key
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"verify_aud": self._audience is not None, "require": self._required},
            )
        except ChatError:
            raise
        except jwt.ExpiredSignatureError:
            raise ChatError("invalid_token", "The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise ChatError("invalid_token", "The token is not valid yet.") from None
        except jwt.MissingRequiredClaimError:
            raise ChatError("invalid_token", "The token has no 'exp' (expiry) claim.") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise ChatError("invalid_token", "The token was issued for another service.") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise ChatError("invalid_token", "The token is malformed or its signature does not verify.") from None
        user = claims.get(self._claim)
        # PyJWT itself refuses a non-string `sub`; a custom user_id_claim may be an integer
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        if not isinstance(user, str) or not user:
            raise ChatError("invalid_token", f"The token has no usable '{self._claim}' claim.")
        return user

    def user_from_authorization(self, header: str | None) -> str | None:
        """The user of an HTTP `Authorization` header; absent means anonymous."""
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ChatError("invalid_token", "The Authorization header must be 'Bearer <token>'.")
        return self.user_id(token.strip())
