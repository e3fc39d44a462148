"""Generate the shipped json_extract dataset (datasets/json_extract/*.jsonl).

    python scripts/make_json_extract.py [--train 2000 --eval 200 --seed 0]

Each example is a free-text sentence about a person and the JSON object a careful
annotator would write for it. Sentence templates vary word order, so the model must
read the values out of the text rather than copy positions. Eval examples use the
same templates with names, cities and jobs combined differently (seeded, fixed).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = """Alice Bruno Carla Diego Elena Farid Greta Hugo Ines Jonas Kenji Lena Marco Nadia
Omar Paula Quinn Rosa Sven Tara Umar Vera Wim Xenia Yusuf Zoe Amara Boris Chen Dalia
Emil Fatima Gustav Hana Ivan Julia Karim Lucia Mateo Nora Oskar Priya Rafael Sofia
Tomas Ulla Viktor Wanda Yara Zeno""".split()
LAST = """Adams Berg Costa Dietz Eriksen Ferreira Garcia Horvat Ito Jansen Kowalski Larsen
Moreau Novak Okafor Petrov Quist Rossi Schmidt Tanaka Ueda Vargas Weber Yilmaz Zhang
Bauer Silva Nagy Haddad Lindqvist""".split()
CITIES = """Paris Berlin Madrid Lisbon Rome Vienna Prague Oslo Dublin Athens Tokyo Lima
Cairo Nairobi Toronto Denver Austin Seattle Boston Chicago Sydney Perth Mumbai Seoul
Hanoi Quito Bogota Zurich Munich Porto""".split()
JOBS = """nurse teacher baker pilot chemist lawyer plumber architect farmer journalist
dentist librarian engineer painter carpenter pharmacist translator firefighter
electrician photographer""".split()

TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "{name}, {age}, works as a {job} in {city}.",
    "Meet {name}: a {job} living in {city}, aged {age}.",
    "In {city} lives {name}, a {job} who is {age} years old.",
    "At {age}, {name} is working as a {job} in {city}.",
    "Our new {job} in {city} is {name} ({age}).",
    "{name} ({age}) moved to {city} to work as a {job}.",
    "The {job} {name} is {age} and lives in {city}.",
]


def example(rng: random.Random) -> dict[str, str]:
    person = {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "age": rng.randint(19, 79),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }
    text = rng.choice(TEMPLATES).format(**person)
    return {"prompt": text, "completion": json.dumps(person)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "datasets/json_extract")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    seen: set[str] = set()
    splits = {"train": [], "eval": []}
    for split, count in (("train", args.train), ("eval", args.eval)):
        while len(splits[split]) < count:
            row = example(rng)
            if row["prompt"] in seen:  # no eval prompt appears in train
                continue
            seen.add(row["prompt"])
            splits[split].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(args.out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} examples to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
