#!/usr/bin/env python3
"""Oracle: fp8kv's tokenizer against the Hugging Face `tokenizers` library (ids and text).

Run where `tokenizers` is installed (the GPU machine: transformers brings it); no download.

  1. Trains byte-level BPE tokenizers there on local text (the Python standard library's
     sources), one per pre-tokenizer kind fp8kv reads:
       llama3  Sequence[Split(Llama 3 regex, Isolated), ByteLevel(use_regex=False)], ignore_merges
       qwen2   Sequence[Split(Qwen2 regex), ByteLevel], NFC normalizer
       gpt2    ByteLevel(use_regex=True): GPT-2's regex; merges saved as "a b" strings
     each with special tokens, saved as tokenizer.json.
  2. For each tokenizer (and each --tokenizer FILE given, e.g. a model's own), encodes test texts
     with `tokenizers` (add_special_tokens=False, on the bytes decoded with errors="replace") and
     with `fp8kv tokenize`, and compares the ids; then decodes the ids both ways and compares the
     text. The texts mix English, code, CJK, emoji, whitespace runs, special tokens and invalid
     UTF-8, plus a slice of stdlib source and seeded random strings drawn from many Unicode
     blocks.
  3. --fixture: the hand-made test fixture (tests/data/tokenizer/llama3_tiny.json) encoded by
     `tokenizers` must give the ids committed in tests/data/tokenizer/expected_ids.jsonl (which
     the CPU tests hold fp8kv to).

Usage: scripts/tokenizer_oracle.py --fp8kv build-gpu/fp8kv [--out DIR] [--tokenizer FILE ...]
                                   [--fixture]
Exits 1 on any mismatch, printing the first differing position with the tokens around it.
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
         r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_files():
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "*.py")) + glob.glob(os.path.join(lib, "*/*.py")))
    if not files:
        sys.exit(f"tokenizer_oracle: no .py files under {lib}")
    return files


def read_texts(files, limit_bytes):
    out, total = [], 0
    for f in files:
        with open(f, "rb") as fh:
            t = fh.read().decode("utf-8", errors="replace")
        out.append(t)
        total += len(t)
        if total >= limit_bytes:
            break
    return out


def bpe_model(**kw):
    try:
        return models.BPE(**kw)
    except TypeError:  # an older `tokenizers` without ignore_merges
        kw.pop("ignore_merges", None)
        return models.BPE(**kw)


def train(kind, texts, vocab_size, path):
    if kind == "gpt2":
        tok = Tokenizer(bpe_model())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok = Tokenizer(bpe_model(ignore_merges=(kind == "llama3")))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3 if kind == "llama3" else QWEN2),
                                 behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(path)
    if kind == "gpt2":  # the other merges format: "a b" strings
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
        j["model"]["merges"] = [m if isinstance(m, str) else " ".join(m)
                                for m in j["model"]["merges"]]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(j, f, ensure_ascii=False)
    return path


def test_texts(stdlib_slice):
    """name -> bytes."""
    mixed = ("Hello, world! It's 2024; we'LL see. naïve café, Ünïcödé.\n"
             "def f(x):\n\treturn {'a': [1, 22, 333, 4444, 55555]}  # comment\n\n\n"
             "你好，世界！这是一个测试。日本語のテキスト、한국어 텍스트.\n"
             "emoji 🙂🙂 👍🏽 👨‍👩‍👧 🇫🇷 ❤️\n"
             "    indented    runs\t\t\tof  \u00a0 \u3000 whitespace   \r\n\r\n  \n"
             "<|begin_of_text|>special<|eot_id|> tokens <|end_of_text|>x<|eot_id")
    texts = {
        "mixed": mixed.encode(),
        "invalid": b"ok \xff\xfe the \xe4\xbd cat \xed\xa0\x80 \xf0\x9f\x99 end\xc3 \xc0\xaf" +
                   "你好".encode() + b"\x80\x80 tail\xe2\x82",
        "whitespace": b"   \n\n\t \t  x  \r\r\n\n    \x0b\x0c end   " +
                      "a\u180e\u180eb x  \u180e \u0085\u0085 \u2028\u2029 \u200b ".encode(),
        "stdlib": stdlib_slice.encode(),
        "empty": b"",
    }
    rng = random.Random(1234)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
              (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F),
              (0x2100, 0x27BF), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF),
              (0xFF00, 0xFFEF), (0x1D400, 0x1D4FF), (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF)]
    for k in range(4):
        chars = []
        for _ in range(3000):
            r = rng.random()
            if r < 0.15:
                chars.append(rng.choice(" \t\n\r  "))
            elif r < 0.25:
                chars.append(rng.choice("0123456789'.,;:!?()[]{}<>|"))
            else:
                lo, hi = rng.choice(blocks)
                chars.append(chr(rng.randint(lo, hi)))
        texts[f"random{k}"] = "".join(chars).encode("utf-8", errors="surrogatepass")
    return texts


def run_fp8kv(fp8kv, args, data=None):
    r = subprocess.run([fp8kv] + args, input=data, capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"fp8kv {' '.join(args)} failed: {r.stderr.decode(errors='replace')}")
    return r.stdout


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def check(fp8kv, tok_path, texts, workdir):
    ref = Tokenizer.from_file(tok_path)
    failures = 0
    for name, raw in texts.items():
        text = raw.decode("utf-8", errors="replace")
        want = ref.encode(text, add_special_tokens=False).ids
        src = os.path.join(workdir, name + ".txt")
        with open(src, "wb") as f:
            f.write(raw)
        line = run_fp8kv(fp8kv, ["tokenize", "--tokenizer", tok_path, src]).decode().strip()
        got = [int(x) for x in line.split(",")] if line else []
        status = "ok"
        if got != want:
            failures += 1
            i = first_difference(got, want)
            ctx = lambda ids: [ref.id_to_token(t) for t in ids[max(0, i - 3):i + 4]]
            status = (f"MISMATCH at id {i} of {len(want)} (ours {len(got)}): "
                      f"tokenizers {ctx(want)} vs fp8kv {ctx(got)}")
        else:
            ids_file = os.path.join(workdir, name + ".ids")
            with open(ids_file, "w") as f:
                f.write(line)
            ours = run_fp8kv(fp8kv, ["tokenize", "--decode", "--tokenizer", tok_path, ids_file])
            theirs = ref.decode(want, skip_special_tokens=False)
            if ours.decode("utf-8") != theirs:
                failures += 1
                status = "ids ok, DECODE MISMATCH"
        print(f"  {name:10s} {len(want):6d} ids  {status}")
    return failures


def check_fixture():
    d = os.path.join(ROOT, "tests", "data", "tokenizer")
    ref = Tokenizer.from_file(os.path.join(d, "llama3_tiny.json"))
    failures = 0
    with open(os.path.join(d, "texts.jsonl"), encoding="utf-8") as ft, \
         open(os.path.join(d, "expected_ids.jsonl"), encoding="utf-8") as fe:
        for lt, le in zip(ft, fe):
            t, e = json.loads(lt), json.loads(le)
            text = t["text"] if "text" in t else bytes(t["bytes"], "latin-1").decode(
                "utf-8", errors="replace")
            got = ref.encode(text, add_special_tokens=False).ids
            ok = got == e["ids"]
            failures += 0 if ok else 1
            print(f"  {t['name']:12s} {'ok' if ok else 'MISMATCH: tokenizers gives ' + str(got)}")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fp8kv", default=os.path.join(ROOT, "build-gpu", "fp8kv"))
    ap.add_argument("--out", default=None, help="keep the trained tokenizers here")
    ap.add_argument("--tokenizer", action="append", default=[], help="also check this file")
    ap.add_argument("--fixture", action="store_true", help="check the committed fixture ids")
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    args = ap.parse_args()

    import tokenizers
    print(f"tokenizers {tokenizers.__version__}, fp8kv {args.fp8kv}")
    workdir = tempfile.mkdtemp(prefix="tokenizer_oracle_")
    out = args.out or workdir
    os.makedirs(out, exist_ok=True)
    files = stdlib_files()
    texts = read_texts(files, int(args.corpus_mb * 1e6))
    held = read_texts(files[::-1][:5], 200_000)
    stdlib_slice = "".join(held)[:100_000]
    cases = test_texts(stdlib_slice)

    failures = 0
    if args.fixture:
        print("fixture tests/data/tokenizer/llama3_tiny.json vs expected_ids.jsonl")
        failures += check_fixture()
    paths = []
    for kind in ("llama3", "qwen2", "gpt2"):
        p = os.path.join(out, f"tokenizer_{kind}.json")
        train(kind, texts, args.vocab, p)
        paths.append(p)
    paths += args.tokenizer
    for p in paths:
        print(f"{p}")
        failures += check(args.fp8kv, p, cases, workdir)
    print(f"tokenizer_oracle: {'FAIL, ' + str(failures) + ' mismatch(es)' if failures else 'all ids and texts equal'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
