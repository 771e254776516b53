"""Data: the embedded public-domain corpus and tokenizer (`tiny`), and Hub dataset loaders (`gpu`, `paper`).

Embedded corpus: 42 Shakespeare works and 4 Milton works from Project Gutenberg, shipped compressed in
`effllm_utils/data/corpus.jsonl.xz` (provenance: scripts/prepare_corpus.py and data/CORPUS_PROVENANCE.json).
Splits are per document: the last `VALID_FRACTION` of every work (cut at a line break) is validation, the rest
train, so both splits see every author and genre and no text is in both. `domain="milton"` is the held-out domain.

Tokenizer: byte-level BPE trained with `tokenizers` on the train split of the whole corpus, cached under
$EFFLLM_CACHE/tokenizers/, returned as a `transformers.PreTrainedTokenizerFast`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import lzma
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from effllm_utils import cache_dir

VALID_FRACTION = 0.05
DOMAINS = ("shakespeare", "milton")
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}


@functools.lru_cache(maxsize=1)
def _documents_raw() -> bytes:
    return lzma.decompress(resources.files("effllm_utils").joinpath("data/corpus.jsonl.xz").read_bytes())


def documents(domain: str | None = None) -> list[dict]:
    """Every embedded work as {id, title, author, domain, text}; `domain` filters ('shakespeare' or 'milton')."""
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown corpus domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    docs = [json.loads(line) for line in _documents_raw().decode().splitlines()]
    return [d for d in docs if domain is None or d["domain"] == domain]


def _split_point(text: str) -> int:
    cut = int(len(text) * (1 - VALID_FRACTION))
    nl = text.rfind("\n", 0, cut)
    return nl + 1 if nl > 0 else cut


def corpus_text(split: str, domain: str | None = "shakespeare") -> str:
    """The concatenated text of one split ('train' or 'validation') of one domain (None: both domains)."""
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'validation'")
    parts = []
    for d in documents(domain):
        cut = _split_point(d["text"])
        parts.append(d["text"][:cut] if split == "train" else d["text"][cut:])
    return "\n\n".join(parts)


_SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,30})\.$")


def dialogue_pairs(split: str, max_chars: int = 400) -> list[tuple[str, str]]:
    """An instruction-style set from the plays: (instruction, response) where the instruction quotes one speech and
    names the next speaker, and the response is that next speech. Built from the given split of every Shakespeare
    work (speeches are blocks that start with a speaker line such as "Ham." or "HAMLET."); long speeches are cut at
    `max_chars` on a line break. Deterministic."""
    pairs = []
    for text in corpus_text(split, "shakespeare").split("\n\n\n"):
        speeches = []
        for block in text.split("\n\n"):
            lines = [ln for ln in block.strip().split("\n") if ln.strip() and not ln.lstrip().startswith("[")]
            if len(lines) >= 2 and (m := _SPEAKER.match(lines[0].strip())):
                speech = "\n".join(ln.strip() for ln in lines[1:])
                if len(speech) > max_chars:
                    head = speech[:max_chars]
                    speech = speech[:speech.rfind("\n", 0, max_chars)] if "\n" in head else head
                speeches.append((m.group(1).strip(), speech))
            else:
                speeches.append(None)  # a scene heading or stage direction breaks the exchange
        for a, b in zip(speeches, speeches[1:]):
            if a and b and a[0] != b[0]:
                pairs.append((f"{a[0]} says:\n{a[1]}\n\nReply as {b[0]}.", b[1]))
    return pairs


def sft_examples(pairs: list[tuple[str, str]], tok, seq_len: int) -> dict:
    """Tokenised SFT examples {"input_ids", "labels"} of shape [N, seq_len]: the prompt
    "### Instruction:\n...\n\n### Response:\n" carries no loss (-100), the response and EOS do; right-padded.
    An instruction too long for the context is cut from the left (its end, which says what to answer, stays) so the
    response keeps at least half of the sequence."""
    import torch

    head = tok("### Instruction:\n")["input_ids"]
    tail = tok("\n\n### Response:\n")["input_ids"]
    ids = torch.full((len(pairs), seq_len), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), seq_len), -100, dtype=torch.long)
    for i, (instruction, response) in enumerate(pairs):
        answer = tok(response)["input_ids"] + [tok.eos_token_id]
        room = max(0, seq_len - len(head) - len(tail) - min(len(answer), seq_len // 2))
        instr = tok(instruction)["input_ids"]
        prompt = head + (instr[-room:] if room else []) + tail
        seq = (prompt + answer)[:seq_len]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt):len(seq)] = torch.tensor(seq[len(prompt):], dtype=torch.long)
    keep = (labels != -100).any(1)  # a template longer than seq_len leaves nothing to learn
    return {"input_ids": ids[keep], "labels": labels[keep]}


def corpus_sha256() -> str:
    return hashlib.sha256(_documents_raw()).hexdigest()


def train_tokenizer(vocab_size: int = 4096, min_frequency: int = 2, texts: Iterator[str] | None = None):
    """Train a byte-level BPE tokenizer (no caching) and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if texts is None:
        texts = iter([corpus_text("train", None)])
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def tokenizer(vocab_size: int = 4096):
    """The suite's tokenizer for the embedded corpus, trained once and cached (keyed by corpus and vocab size)."""
    from transformers import PreTrainedTokenizerFast

    path = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{corpus_sha256()[:12]}"
    if not (path / "tokenizer.json").is_file():
        from effllm_utils.core.runs import atomic_dir

        with atomic_dir(path) as tmp:
            train_tokenizer(vocab_size).save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(path)


