import pytest

from dist_lora.train.precision import resolve_mixed_precision


@pytest.mark.parametrize(("requested", "cuda", "bf16", "expected"), [
    ("auto", True, True, "bf16"),  # Ampere and newer
    ("auto", True, False, "fp16"),  # Turing, Volta: fp16 with loss scaling
    ("auto", False, False, "no"),  # CPU, MPS
    ("fp16", True, True, "fp16"),
    ("no", True, True, "no"),
    ("bf16", False, False, "bf16"),
])
def test_auto_precision_follows_the_device(requested: str, cuda: bool, bf16: bool, expected: str) -> None:
    assert resolve_mixed_precision(requested, cuda=cuda, bf16_supported=bf16) == expected
