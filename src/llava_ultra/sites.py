"""Vocabulary shared by data generation, instruction templates and evaluation.

Examination sites and finding types, each with its Chinese and English names. Keeping them in
one place means the synthetic data, the question templates and the metric's user dictionary
can never disagree on a term.
"""

from __future__ import annotations

from .errors import DataError

# site key -> (Chinese name, English name)
SITES: dict[str, tuple[str, str]] = {
    "thyroid": ("甲状腺", "thyroid"),
    "breast": ("乳腺", "breast"),
    "liver": ("肝胆", "liver and gallbladder"),
    "kidney": ("肾脏", "kidney"),
    "uterus": ("子宫", "uterus"),
    "cardiac": ("心脏", "heart"),
}

# finding type key -> (Chinese name, English name)
FINDING_TYPES: dict[str, tuple[str, str]] = {
    "cyst": ("囊肿", "cyst"),
    "nodule": ("实性低回声结节", "solid hypoechoic nodule"),
    "calcification": ("钙化灶", "calcification"),
    "stone": ("结石", "stone"),
    "none": ("未见明显异常", "no obvious abnormality"),
}


def site_name(site: str, language: str) -> str:
    """Return the display name of a site key in `language` ('zh' or 'en')."""
    check_site(site)
    zh, en = SITES[site]
    return zh if language == "zh" else en


def check_site(site: str) -> str:
    """Raise a DataError naming the known sites when `site` is not one of them."""
    if site not in SITES:
        known = ", ".join(sorted(SITES))
        raise DataError(f"unknown site {site!r}; use one of: {known}")
    return site
