"""Tiny fixtures for the training tests: a BPE tokenizer, a 2-layer GPT-2, synthetic records."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = {
    "a": "apple banana cherry grape lemon mango melon peach pear plum".split(),
    "b": "river ocean lake stream pond sea bay creek delta harbor".split(),
    "c": "engine piston valve gear wheel axle brake clutch motor rotor".split(),
    "d": "violin cello piano flute drum harp oboe horn lute organ".split(),
}
COMMON = "the a of and to in is was for on with as".split()


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = WORDS["abcd"[i % 4]]
        out.append(" ".join(rng.choice(topic if rng.random() < 0.6 else COMMON) for _ in range(60)))
    return out


def build_tiny_base(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny GPT-2 (2 layers, 32 wide) and its byte-level BPE tokenizer to ``folder``."""
    from pmixed.models.tiny_gpt2 import build_gpt2, train_bpe_tokenizer

    tok = train_bpe_tokenizer(synthetic_texts(200, seed=seed), 320)
    model = build_gpt2(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=seed)
    # a short public pre-training, so the base is a language model and LoRA has room to adapt
    from pmixed.data.blocks import tokenize_blocks
    from pmixed.train.fit import fit_causal_lm

    blocks = tokenize_blocks(synthetic_texts(200, seed=seed + 7), tok, 32, drop_last=True)
    fit_causal_lm(model, blocks, epochs=1, lr=1e-2, batch_size=16, max_steps=40, progress=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_records(path: Path, *, n_units: int = 10, per_unit: int = 4, seed: int = 1) -> Path:
    """JSONL with a ``user`` column. Each user cycles through one topic's words in a fixed order
    (unlike the bag-of-words public texts), so a LoRA member has something clear to learn and
    members of different topics differ."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for u in range(n_units):
            topic = WORDS["abcd"[u % 4]]
            for _ in range(per_unit):
                start = rng.randrange(len(topic))
                words = [
                    topic[(start + i) % len(topic)] if rng.random() < 0.9 else rng.choice(COMMON)
                    for i in range(80)
                ]
                fh.write(json.dumps({"user": f"user{u:02d}", "text": " ".join(words)}) + "\n")
    return path


def tiny_config(base_dir: Path, records: Path, out_dir: Path, *, n_parts: int = 3, **overrides):
    from pmixed.config import config_from_dict

    return config_from_dict(
        tiny_config_dict(base_dir, records, out_dir, n_parts=n_parts, **overrides)
    )


def tiny_config_dict(base_dir, records, out_dir, *, n_parts: int = 3, **overrides) -> dict:
    data = {
        "run": {"output_dir": str(out_dir), "seed": 0},
        "model": {"base": str(base_dir)},
        "data": {
            "source": str(records),
            "unit": "user",
            "n_parts": n_parts,
            "eval_units": 1,
            "block_size": 32,
        },
        "lora": {"r": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 4, "max_steps": 4},
        "dpsgd": {
            "epsilon": 8.0,
            "delta": 1e-5,
            "batch_size": 8,
            "physical_batch_size": 4,
            "max_grad_norm": 1.0,
            "epochs": 1,
            "lr": 1e-2,
        },
    }
    for key, value in overrides.items():
        sec, fld = key.split("__")
        data.setdefault(sec, {})[fld] = value
    return data


def write_toml(data: dict, path: Path) -> Path:
    """Tiny TOML writer for flat tables of str/int/float/bool/list-of-str values."""

    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = []
    for table, fields in data.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {fmt(v)}" for k, v in fields.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
