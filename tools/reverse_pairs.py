"""Preference pairs from the quickstart's reversal task, in TRL's format (JSONL).

For `hpcalign train-rm` / offline DPO on the task the quickstart trains: a random word of
3-6 letters, prompt "word=", chosen its reversal with c letters wrong, rejected with more
letters wrong, or the chosen one with letters added or cut off, so a reward model learns
"closer to the reversal, and as long, is better" (the task's own reward, partial match,
ranks them the same way).

    python tools/reverse_pairs.py PAIRS.jsonl 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import string


def corrupt(target: str, wrong: int, rng: random.Random) -> str:
    """`target` with `wrong` of its positions changed to another letter."""
    letters = list(target)
    for i in rng.sample(range(len(letters)), wrong):
        letters[i] = rng.choice([c for c in string.ascii_lowercase if c != letters[i]])
    return "".join(letters)


def pair(rng: random.Random, min_len: int = 3, max_len: int = 6) -> dict[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))
    target = word[::-1]
    better = rng.randint(0, len(target) - 1)
    chosen = corrupt(target, better, rng)
    kind = rng.random()
    if kind < 0.25:  # too long: extra letters after the answer
        rejected = chosen + "".join(rng.choice(string.ascii_lowercase)
                                    for _ in range(rng.randint(1, 4)))
    elif kind < 0.4 and len(chosen) > 1:  # too short
        rejected = chosen[:rng.randint(0, len(chosen) - 1)]
    else:
        rejected = corrupt(target, rng.randint(better + 1, len(target)), rng)
    return {"prompt": word + "=", "chosen": chosen, "rejected": rejected or "=", "answer": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("count", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for _ in range(args.count):
            f.write(json.dumps(pair(rng)) + "\n")


if __name__ == "__main__":
    main()
