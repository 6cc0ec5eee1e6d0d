"""Recall tasks generated locally, for any tokenizer and any length (HELMET stops at 128K).

Each sample is built from items (JSON records, needle sentences, filler sentences); the number of
items is searched so that the whole model input has the requested token count. Randomness comes
from `random.Random` seeded with a SHA-256 of (task, length, sample index, seed): never Python's
`hash()`, so the same seed gives byte-identical inputs in every process. Items are drawn from their
own stream, so a sample at 64K is a prefix-extension of the "same" sample at 32K.
"""
import hashlib
import random
import uuid

# RULER's "noise" haystack (used here for the multi-value task instead of Paul Graham's essays,
# which are not redistributable with this repo).
NOISE_SENTENCES = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again."]

# Keys for the word-keyed needles (RULER draws adjective-noun pairs from wonderwords).
ADJECTIVES = ("ancient brave calm curious damp eager fancy gentle happy icy jolly keen lively "
              "mighty narrow odd polite quick rapid shiny silent tall tidy upbeat vast wary witty "
              "young zealous bitter bold bright broad cheap clever crisp dusty empty fierce fluffy "
              "giant grumpy hollow humble jagged loud lucky misty noisy plain proud rough rusty "
              "sharp short sleepy smooth soft sour spicy steep sticky sweet thick tiny warm wild").split()
NOUNS = ("apple badger cactus dolphin engine falcon garden harbor island jacket kettle ladder "
         "magnet needle orchard pepper quilt rabbit saddle tunnel umbrella violin walnut yacht "
         "zebra anchor basket candle desert feather glacier hammer igloo jungle kitten lantern "
         "meadow napkin otter parrot quarry river shovel teapot valley wagon willow beacon "
         "blanket bottle bridge canyon castle cherry comet cookie meteor mitten pillow pebble").split()


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical across processes and machines."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) >> 1


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))  # RULER's 7-digit magic numbers


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _insert_at_depth(n_items: int, depth: float) -> int:
    """Index among n_items + 1 slots so that the needle sits at `depth` (0 = start, 1 = end)."""
    return round(depth * n_items)


# ----------------------------------------------------------------------------------------------
# Builders: (sample_seed, n_items, depth) -> template fields. n_items is the haystack size.

def build_json_kv(sample_seed: int, n_items: int, depth: float, shots: int = 2) -> dict:
    """Lost-in-the-middle / HELMET JSON KV: UUID -> UUID records, one is asked for."""
    item_rng = random.Random(stable_seed(sample_seed, "items"))
    target_rng = random.Random(stable_seed(sample_seed, "target"))
    records = [(_uuid(item_rng), _uuid(item_rng)) for _ in range(n_items)]
    target = (_uuid(target_rng), _uuid(target_rng))
    position = _insert_at_depth(n_items, depth)
    records.insert(position, target)
    # demonstrations ask for other records of the same object, picked deterministically
    others = [i for i in range(len(records)) if i != position]
    demo_idx = random.Random(stable_seed(sample_seed, "demos", n_items)).sample(others, min(shots, len(others)))
    demos = "".join(f"Key: \"{records[i][0]}\"\nCorresponding value: {records[i][1]}\n\n" for i in demo_idx)
    # the lost-in-the-middle layout: '{"k": "v",\n "k": "v"}'
    body = ",\n ".join(f"\"{k}\": \"{v}\"" for k, v in records)
    return {"context": "JSON data:\n{" + body + "}", "question": f"\"{target[0]}\"", "demos": demos,
            "answer": [target[1]], "needle": f"\"{target[0]}\": \"{target[1]}\"", "depth": depth}


def _build_multikey(sample_seed: int, n_items: int, depth: float, kind: str) -> dict:
    """RULER niah_multikey_2 (word keys, number values) / _3 (UUID keys and values): the haystack is
    made of distractor needles with other keys."""
    make_key, make_value, type_v = (_word_key, _number, "number") if kind == "number" else (_uuid, _uuid, "uuid")
    item_rng = random.Random(stable_seed(sample_seed, "items"))
    target_rng = random.Random(stable_seed(sample_seed, "target"))
    key, value = make_key(target_rng), make_value(target_rng)
    sentence = "One of the special magic {}s for {} is: {}."
    items = []
    while len(items) < n_items:
        other_key, other_value = make_key(item_rng), make_value(item_rng)
        if other_key != key:  # the asked key must be unique
            items.append(sentence.format(type_v, other_key, other_value))
    needle = sentence.format(type_v, key, value)
    items.insert(_insert_at_depth(n_items, depth), needle)
    return {"context": "\n".join(items), "query": key, "type_needle_v": type_v, "answer": [value],
            "needle": needle, "depth": depth}


