"""Regenerate the demo assets bundled in ``prep/assets/``: a small byte-level BPE tokenizer with a ChatML chat
template (``demo_tokenizer/``) and small synthetic instruction and chat data sets a tiny model can visibly learn
(``demo_alpaca.jsonl.gz``, ``demo_chat.jsonl.gz``). ``prep pack demo:alpaca`` and ``tools/demo.sh`` run on them with
no network.

    python tools/make_demo_assets.py                  # rewrite prep/assets/ (byte-identical output every time)
    python tools/make_demo_assets.py --out /tmp/assets
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from pathlib import Path

from padless.prep.render import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

ASSETS = Path(__file__).resolve().parent.parent / "prep" / "assets"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Brazil": "Brasilia", "Canada": "Ottawa", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens",
    "Poland": "Warsaw", "Portugal": "Lisbon", "Ireland": "Dublin", "Chile": "Santiago", "Cuba": "Havana",
    "Austria": "Vienna", "Hungary": "Budapest", "Finland": "Helsinki", "Denmark": "Copenhagen", "Turkey": "Ankara",
}  # fmt: skip
CATEGORIES = {
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray"],
    "fruits": ["apple", "banana", "cherry", "grape", "mango", "orange", "pear", "peach", "plum", "lemon", "kiwi"],
    "animals": ["cat", "dog", "horse", "lion", "tiger", "rabbit", "mouse", "bear", "wolf", "fox", "owl", "duck"],
    "tools": ["hammer", "saw", "drill", "wrench", "screwdriver", "pliers", "shovel", "rake", "ladder", "chisel"],
}
WORDS = sorted({w for ws in CATEGORIES.values() for w in ws} | {"river", "garden", "window", "planet", "music"})
ANIMALS = CATEGORIES["animals"]
STORY = [
    "Once upon a time there was a little {a} who lived near a {p}.",
    "Every morning the {a} walked to the {p} to look for food.",
    "One day the {a} met a friendly {b} by the {p}.",
    "The {b} asked the {a} to play a game.",
    "They played together until the sun went down.",
    "The {a} was happy to have a new friend.",
    "The next day it rained, so the {a} and the {b} stayed home.",
    "They told each other stories about the {p}.",
    "In the end, the {a} learned that friends make every day better.",
    "The {b} smiled and said goodbye.",
]
PLACES = ["river", "forest", "garden", "hill", "lake", "farm", "city", "beach"]


def alpaca_example(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(["add", "sub", "mul", "capital", "list", "reverse", "upper", "count", "sort", "story"])
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if kind == "add":
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == "sub":
        return {"instruction": f"What is {a} minus {b}?", "input": "", "output": f"{a} minus {b} is {a - b}."}
    if kind == "mul":
        a, b = a % 13, b % 13
        return {"instruction": f"What is {a} times {b}?", "input": "", "output": f"{a} times {b} is {a * b}."}
    if kind == "capital":
        c = rng.choice(sorted(CAPITALS))
        return {
            "instruction": f"What is the capital of {c}?",
            "input": "",
            "output": f"The capital of {c} is {CAPITALS[c]}.",
        }
    if kind == "list":
        cat = rng.choice(sorted(CATEGORIES))
        n = rng.randint(2, min(10, len(CATEGORIES[cat])))
        items = rng.sample(CATEGORIES[cat], n)
        return {
            "instruction": f"List {n} {cat}.",
            "input": "",
            "output": "\n".join(f"{i + 1}. {x}" for i, x in enumerate(items)),
        }
    if kind == "reverse":
        w = rng.choice(WORDS)
        return {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]}
    if kind == "upper":
        ws = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        return {"instruction": "Write the text in capital letters.", "input": ws, "output": ws.upper()}
    if kind == "count":
        w = rng.choice(WORDS)
        return {
            "instruction": f"How many letters are in the word {w}?",
            "input": "",
            "output": f"The word {w} has {len(w)} letters.",
        }
    if kind == "sort":
        xs = [rng.randint(0, 99) for _ in range(rng.randint(2, 12))]
        return {
            "instruction": "Sort the numbers from smallest to largest.",
            "input": ", ".join(map(str, xs)),
            "output": ", ".join(map(str, sorted(xs))),
        }
    an, bn = rng.sample(ANIMALS, 2)
    p = rng.choice(PLACES)
    n = rng.randint(3, len(STORY))
    text = " ".join(s.format(a=an, b=bn, p=p) for s in STORY[:n])
    return {"instruction": f"Write a short story about a {an} and a {bn}.", "input": "", "output": text}


def chat_example(rng: random.Random) -> dict:
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": "You are a helpful assistant."})
    for _ in range(rng.randint(1, 4)):
        ex = alpaca_example(rng)
        q = ex["instruction"] + (f"\n{ex['input']}" if ex["input"] else "")
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ex["output"]}]
    return {"messages": msgs}


def gz_jsonl(rows: list[dict], path: Path) -> None:
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as g:  # mtime=0: deterministic bytes
        g.write(raw)
    path.write_bytes(buf.getvalue())


def build_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "name_or_path": "padless-demo-bpe",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ASSETS))
    ap.add_argument("--alpaca-rows", type=int, default=3000)
    ap.add_argument("--chat-rows", type=int, default=500)
    ap.add_argument("--vocab-size", type=int, default=3072)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    alpaca = [alpaca_example(rng) for _ in range(args.alpaca_rows)]
    chat = [chat_example(rng) for _ in range(args.chat_rows)]
    gz_jsonl(alpaca, out / "demo_alpaca.jsonl.gz")
    gz_jsonl(chat, out / "demo_chat.jsonl.gz")
    texts = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT] * 50
    texts += [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in alpaca]
    texts += [m["content"] for r in chat for m in r["messages"]]
    build_tokenizer(texts, args.vocab_size, out / "demo_tokenizer")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"wrote {out}: {len(alpaca)} alpaca rows, {len(chat)} chat rows, "
        f"tokenizer vocab {args.vocab_size}, {total:,} bytes"
    )


if __name__ == "__main__":
    main()
