"""PS3.5 6.2.1.1: trailing empty components and groups of a person name are insignificant."""

from __future__ import annotations

import pytest

from node.dicom.header import normalise_person_name


@pytest.mark.parametrize(("sent", "indexed"), [
    ("Doe^Jane^^^", "Doe^Jane"),
    ("Doe^Jane", "Doe^Jane"),
    ("Doe^Jane^^^=", "Doe^Jane"),
    ("Doe^^^^Jr", "Doe^^^^Jr"),  # an empty component in the middle is kept
    ("Yamada^Tarou==", "Yamada^Tarou"),
    ("Yamada^Tarou=山田^太郎^^=やまだ^たろう^", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("=山田^太郎", "=山田^太郎"),  # an empty first group is significant
    ("Doe^John^^\\Roe^Richard^", "Doe^John\\Roe^Richard"),
    ("", ""),
])
def test_trailing_delimiters_dropped(sent: str, indexed: str) -> None:
    assert normalise_person_name(sent) == indexed
