"""Extra words the node search finds a node by, where ComfyUI's V3 schema can carry them.

The display names carry the words an artist searches for ("consistent", "character", "sheet", "story", "anchor"):
the pinned frontend (1.32.9) searches node ids and display names only, fuzzily and weighted towards the start of
the name (a word that starts after about the 30th character is not found), so those words come first. Newer
frontends (1.58) also search a node definition's `search_aliases`; ComfyUI 0.3.75 and 0.8.0 have no such schema
field, so the aliases are passed only to a ComfyUI whose io.Schema knows it.
"""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

COMMON = ("consistent character", "character sheet", "story", "anchor", "consistory", "same character")


def search_aliases(*terms: str) -> dict[str, list[str]]:
    """Keyword arguments for io.Schema: {"search_aliases": [...]} where supported, else nothing."""
    fields = {field.name for field in dataclasses.fields(io.Schema)}
    if "search_aliases" not in fields:
        return {}
    return {"search_aliases": list(dict.fromkeys((*terms, *COMMON)))}