def build_mk_needle(sample_seed: int, n_items: int, depth: float, shots: int = 0) -> dict:
    return _build_multikey(sample_seed, n_items, depth, "number")


def build_mk_uuid(sample_seed: int, n_items: int, depth: float, shots: int = 0) -> dict:
    return _build_multikey(sample_seed, n_items, depth, "uuid")


def build_multivalue(sample_seed: int, n_items: int, depth: float, shots: int = 0, n_values: int = 4) -> dict:
    """RULER niah_multivalue: four values for one key in a filler haystack. The first value sits at
    `depth`; the others at seeded positions."""
    target_rng = random.Random(stable_seed(sample_seed, "target"))
    key = _word_key(target_rng)
    values = [_number(target_rng) for _ in range(n_values)]
    filler = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n_items)]
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    positions = [_insert_at_depth(n_items, depth)] + [target_rng.randint(0, n_items) for _ in values[1:]]
    # insert from the back so earlier indices stay valid; ties keep value order
    for pos, needle in sorted(zip(positions, needles), key=lambda p: p[0], reverse=True):
        filler.insert(pos, needle)
    return {"context": " ".join(filler), "query": key, "type_needle_v": "numbers", "answer": values,
            "needle": needles[0], "depth": depth}


def build_passkey(sample_seed: int, n_items: int, depth: float, shots: int = 0, kind: str = "number") -> dict:
    """Passkey retrieval (Mohtashami & Jaggi 2023, the test of Position Interpolation, YaRN and
    LongLoRA): a key stated once in a haystack of RULER's noise sentences. `number`: the classic
    5-digit key; `word`: one noun (a one-token copy, within reach of a 1M-parameter model)."""
    target_rng = random.Random(stable_seed(sample_seed, "target"))
    key = str(target_rng.randint(10_000, 99_999)) if kind == "number" else target_rng.choice(NOUNS)
    filler = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n_items)]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    filler.insert(_insert_at_depth(n_items, depth), needle)
    return {"context": " ".join(filler), "answer": [key], "needle": needle, "depth": depth}


def build_passkey_word(sample_seed: int, n_items: int, depth: float, shots: int = 0) -> dict:
    return build_passkey(sample_seed, n_items, depth, shots, kind="word")


BUILDERS = {"json_kv": build_json_kv, "passkey": build_passkey, "passkey_word": build_passkey_word, "ruler_mk_needle": build_mk_needle,
            "ruler_mk_uuid": build_mk_uuid, "ruler_mv": build_multivalue}


def fit_items_to_length(build, count_tokens, target_tokens: int, max_iterations: int = 12) -> tuple[int, dict]:
    """The largest item count whose rendered input fits in `target_tokens` (so nothing is truncated;
    the shortfall is under one item).

    `build(n)` returns template fields, `count_tokens(fields)` the model-input token count. Token
    counts grow almost linearly with n, so a secant step converges in a few tokenizations."""
    counts = {0: count_tokens(build(0))}
    probe = 32
    counts[probe] = count_tokens(build(probe))
    per_item = max((counts[probe] - counts[0]) / probe, 1e-3)
    n = max(0, round((target_tokens - counts[0]) / per_item))
    for _ in range(max_iterations):
        if n not in counts:
            counts[n] = count_tokens(build(n))
        step = round((target_tokens - counts[n]) / per_item)
        if step == 0 or n + step in counts:
            break
        n = max(0, n + step)
    # walk to the boundary: the largest n that fits, with n + 1 not fitting
    while n > 0 and counts[n] > target_tokens:
        n -= 1
        counts.setdefault(n, count_tokens(build(n)))
    while True:
        if n + 1 not in counts:
            counts[n + 1] = count_tokens(build(n + 1))
        if counts[n + 1] > target_tokens:
            break
        n += 1
    return n, build(n)


def needle_depths(num_samples: int, num_depths: int) -> list[float]:
    """Depths on the grid 0%, ..., 100% (`num_depths` points) stratified over the samples, for the
    depth x length heatmap: fewer samples than depths still span 0% to 100% evenly (3 samples of 11
    depths: 0%, 50%, 100%); more samples give each depth an equal share (+-1), spread in order."""
    if num_depths <= 1:
        return [0.5] * num_samples
    grid = [i / (num_depths - 1) for i in range(num_depths)]
    if num_samples < num_depths:
        if num_samples == 1:
            return [0.5]
        return [grid[round(i * (num_depths - 1) / (num_samples - 1))] for i in range(num_samples)]
    return [grid[i * num_depths // num_samples] for i in range(num_samples)]
