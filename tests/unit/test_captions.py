"""Caption transforms: kohya semantics, and draws that depend on (seed, epoch, key) only."""

import random
import re
from collections import Counter

from dist_lora.data.captions import CaptionTransform

CAPTION = "zkw, 1girl, red hair, smile, outdoors, sky, tree"


def test_inactive_transform_keeps_caption() -> None:
    assert CaptionTransform(keep_tokens=2)(CAPTION, CaptionTransform.rng(0, 0, "k")) == CAPTION


def test_shuffle_keeps_leading_tokens_and_trigger_first() -> None:
    transform = CaptionTransform(shuffle=True, keep_tokens=2, trigger="zkw")
    seen = set()
    for i in range(200):
        tags = transform(CAPTION, CaptionTransform.rng(1, 0, f"k{i}")).split(", ")
        assert tags[:2] == ["zkw", "1girl"] and sorted(tags) == sorted(CAPTION.split(", "))
        seen.add(tuple(tags[2:]))
    assert len(seen) > 50  # really shuffled
    # keep_tokens = 0: the trigger is still pinned first.
    tags = CaptionTransform(shuffle=True, trigger="zkw")("1girl, zkw, smile, sky", CaptionTransform.rng(0, 0, "a"))
    assert tags.split(", ")[0] == "zkw"


def test_dropout_rates() -> None:
    drop_all = CaptionTransform(caption_dropout=0.1)
    empties = sum(drop_all(CAPTION, CaptionTransform.rng(0, 0, f"k{i}")) == "" for i in range(4000))
    assert 330 <= empties <= 470  # 10% of 4000 = 400, within ~3.5 sigma
    tag_drop = CaptionTransform(tag_dropout=0.3, keep_tokens=1, trigger="zkw")
    kept: Counter[str] = Counter()
    for i in range(2000):
        tags = tag_drop(CAPTION, CaptionTransform.rng(0, 0, f"k{i}")).split(", ")
        assert tags[0] == "zkw"
        kept.update(tags[1:])
    for tag in CAPTION.split(", ")[1:]:
        assert 1300 <= kept[tag] <= 1500  # kept with probability 0.7


def test_draws_depend_on_seed_epoch_and_key_only() -> None:
    transform = CaptionTransform(shuffle=True, tag_dropout=0.2)
    first = [transform(CAPTION, CaptionTransform.rng(3, 1, f"k{i}")) for i in range(20)]
    again = [transform(CAPTION, CaptionTransform.rng(3, 1, f"k{i}")) for i in reversed(range(20))][::-1]
    assert first == again
    other_epoch = [transform(CAPTION, CaptionTransform.rng(3, 2, f"k{i}")) for i in range(20)]
    assert first != other_epoch


def test_keep_tokens_separator_fixes_the_head_and_tail() -> None:
    """kohya's keep_tokens_separator: tags before the separator stay first, tags after a second one stay
    last, the ones between shuffle and drop; keep_tokens counts only where a caption has no separator."""
    caption = "zkw, 1girl ||| red hair, smile, sky ||| masterpiece, best quality"
    transform = CaptionTransform(shuffle=True, keep_tokens=1, keep_tokens_separator="|||")
    middles = Counter()
    for i in range(300):
        tags = transform(caption, CaptionTransform.rng(2, 0, f"k{i}")).split(", ")
        assert tags[:2] == ["zkw", "1girl"] and tags[-2:] == ["masterpiece", "best quality"]
        assert sorted(tags[2:-2]) == ["red hair", "sky", "smile"]
        middles[tuple(tags[2:-2])] += 1
    assert len(middles) == 6  # every order of the three movable tags
    dropped = CaptionTransform(tag_dropout=1.0, keep_tokens_separator="|||")(caption, CaptionTransform.rng(0, 0, "k"))
    assert dropped == "zkw, 1girl, masterpiece, best quality"
    # On its own the separator only goes: sd-scripts would leave '|||' in the text.
    plain = CaptionTransform(keep_tokens_separator="|||")
    assert plain.active and plain(caption, CaptionTransform.rng(0, 0, "k")) == \
        "zkw, 1girl, red hair, smile, sky, masterpiece, best quality"
    # A caption without it: the first keep_tokens tags are fixed.
    for i in range(50):
        assert transform(CAPTION, CaptionTransform.rng(3, 0, f"k{i}")).split(", ")[0] == "zkw"


def test_secondary_separator_keeps_words_of_a_tag_together() -> None:
    caption = "zkw, red;;;cube, blue;;;ball, sky"
    transform = CaptionTransform(shuffle=True, keep_tokens=1, secondary_separator=";;;")
    orders = set()
    for i in range(100):
        text = transform(caption, CaptionTransform.rng(4, 0, f"k{i}"))
        assert ";;;" not in text and "red,cube" in text and "blue,ball" in text and text.startswith("zkw, ")
        orders.add(text)
    assert len(orders) == 6
    # Dropped together too: with every movable tag dropped only the fixed one is left.
    assert CaptionTransform(tag_dropout=1.0, keep_tokens=1, secondary_separator=";;;")(
        caption, CaptionTransform.rng(0, 0, "k")) == "zkw"


def _sd_scripts_wildcards(caption: str, rng: random.Random) -> str:
    """sd-scripts' process_caption with enable_wildcard, written out from its code, with ``rng`` in place
    of the random module."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    replacer1, replacer2 = "⦅", "⦆"
    while replacer1 in caption or replacer2 in caption:
        replacer1 += "⦅"
        replacer2 += "⦆"
    caption = caption.replace("{{", replacer1).replace("}}", replacer2)
    caption = re.sub(r"\{([^}]+)\}", lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(replacer1, "{").replace(replacer2, "}")


def test_wildcards_as_sd_scripts_expands_them() -> None:
    caption = "zkw, a {red|blue|green} cube, {{literal}}\nzkw, {one|two} sphere, {x|y}\nzkw, plain"
    transform = CaptionTransform(wildcard=True)
    seen = Counter()
    for i in range(600):
        got = transform(caption, CaptionTransform.rng(5, 0, f"k{i}"))
        want_rng = CaptionTransform.rng(5, 0, f"k{i}")
        want_rng.random()  # the whole-caption dropout draw comes first
        assert got == _sd_scripts_wildcards(caption, want_rng)
        seen[got] += 1
    assert len(seen) == 3 + 2 * 2 + 1  # every line, every option
    assert "zkw, a red cube, {literal}" in seen
    # With shuffle the tags of the chosen line move; a caption without wildcards is left as it is.
    shuffled = CaptionTransform(wildcard=True, shuffle=True, keep_tokens=1)(caption, CaptionTransform.rng(0, 0, "k"))
    assert shuffled.startswith("zkw, ") and "\n" not in shuffled
    assert transform("zkw, red", CaptionTransform.rng(0, 0, "k")) == "zkw, red"


def test_evaluation_keeps_the_wildcard_choice_alone() -> None:
    from dist_lora.data.captions import CaptionPolicy, wildcards_only

    policy = CaptionPolicy.build(CaptionTransform(shuffle=True, caption_dropout=1.0, wildcard=True),
                                 [{"wildcard": False}, {"tag_dropout": 0.5}])
    only = wildcards_only(policy)
    assert only.default == CaptionTransform(wildcard=True)
    assert only.subsets == (CaptionTransform(), CaptionTransform(wildcard=True))
    caption = "a, {b|c}\nd"
    assert only.default(caption, CaptionTransform.rng(0, 0, "k")) == \
        CaptionTransform(wildcard=True)(caption, CaptionTransform.rng(0, 0, "k")) != ""
