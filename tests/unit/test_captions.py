"""Caption transforms: kohya semantics, and draws that depend on (seed, epoch, key) only."""

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
