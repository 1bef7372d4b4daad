"""MkDocs hook: render the pages' formulas to MathML when the site is built, so no page needs JavaScript for them.

``pymdownx.arithmatex`` (``generic: true``) turns ``$...$`` / ``\\(...\\)`` into
``<span class="arithmatex">\\(...\\)</span>`` and ``$$...$$`` / ``\\[...\\]`` into
``<div class="arithmatex">\\[...\\]</div>``, leaving code blocks alone. This hook replaces the TeX inside each of
them with ``latex2mathml``'s MathML (inline or block), which browsers render natively. A formula that does not
convert fails the build, naming the page and the formula.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

ARITHMATEX = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
DELIMITED = re.compile(r"^\s*\\([(\[])(.*)\\[)\]]\s*$", re.S)

# latex2mathml output that browsers read differently from TeX: \setminus and ':' as operators (with operator
# spacing), and \! as a length (MathML Core has no named spaces)
FIXES = (
    ("<mi>&#x029F5;</mi>", "<mo>&#x02216;</mo>"),
    ("<mi>:</mi>", "<mo>:</mo>"),
    ('width="negativethinmathspace"', 'width="-0.1667em"'),
)


def to_mathml(tex: str, display: bool) -> str:
    mathml = convert(tex, display="block" if display else "inline")
    for old, new in FIXES:
        mathml = mathml.replace(old, new)
    return mathml


def on_page_content(html_text, page, config, files):
    def render(match: re.Match) -> str:
        tag, body = match.groups()
        source = html.unescape(body)
        delimited = DELIMITED.match(source)
        if delimited is None:
            raise PluginError(f"{page.file.src_uri}: unexpected formula markup {source!r}")
        opener, tex = delimited.groups()
        try:
            mathml = to_mathml(tex.strip(), display=opener == "[")
        except Exception as err:  # latex2mathml raises its own exception types and plain ones
            raise PluginError(f"{page.file.src_uri}: the formula {tex.strip()!r} does not convert to MathML: "
                              f"{type(err).__name__}: {err}") from err
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return ARITHMATEX.sub(render, html_text)
