"""MkDocs hook: show the Sphinx roles of msgkit's docstrings as plain code in the API reference.

The docstrings use ``:class:`Name``` and friends; mkdocstrings renders them as the role's text
followed by the code span. This drops the role (and a leading ``~``, which in Sphinx shows only
the last dotted part).
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """Replace every rendered role in a page's HTML by its code span."""
    return _ROLE.sub(_plain, html)
