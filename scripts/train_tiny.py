#!/usr/bin/env python3
"""Trains fp8kv's small real model: a Llama-style (or Qwen2-style) decoder on the Python standard
library's sources, with a byte-level BPE tokenizer trained on the same text. No download: the
corpus is the .py files of the Python that runs this script.

  python3 scripts/train_tiny.py --out DIR --minutes 3 [--arch llama|qwen2]

Needs PyTorch, transformers and tokenizers, and a CUDA GPU (the GPU machine). What it does:
  1. corpus: every .py file under the stdlib folder (the `inspect` module's folder), sorted;
     every 25th file is held out (never trained on, tokenizer included).
  2. tokenizer: byte-level BPE trained with `tokenizers` (vocab --vocab, default 8192): the
     Llama 3 split regex (llama) or Qwen2's with an NFC normalizer (qwen2), special tokens
     <|begin_of_text|> and <|end_of_text|> (the latter separates files in the token stream).
  3. model: GQA 8 Q / 2 KV heads, head_dim 64, hidden 256, 6 layers, intermediate 768, tied
     embeddings (about 7.6 M parameters, ~15 MB in bf16; qwen2 adds q/k/v biases); AdamW on
     random windows of --seq-len tokens, bf16 autocast, cosine learning rate over the time box
     (--minutes of training, not counting the preparation).
  4. evaluation (bf16 weights, float32 compute): held-out perplexity over all held-out files,
     and over heldout.txt alone cut the way `fp8kv eval --text heldout.txt --seq-len N` cuts it.
  5. writes DIR/: config.json, model.safetensors (bf16), tokenizer.json (+ transformers'
     tokenizer_config.json), heldout.txt (a held-out slice), calib.txt (a training slice),
     greedy.json (transformers' greedy continuation of a fixed prompt, float32 compute on the
     bf16 weights, with the top-1/top-2 logit gap of each step) and README.md with the figures.
Exits 1 if model.safetensors exceeds 20 MB.
"""
import argparse
import glob
import inspect
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import tokenizers
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
         r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
HELD_OUT_EVERY = 25
SLICE_CHARS = 48_000
GREEDY_STEPS = 48
MAX_BYTES = 20_000_000


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus():
    """(train texts, held-out texts, stdlib folder, file counts)."""
    lib = os.path.dirname(inspect.__file__)
    files = sorted(f for f in glob.glob(os.path.join(lib, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and "dist-packages" not in f)
    if len(files) < 100:
        sys.exit(f"train_tiny: only {len(files)} .py files under {lib}: not a stdlib folder?")
    train, held = [], []
    for i, f in enumerate(files):
        with open(f, "rb") as fh:
            text = fh.read().decode("utf-8", errors="replace")
        if text.strip():
            (held if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2 else train).append(text)
    return train, held, lib, len(files)


def train_tokenizer(texts, arch, vocab_size):
    try:
        model = models.BPE(ignore_merges=True)
    except TypeError:  # older tokenizers
        model = models.BPE()
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3 if arch == "llama" else QWEN2), behavior="isolated",
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if arch == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok, texts, eos):
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def text_slice(texts, chars):
    """The first `chars` characters of the texts joined, cut at a line end."""
    s = "".join(texts)[:chars]
    return s[:s.rfind("\n") + 1]


def make_model(arch, vocab, bos, eos):
    common = dict(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos)
    if arch == "llama":
        config = LlamaConfig(**common, attention_bias=False, mlp_bias=False)
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(**common, use_sliding_window=False)
        model = Qwen2ForCausalLM(config)
    k = model.model.layers[0].self_attn.k_proj.weight
    if tuple(k.shape) != (2 * 64, 256):  # an older transformers that ignores head_dim
        sys.exit(f"train_tiny: k_proj is {tuple(k.shape)}, expected (128, 256): this "
                 f"transformers {transformers.__version__} ignores head_dim for {arch}")
    return config, model


