"""Showing a setting's value without its secrets: URL passwords and 'password' entries masked.

Used by the parser's problem messages, `carrot.debug`'s exception-report filter and the 1.x
VirtualHost: whatever shape a broken setting has, the password never reaches a message.
"""
from __future__ import annotations

import re

ENCODE_HINT = ("a '/', '?', '#' or '@' in the user name or password must be percent-encoded "
               "(%2F, %3F, %23, %40), or give the broker as a dict")
SHOWN_LENGTH = 300  # characters of a setting's value quoted in a message at most


def mask_url(url: str) -> str:
    """`url` with any password replaced by ***, even when it does not parse as a URL.

    Everything between the first ':' after the scheme and the last '@' counts as the password, so a
    password holding '/', '#', '?' or '@' is masked whole (a host or path is masked with it rather than
    a secret shown). Without an '@', a ':' followed by anything but a port number is masked too.
    """
    scheme, separator, rest = url.partition('://')
    if not separator:
        scheme, rest = '', url
    prefix = f'{scheme}://' if separator else ''
    at = rest.rfind('@')
    if at >= 0:
        user, colon, _ = rest[:at].partition(':')
        return f'{prefix}{user}:***@{rest[at + 1:]}' if colon else url
    if separator:
        netloc = rest.split('/', 1)[0]
        user, colon, port = netloc.partition(':')
        if colon and not port.isdigit():
            return f'{prefix}{user}:***'
    return url


def masked(value, depth: int = 0):
    """A copy of a setting's value safe to show: URL passwords and 'password' entries masked."""
    if depth > 6:
        return ...
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, (bytes, bytearray)):
        return mask_url(bytes(value).decode('latin-1')).encode('latin-1')
    if isinstance(value, dict):
        return {masked(k, depth + 1): '***' if isinstance(k, str) and k.lower() == 'password'
                else masked(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, depth + 1) for v in value]
    if isinstance(value, (tuple, set, frozenset)):
        return tuple(masked(v, depth + 1) for v in value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _Opaque(type(value).__name__)  # its repr is its own business: it might hold a secret


class _Opaque:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f'<{self.name} object>'


def broker_shape(value) -> str:
    """A broker setting that is not a usable URL, for a message. Whatever it is, it may be (or hold) the
    password itself, so only its shape is shown: the scheme and what follows the last '@' of a URL-like
    string, else its type and length."""
    if isinstance(value, str):
        scheme, separator, rest = value.partition('://')
        if separator and '@' in rest and len(scheme) < 10 and scheme.isalpha():
            credentials, _, where = rest.rpartition('@')
            user = credentials.partition(':')[0]
            user = user if re.fullmatch(r'[\w.%-]{1,64}', user) else '***'
            return repr(f'{scheme}://{user}:***@{where}'[:SHOWN_LENGTH])
        return f'a string of {len(value)} characters'
    return f'a {type(value).__name__}'


def masked_repr(value) -> str:
    """repr() of a setting's value for a message: secrets masked, length bounded."""
    try:
        text = repr(masked(value))
    except Exception:  # a hostile __eq__/__hash__ in a key; say only what it is
        text = f'<{type(value).__name__} object>'
    return text if len(text) <= SHOWN_LENGTH else text[:SHOWN_LENGTH] + '...'

