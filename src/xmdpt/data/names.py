"""DeepFashion In-shop names: the GFLA/PATN flat file names and the In-shop relative paths used by PIDM/NTED.

A flat name is the image's path under an In-shop root called `fashion`, joined without separators, with the `_`
removed from the id folder and from the file name after its first `_`:
`fashionWOMENBlouses_Shirtsid0000337203_3back.jpg` <-> `WOMEN/Blouses_Shirts/id_00003372/03_3_back.jpg`.
"""

from __future__ import annotations

import re

from xmdpt.errors import InputError

_FLAT = re.compile(r"^fashion(MEN|WOMEN)(.+?)id(\d{8})(\d+)_(\d+)([A-Za-z]+)(\.\w+)$")
_PATH = re.compile(r"^(?:img/|img_highres/)?(MEN|WOMEN)/([^/]+)/id_(\d{8})/(\d+)_(\d+)_([A-Za-z]+)(\.\w+)$")


def flat_to_inshop(name: str) -> str:
    """`fashionWOMENBlouses_Shirtsid0000337203_3back.jpg` -> `WOMEN/Blouses_Shirts/id_00003372/03_3_back.jpg`."""
    match = _FLAT.match(name)
    if match is None:
        raise InputError(
            f"{name!r} is not a DeepFashion flat image name like fashionWOMENDressesid0000713204_3back.jpg"
        )
    gender, category, ident, number, shot, view, suffix = match.groups()
    return f"{gender}/{category}/id_{ident}/{number}_{shot}_{view}{suffix}"


def inshop_to_flat(path: str) -> str:
    """`WOMEN/Blouses_Shirts/id_00003372/03_3_back.jpg` (optionally under `img/`) -> the flat name."""
    match = _PATH.match(path.replace("\\", "/"))
    if match is None:
        raise InputError(f"{path!r} is not an In-shop image path like WOMEN/Dresses/id_00007132/04_3_back.jpg")
    gender, category, ident, number, shot, view, suffix = match.groups()
    return f"fashion{gender}{category}id{ident}{number}_{shot}{view}{suffix}"