@torch.no_grad()
def mean_nll(model, seqs, device, batch=32):
    """Mean next-token NLL over all predicted positions of `seqs` (lists of ids, any lengths)."""
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        group = seqs[i:i + batch]
        lens = {len(s) for s in group}  # equal lengths batched; a shorter rest runs alone
        for n in sorted(lens):
            same = [s for s in group if len(s) == n]
            x = torch.tensor(same, dtype=torch.int64, device=device)
            logits = model(input_ids=x).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  x[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += x.shape[0] * (n - 1)
    return total / max(count, 1), count


def chunk(ids, seq_len):
    """As fp8kv's load_text_data: sequences of seq_len, a rest of >= 2 tokens last."""
    out = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    return [s for s in out if len(s) >= 2]


@torch.no_grad()
def greedy(model, prompt_ids, steps, device):
    ids, gaps = list(prompt_ids), []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
        top = torch.topk(logits, 2)
        ids.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
    return ids[len(prompt_ids):], gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--minutes", type=float, default=3.0, help="training time box")
    ap.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-tokens", type=int, default=1_000_000,
                    help="held-out tokens for the full held-out perplexity (at most)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("train_tiny: no CUDA GPU (this script trains on the GPU machine)")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda"
    os.makedirs(args.out, exist_ok=True)

    train_texts, held_texts, lib, n_files = corpus()
    log(f"corpus: {lib}: {n_files} files, {len(train_texts)} train "
        f"({sum(map(len, train_texts)) / 1e6:.1f} M chars), {len(held_texts)} held out "
        f"({sum(map(len, held_texts)) / 1e6:.1f} M chars)")
    tok = train_tokenizer(train_texts, args.arch, args.vocab)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    vocab = tok.get_vocab_size()
    log(f"tokenizer: {vocab} tokens")
    train_ids = token_stream(tok, train_texts, eos).to(device)
    held_ids = token_stream(tok, held_texts, eos)[:args.eval_tokens].tolist()
    log(f"tokens: {train_ids.numel() / 1e6:.2f} M train, {len(held_ids) / 1e6:.2f} M held out")

    config, model = make_model(args.arch, vocab, bos, eos)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {args.arch}, {n_params / 1e6:.2f} M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)
    held_seqs = chunk(held_ids, args.seq_len)
    model.eval()
    nll0, _ = mean_nll(model, held_seqs[:64], device)
    model.train()
    log(f"held-out perplexity before training (64 windows): {math.exp(nll0):.1f}")

    budget = args.minutes * 60.0
    warmup = 200
    offsets = torch.arange(args.seq_len + 1, device=device)
    start, step, tokens_seen, loss_ema = time.time(), 0, 0, None
    while True:
        frac = (time.time() - start) / budget
        if frac >= 1.0:
            break
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))
        lr = args.lr * min(1.0, (step + 1) / warmup) * cosine
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,),
                               device=device)
        x = train_ids[starts[:, None] + offsets[None, :]]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += args.batch * args.seq_len
        if step % 100 == 0:
            l = loss.item()
            loss_ema = l if loss_ema is None else 0.9 * loss_ema + 0.1 * l
            log(f"step {step}: loss {l:.3f} (ema {loss_ema:.3f}), lr {lr:.2e}, "
                f"{tokens_seen / 1e6:.0f} M tokens, {time.time() - start:.0f} s")
    train_seconds = time.time() - start
    log(f"trained {step} steps, {tokens_seen / 1e6:.1f} M tokens in {train_seconds:.0f} s")

    # The saved model is bf16; every figure below is of those weights, computed in float32.
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(args.out, safe_serialization=True)
    # tokenizer_config.json for transformers users; then tokenizer.json as trained, exactly.
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS).save_pretrained(
        args.out)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    evalm = model.float().eval()

    nll, n_eval = mean_nll(evalm, held_seqs, device)
    ppl = math.exp(nll)
    log(f"held-out perplexity: {ppl:.3f} over {n_eval} predicted tokens")
    heldout = text_slice(held_texts, SLICE_CHARS)
    calib = text_slice(train_texts[len(train_texts) // 2:], SLICE_CHARS)
    for name, text in (("heldout.txt", heldout), ("calib.txt", calib)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write(text)
    slice_ids = tok.encode(heldout, add_special_tokens=False).ids
    slice_nll, slice_n = mean_nll(evalm, chunk(slice_ids, args.seq_len), device)
    slice_ppl = math.exp(slice_nll)
    log(f"heldout.txt: {len(slice_ids)} tokens, perplexity {slice_ppl:.3f} (--seq-len {args.seq_len})")

    prompt_ids = tok.encode(PROMPT, add_special_tokens=False).ids
    gen, gaps = greedy(evalm, prompt_ids, GREEDY_STEPS, device)
    text = tok.decode(gen, skip_special_tokens=False)
    log(f"greedy continuation:\n{PROMPT}{text}")
    with open(os.path.join(args.out, "greedy.json"), "w", encoding="utf-8") as f:
        json.dump({"prompt": PROMPT, "prompt_ids": prompt_ids, "ids": gen, "text": text,
                   "top1_top2_gap": gaps, "compute": "float32 on the bf16 weights, no KV cache",
                   "transformers": transformers.__version__, "torch": torch.__version__}, f,
                  indent=1, ensure_ascii=False)
        f.write("\n")

    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    regex_name = "Llama 3" if args.arch == "llama" else "Qwen2 (with an NFC normalizer)"
    readme = f"""# tiny-stdlib-{args.arch}

A small {'Llama' if args.arch == 'llama' else 'Qwen2'}-style model trained by
`scripts/train_tiny.py --out DIR --minutes {args.minutes:g} --arch {args.arch}` on the Python
{platform.python_version()} standard library's sources: {len(train_texts)} files for training,
{len(held_texts)} held out (every {HELD_OUT_EVERY}th file, sorted by path; never seen by the
model or the tokenizer).

| | |
| --- | --- |
| architecture | {config.architectures[0] if config.architectures else type(model).__name__}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate {config.intermediate_size}, {config.num_attention_heads} Q / {config.num_key_value_heads} KV heads, head_dim 64, tied embeddings{', q/k/v biases' if args.arch == 'qwen2' else ''} |
| parameters | {n_params / 1e6:.2f} M, model.safetensors {size / 1e6:.1f} MB (bf16) |
| tokenizer | byte-level BPE, {vocab} tokens, {regex_name} split regex, trained by tokenizers {tokenizers.__version__} |
| training | {step} steps of {args.batch} x {args.seq_len} tokens ({tokens_seen / 1e6:.0f} M tokens, {train_seconds / 60:.1f} min), AdamW lr {args.lr:g} cosine, bf16 autocast, seed {args.seed} |
| held-out perplexity | **{ppl:.2f}** over {n_eval} predicted tokens (windows of {args.seq_len}; {math.exp(nll0):.0f} before training) |
| heldout.txt perplexity | {slice_ppl:.2f} ({len(slice_ids)} tokens cut as `fp8kv eval --text heldout.txt --seq-len {args.seq_len}` does) |

Figures are of the saved bf16 weights computed in float32 (transformers {transformers.__version__},
torch {torch.__version__}). `calib.txt` is a slice of training text for calibration,
`heldout.txt` a slice of held-out text for evaluation. `greedy.json`: transformers' greedy
continuation ({GREEDY_STEPS} tokens, no BOS) of the prompt below, with each step's gap between
the top two logits:

```
{PROMPT}{text}
```
"""
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme)
    log(f"wrote {args.out}: model.safetensors {size / 1e6:.1f} MB")
    if size > MAX_BYTES:
        sys.exit(f"train_tiny: model.safetensors is {size / 1e6:.1f} MB, over the 20 MB budget")


if __name__ == "__main__":
    main()