def token_ids(split: str, tok, domain: str | None = "shakespeare"):
    """The split encoded as one flat int64 tensor (documents joined by EOS), for LM training and perplexity.
    Cached under $EFFLLM_CACHE/tokens/, keyed by the corpus, the tokenizer's vocabulary, the split and domain."""
    import torch

    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'validation'")
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:12]
    path = cache_dir() / "tokens" / f"{corpus_sha256()[:12]}-{vocab}-{domain or 'all'}-{split}.pt"
    if path.is_file():
        return torch.load(path)
    ids: list[int] = []
    for d in documents(domain):
        cut = _split_point(d["text"])
        ids += tok(d["text"][:cut] if split == "train" else d["text"][cut:])["input_ids"] + [tok.eos_token_id]
    out = torch.tensor(ids, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Hub datasets for the gpu / paper profiles
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubDataset:
    key: str
    path: str
    config: str | None
    split: str
    prompt: str  # column holding the text (pretraining) or the instruction (SFT)
    responses: tuple[str, ...]  # SFT answer columns, joined; empty for plain text
    note: str

    def to_text(self, row: dict) -> str:
        if not self.responses:
            return str(row[self.prompt])
        body = "\n\n".join(str(row[k]) for k in self.responses if row.get(k))
        return f"### Instruction:\n{row[self.prompt]}\n\n### Response:\n{body}"


HUB_DATASETS: dict[str, HubDataset] = {d.key: d for d in [
    HubDataset("fineweb_edu", "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text", (),
               "pretraining corpus of the paper (its 10B-token sample)"),
    HubDataset("openo1_sft", "O1-OPEN/OpenO1-SFT", None, "train", "instruction", ("output",),
               "the paper's general fine-tuning set (Table 7)"),
    HubDataset("medical_o1", "FreedomIntelligence/medical-o1-reasoning-SFT", "en", "train", "Question",
               ("Complex_CoT", "Response"), "the paper's domain fine-tuning set (Table 8)"),
]}


class DatasetUnavailable(RuntimeError):
    """A Hub dataset needed by a profile cannot be loaded (offline, not cached, or not accessible)."""


def load_hub_dataset(key: str, limit: int | None = None, streaming: bool = False, data_files: str | None = None):
    """A Hub dataset by its effllm key, with a `text` column added (the formatted training text).

    data_files: load a local copy instead (JSON/JSONL/Parquet/CSV with the Hub dataset's columns) — for
    air-gapped clusters, and how the tests exercise this code. Offline or unreachable: DatasetUnavailable with one
    line saying what to do."""
    import datasets

    if key not in HUB_DATASETS:
        raise ValueError(f"unknown dataset {key!r}; choose one of {', '.join(HUB_DATASETS)}")
    spec = HUB_DATASETS[key]
    split = spec.split if limit is None or streaming else f"{spec.split}[:{limit}]"
    try:
        if data_files:
            fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(Path(data_files).suffix)
            if fmt is None:
                raise ValueError(f"data_files {data_files!r}: use a .jsonl, .json, .parquet or .csv file")
            ds = datasets.load_dataset(fmt, data_files=data_files, split=split, streaming=streaming)
        else:
            ds = datasets.load_dataset(spec.path, spec.config, split=split, streaming=streaming)
    except (ConnectionError, OSError, FileNotFoundError) as e:
        where = data_files or f"{spec.path}" + (f" ({spec.config})" if spec.config else "")
        raise DatasetUnavailable(
            f"dataset {key!r} ({where}) could not be loaded: {type(e).__name__}: {str(e).splitlines()[0][:200]} — "
            f"the gpu/paper profiles need it: run with network access to the Hugging Face Hub, pre-download it into "
            f"$HF_HOME, or pass a local copy with data_files=") from None
    if streaming and limit is not None:
        ds = ds.take(limit)
    missing = [c for c in (spec.prompt, *spec.responses) if c not in (ds.column_names or [])]
    if missing:
        raise DatasetUnavailable(f"dataset {key!r}: columns {missing} missing (has {ds.column_names}); "
                                 f"is this the right dataset?")
    return ds.map(lambda row: {"text": spec.to_text(row)})


def hub_token_ids(key: str, tok, n_tokens: int, data_files: str | None = None, batch_docs: int = 512):
    """The first `n_tokens` tokens of a Hub dataset's text (documents joined by EOS) as a memory-mapped int32
    tensor: tokenized once (streaming, in batches), written to $EFFLLM_CACHE/tokens/ and mapped from disk after
    that, so training at paper scale never holds the token stream in RAM (pages are read on demand and shared by
    every process on the node). The file is written under a temporary name and renamed when complete; a `.json`
    beside it records what it holds. Fewer tokens in the dataset than asked: a ValueError saying how many."""
    import numpy as np
    import torch

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if len(tok) >= 2**31:
        raise ValueError(f"vocabulary of {len(tok)} does not fit int32 token files")
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:12]
    source = hashlib.sha256(str(Path(data_files).resolve()).encode()).hexdigest()[:8] if data_files else "hub"
    path = cache_dir() / "tokens" / f"{key}-{source}-{vocab}-{n_tokens}.i32"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        written = 0
        try:
            with open(tmp, "wb") as f:
                batch: list[str] = []

                def flush() -> int:
                    ids = [t + [tok.eos_token_id] for t in tok(batch)["input_ids"]]
                    flat = np.fromiter((i for doc in ids for i in doc), dtype=np.int32)[:n_tokens - written]
                    f.write(flat.tobytes())
                    batch.clear()
                    return len(flat)

                for row in load_hub_dataset(key, streaming=True, data_files=data_files):
                    batch.append(row["text"])
                    if len(batch) == batch_docs:
                        written += flush()
                        if written >= n_tokens:
                            break
                if batch and written < n_tokens:
                    written += flush()
            if written < n_tokens:
                raise ValueError(f"dataset {key!r} has {written:,} tokens in this tokenizer, fewer than the "
                                 f"{n_tokens:,} asked for; lower train_tokens")
            tmp.replace(path)
            meta = {"dataset": key, "data_files": data_files, "tokens": n_tokens, "dtype": "int32", "vocab_sha": vocab}
            path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        finally:
            tmp.unlink(missing_ok=True)
    return torch.from_file(str(path), shared=True, size=n_tokens, dtype=torch.int32)

