"""The bounded table of results kept across calls (attn_inject/core/kept.py)."""

from __future__ import annotations

from attn_inject.core.kept import Kept


def test_get_computes_once_and_the_least_recently_used_goes_first():
    kept: Kept[int] = Kept(2)
    computed: list[str] = []

    def compute(key: str) -> int:
        computed.append(key)
        return len(key)

    assert kept.get("a", lambda: compute("a")) == 1
    assert kept.get("a", lambda: compute("a")) == 1 and computed == ["a"]
    kept.get("bb", lambda: compute("bb"))
    assert "a" in kept  # "a" becomes the most recently used: "bb" goes when "ccc" comes
    kept.put("ccc", 3)
    assert "a" in kept and "ccc" in kept and "bb" not in kept and len(kept) == 2
    kept.clear()
    assert "a" not in kept and len(kept) == 0


def test_put_replaces_a_kept_value():
    kept: Kept[str] = Kept(1)
    kept.put("k", "old", held=object())
    kept.put("k", "new")
    assert kept.get("k", lambda: "computed") == "new" and len(kept) == 1


def test_forget_kept_results_empties_every_table():
    from attn_inject.core.kept import forget_kept_results

    first: Kept[int] = Kept(4)
    second: Kept[int] = Kept(4)
    first.put("a", 1)
    second.put("b", 2)
    forget_kept_results()
    assert len(first) == 0 and len(second) == 0
