"""Tokenization throughput, side by side: `gpt-pretrain prepare` against Hugging Face
`tokenizers` (encode_batch, the same tokenizer.json) and tiktoken (GPT-2's ranks built from
vocab.json and merges.txt, since tiktoken cannot download here; encode_ordinary_batch), on the
same documents, at each thread count, interleaved in rounds. Also checks that prepare's token
stream equals `tokenizers`' ids (EOT before each document) on every document.

The corpus: the Gutenberg books (gutenberg_en.txt in --data, default $DATA_MIRROR or data/, split at its "<|endoftext|>"
separators into 112 documents) as JSON lines; `--repeat N` concatenates N copies (N = 14 is
about 1 GB).

    python scripts/prepare_bench.py [--binary target/release/gpt-pretrain] [--threads 1 2]
                                    [--rounds 2] [--repeat 1] [--data DIR]
                                    [--tools ours,tokenizers,tiktoken] [--no-check]

Needs tokenizers and tiktoken (pip install tokenizers tiktoken). Prints one line per
measurement and a markdown table of medians: MB of text per second, tokens per second and peak
RSS (of the whole process; Python's includes the interpreter). Record `lscpu`'s model name with it.
"""
import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

SEPARATOR = "\n<|endoftext|>\n"


def python_worker(tool, data, corpus, threads):
    """Runs in a child process: tokenizes every document; prints seconds and tokens."""
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    if tool == "tokenizers":
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(data, "gpt2", "tokenizer.json"))
        start = time.perf_counter()
        n = sum(len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False))
    else:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        ranks = data_gym_to_mergeable_bpe_ranks(
            os.path.join(data, "gpt2", "merges.txt"), os.path.join(data, "gpt2", "vocab.json")
        )
        enc = tiktoken.Encoding(
            "gpt2-local",
            pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": 50256},
        )
        start = time.perf_counter()
        n = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(docs, num_threads=threads))
    print(json.dumps({"seconds": time.perf_counter() - start, "tokens": n}))


def measure(cmd):
    """Runs cmd; returns (wall seconds, its stdout, its own peak RSS in MB, from wait4)."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = child.stdout.read(), child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({child.returncode}): {err.strip()}")
    return seconds, out, usage.ru_maxrss / 1024


def reference_stream(data, corpus):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(data, "gpt2", "tokenizer.json"))
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    stream = []
    for enc in tok.encode_batch(docs):
        stream.append(50256)
        stream.extend(enc.ids)
    return stream


def read_shards(out_dir):
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    tokens = []
    for shard in manifest["shards"]:
        raw = open(os.path.join(out_dir, shard["file"]), "rb").read()
        magic, version, count = struct.unpack("<3i", raw[:12])
        assert (magic, version) == (20240520, 1) and len(raw) == 1024 + 2 * count
        tokens.extend(struct.unpack(f"<{count}H", raw[1024:]))
    return tokens


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        python_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        # In a child of its own: the reference ids take GBs, which a later fork would inherit
        # into the children's peak RSS.
        print(read_shards(sys.argv[4]) == reference_stream(sys.argv[2], sys.argv[3]))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default="target/release/gpt-pretrain")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--data", default=os.environ.get("DATA_MIRROR", "data"))
    p.add_argument("--tools", default="ours,tokenizers,tiktoken")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    tools = args.tools.split(",")
    work = tempfile.mkdtemp(prefix="prepare-bench-")
    try:
        books = open(os.path.join(args.data, "gutenberg_en.txt"), encoding="utf-8").read().split(SEPARATOR)
        corpus = os.path.join(work, "gutenberg.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            for _ in range(args.repeat):
                for book in books:
                    f.write(json.dumps({"text": book}) + "\n")
        text_mb = sum(len(b.encode()) for b in books) * args.repeat / 1e6
        print(f"{len(books) * args.repeat} documents, {text_mb:.1f} MB of text", flush=True)

        results = {}
        for r in range(args.rounds):
            for threads in args.threads:
                for tool in tools:
                    if tool == "ours":
                        out_dir = os.path.join(work, f"shards-{threads}")
                        shutil.rmtree(out_dir, ignore_errors=True)
                        cmd = [args.binary, "prepare", corpus, "--out", out_dir, "--quiet",
                               "--tokenizer-path", os.path.join(args.data, "gpt2", "tokenizer.json"),
                               "--threads", str(threads), "--val-tokens", "1000000"]
                        seconds, _, rss = measure(cmd)
                        tokens = json.load(open(os.path.join(out_dir, "manifest.json")))["tokens"]
                        if not args.no_check and r == 0 and threads == args.threads[0]:
                            check = [sys.executable, __file__, "--check", args.data, corpus, out_dir]
                            ok = measure(check)[1].strip() == "True"
                            print(f"prepare's stream equals tokenizers' ids on every document: {ok}", flush=True)
                            if not ok:
                                sys.exit(1)
                    else:
                        cmd = [sys.executable, __file__, "--worker", tool, args.data, corpus, str(threads)]
                        _, out, rss = measure(cmd)
                        line = json.loads(out.strip().splitlines()[-1])
                        seconds, tokens = line["seconds"], line["tokens"]
                    results.setdefault((tool, threads), []).append((seconds, tokens, rss))
                    print(f"round {r + 1} {tool} {threads}t: {seconds:.1f} s, {text_mb / seconds:.2f} MB/s, "
                          f"{tokens / seconds / 1e6:.2f}M tokens/s, {rss:.0f} MB", flush=True)

        print("\n| tool | threads | MB/s | tokens/s | peak RSS | seconds (per round) |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for (tool, threads), runs in results.items():
            seconds = statistics.median(s for s, _, _ in runs)
            tokens = runs[0][1]
            rss = max(m for _, _, m in runs)
            per_round = " / ".join(f"{s:.1f}" for s, _, _ in runs)
            name = {"ours": "gpt-pretrain prepare (tokenize + write shards)",
                    "tokenizers": "HF tokenizers encode_batch",
                    "tiktoken": "tiktoken encode_ordinary_batch"}[tool]
            print(f"| {name} | {threads} | {text_mb / seconds:.2f} | {tokens / seconds / 1e6:.2f}M | {rss:.0f} MB | {per_round} |")
        print("\nOurs includes reading the JSON lines, writing and hashing the shards; Python's times "
              "only the encode call (the documents already in memory).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
