"""MkDocs hook: include a file from outside docs/ whole, with its relative links rebased.

A page line ``<!-- include: benchmarks/RESULTS.md -->`` is replaced by that file (path from the repository root), so
the file stays the single source. Links in it are relative to its own folder: a link into ``docs/`` is rewritten
relative to the including page, and a link to any other repository file (which the site does not contain) becomes
the file's path in code, so the strict build checks every link that is left. A missing file fails the build.
"""

from __future__ import annotations

import os
import re

from mkdocs.exceptions import PluginError

INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.M)
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _rebase(text: str, source: str, page: str) -> str:
    src_dir = os.path.dirname(source)

    def fix(match: re.Match) -> str:
        bang, label, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match.group(0)  # URLs and anchors stay
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(src_dir, path)).replace(os.sep, "/")
        if resolved.startswith("docs/"):
            rel = os.path.relpath(resolved[len("docs/"):], os.path.dirname(page) or ".").replace(os.sep, "/")
            return f"{bang}[{label}]({rel}{'#' + anchor if anchor else ''})"
        return f"{label} (`{resolved}`)" if label else f"`{resolved}`"

    return LINK.sub(fix, text)


def on_page_markdown(markdown, page, config, files):
    root = os.path.dirname(config["config_file_path"])

    def include(match: re.Match) -> str:
        source = match.group(1)
        path = os.path.join(root, source)
        if not os.path.isfile(path):
            raise PluginError(f"{page.file.src_uri}: included file {source} does not exist")
        with open(path, encoding="utf-8") as handle:
            return _rebase(handle.read(), source, page.file.src_uri)

    return INCLUDE.sub(include, markdown)
