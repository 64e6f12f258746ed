#!/usr/bin/env python3
"""Writes the hand-made tokenizer fixture of the tokenizer tests and its expected ids.

  python3 tests/data/tokenizer/make_fixture.py     (needs the `regex` module for \\p{L})

llama3_tiny.json: a byte-level BPE tokenizer.json in the layout Llama 3 ships (Sequence of a
Split with Llama 3's regex and a ByteLevel step, ignore_merges, added special tokens), with the
256 byte tokens (id = byte value) and a few hand-picked merges. expected_ids.jsonl: the ids of
texts.jsonl's texts, computed here by a small independent Python implementation (the `regex`
module, not PCRE2). scripts/tokenizer_oracle.py --fixture checks the same file against the
`tokenizers` library on a machine that has it.
"""
import json
import os

import regex

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_to_unicode():
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


B2U = byte_to_unicode()


def bl(text):
    """Byte-level form of a text."""
    return "".join(B2U[b] for b in text.encode("utf-8"))


# Merges in rank order, written as the texts they join (the byte-level form is derived).
MERGE_TEXTS = [
    (" ", "t"), ("h", "e"), (" t", "he"), ("i", "n"), ("a", "t"), ("c", "at"), (" ", "c"),
    (" ", "in"), (" ", " "), ("  ", "  "), ("\n", "\n"), ("d", "e"), ("de", "f"), ("r", "e"),
    ("t", "u"), ("r", "n"), ("re", "tu"), ("retu", "rn"), (" ", "return"), ("1", "2"),
    ("12", "3"),
]
# CJK: 你 = E4 BD A0, 好 = E5 A5 BD; emoji 🙂 = F0 9F 99 82: merged from their bytes.
RAW_MERGES = [(bytes([0xE4]), bytes([0xBD])), (bytes([0xE4, 0xBD]), bytes([0xA0])),
              (bytes([0xE5]), bytes([0xA5])), (bytes([0xE5, 0xA5]), bytes([0xBD])),
              ("你".encode(), "好".encode()), (bytes([0xF0, 0x9F]), bytes([0x99, 0x82])),
              (bytes([0xF0]), bytes([0x9F])), (bytes([0x99]), bytes([0x82]))]
# A token reachable only through ignore_merges: " hat" has no merge path.
WHOLE_WORDS = [" hat"]
ADDED = [("<|begin_of_text|>", True), ("<|eot_id|>", True), ("<|x|>", True)]


def build():
    vocab = {B2U[b]: b for b in range(256)}
    merges = []

    def add(a, b):
        merges.append([a, b])
        if a + b not in vocab:
            vocab[a + b] = len(vocab)

    for a, b in MERGE_TEXTS:
        add(bl(a), bl(b))
    for a, b in RAW_MERGES:
        add("".join(B2U[x] for x in a), "".join(B2U[x] for x in b))
    for w in WHOLE_WORDS:
        vocab[bl(w)] = len(vocab)
    added = []
    for i, (content, special) in enumerate(ADDED):
        added.append({"id": len(vocab) + i, "content": content, "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False, "special": special})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def encode(tok, text):
    """The reference: added tokens (leftmost-longest), Split, ByteLevel, BPE."""
    vocab = tok["model"]["vocab"]
    ranks = {tuple(m): r for r, m in reversed(list(enumerate(tok["model"]["merges"])))}
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    ids, i, start = [], 0, 0

    def plain(s):
        for piece in regex.findall(LLAMA3_PATTERN, s):
            word = bl(piece)
            if tok["model"]["ignore_merges"] and word in vocab:
                ids.append(vocab[word])
                continue
            syms = list(word)
            while len(syms) > 1:
                best = min(range(len(syms) - 1),
                           key=lambda k: (ranks.get((syms[k], syms[k + 1]), 1 << 30), k))
                if (syms[best], syms[best + 1]) not in ranks:
                    break
                syms[best:best + 2] = [syms[best] + syms[best + 1]]
            ids.extend(vocab[s] for s in syms)

    while i < len(text):
        hits = [c for c in added if text.startswith(c, i)]
        if not hits:
            i += 1
            continue
        c = max(hits, key=len)
        plain(text[start:i])
        ids.append(added[c])
        i = start = i + len(c)
    plain(text[start:])
    return ids


def main():
    tok = build()
    with open(os.path.join(HERE, "llama3_tiny.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(os.path.join(HERE, "texts.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(HERE, "expected_ids.jsonl"), "w", encoding="utf-8") as f:
        for t in texts:
            # Invalid UTF-8 is given as latin-1 code points in "bytes"; decode as Python would.
            text = t["text"] if "text" in t else bytes(
                t["bytes"], "latin-1").decode("utf-8", errors="replace")
            f.write(json.dumps({"name": t["name"], "ids": encode(tok, text)}) + "\n")


if __name__ == "__main__":
    main()
