"""`python -m dist_lora.train --config FILE [section.key=value ...]` (also under `accelerate launch -m`)."""

from dist_lora.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *__import__("sys").argv[1:]]))
