"""--auth: the logins of the web UI, which the API also takes as keys (Bearer USER:PASSWORD) where no
--openai_api_key is given: one file of logins for both."""
from __future__ import annotations

import json
from typing import Any

from .errors import UserError


def read_auth(auth: Any) -> list[tuple[str, str]] | None:
    """--auth as a list of (user, password) pairs, or a JSON file holding such a list."""
    if not auth:
        return None
    if isinstance(auth, str):
        try:
            with open(auth, encoding="utf-8") as f:
                auth = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--auth={auth}: cannot read it as a JSON list of [user, password] pairs ({e})") from None
    try:
        return [(str(u), str(p)) for u, p in auth]
    except (TypeError, ValueError):
        raise UserError("--auth: write it as [('user', 'password'), ...]") from None


def api_keys_from_logins(auth: Any) -> list[str]:
    """The API keys --auth's logins stand for: 'user:password' each."""
    return [f"{user}:{password}" for user, password in read_auth(auth) or []]
