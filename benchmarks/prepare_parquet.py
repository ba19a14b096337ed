"""Tokenizing throughput of `lab prepare` on a Parquet file, against the straightforward loop people
write for FineWeb (tiktoken's encode_ordinary_batch over row groups, one process per core, the ids
appended to a file), on the same file and the same cores, the two interleaved round by round so a
busy machine slows both alike.

    python -m benchmarks.prepare_parquet --mb 64 --rounds 3 --workers 2

The file is in FineWeb-Edu's schema (text, id, dump, url, date, file_path, language, language_score,
token_count, score, int_score), its documents paragraphs of the tinyshakespeare that ships with lab,
shuffled and joined to FineWeb's median document length (~2.5 KB): no download. MB/s counts the UTF-8
bytes of the text.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

FIELDS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")


def fineweb_table(texts: list):
    """A pyarrow table of the texts in FineWeb-Edu's columns (the other columns made up)."""
    import pyarrow as pa

    n = len(texts)
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "id": [f"<urn:uuid:{i:08x}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "date": ["2024-02-21T00:00:00Z"] * n,
            "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.95] * n,
            "token_count": [len(t or "") // 4 for t in texts],
            "score": [3.1] * n,
            "int_score": [3] * n,
        }
    )


def fineweb_parquet(path: Path, megabytes: float, seed: int = 0, rows_per_group: int = 4096) -> int:
    """A Parquet file of about `megabytes` MB of text in FineWeb's columns; returns its text bytes."""
    import pyarrow.parquet as pq

    from lab_memmap.embedded import CORPUS

    paragraphs = [p for p in CORPUS.read_text().split("\n\n") if p.strip()]
    rng = random.Random(seed)
    docs, total = [], 0
    while total < megabytes * 1e6:
        doc, size = [], 0
        while size < 2500:
            doc.append(rng.choice(paragraphs))
            size += len(doc[-1]) + 2
        docs.append("\n\n".join(doc))
        total += len(docs[-1].encode())
    table = fineweb_table(docs)
    pq.write_table(table, path, row_group_size=rows_per_group)
    return total


_encoding = None


def _encode_batch(texts: list[str]) -> np.ndarray:
    global _encoding
    if _encoding is None:
        from lab.data.prepare import build_tokenizer

        _encoding = build_tokenizer("gpt2").encoding  # the same BPE files lab's tokenizer reads
    eot = _encoding.eot_token
    ids = [token for doc in _encoding.encode_ordinary_batch(texts) for token in (eot, *doc)]
    return np.array(ids, dtype=np.uint16)


def baseline(path: Path, out: Path, workers: int) -> None:
    """The straightforward loop: row groups of text to a pool running encode_ordinary_batch."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    batches = (
        parquet.read_row_group(i, columns=["text"]).column(0).to_pylist()
        for i in range(parquet.num_row_groups)
    )
    with multiprocessing.Pool(workers) as pool, open(out, "wb") as f:
        for ids in pool.imap(_encode_batch, batches):
            ids.tofile(f)


def lab_prepare(path: Path, out: Path, workers: int) -> None:
    from lab.data.prepare import build_tokenizer
    from lab.data.shards import Settings, prepare_shards

    settings = Settings(inputs=[str(path)], dataset=None, val_fraction=0.001)
    prepare_shards(settings, out, build_tokenizer("gpt2"), workers, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="MB of text in the Parquet file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lab-bench-"))
    try:
        path = work / "fineweb.parquet"
        nbytes = fineweb_parquet(path, args.mb)
        times = {"tiktoken loop": [], "lab prepare": []}
        for _ in range(args.rounds):
            for name, run in (("tiktoken loop", baseline), ("lab prepare", lab_prepare)):
                out = work / name.replace(" ", "-")
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir() if name == "tiktoken loop" else None
                start = time.perf_counter()
                run(path, out / "ids.bin" if name == "tiktoken loop" else out, args.workers)
                times[name].append(time.perf_counter() - start)
        cpu = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?"
        )
        print(
            f"{cpu}, {os.cpu_count()} cores visible; {nbytes / 1e6:.1f} MB of text, "
            f"{args.workers} workers, {args.rounds} rounds"
        )
        print("| | median s | MB/s (median) | MB/s (best) |\n|---|---|---|---|")
        for name, ts in times.items():
            print(
                f"| {name} | {statistics.median(ts):.2f} | {nbytes / 1e6 / statistics.median(ts):.2f} "
                f"| {nbytes / 1e6 / min(ts):.2f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
