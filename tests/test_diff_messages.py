"""What `diff`, `import --delta-of`, `ls` and `show` say about sizes, and diff-eval's early corpus check.

Sizes are checked against the artifact directories' files read directly here (os.walk + stat):
an artifact's stored size is all its files (each inode once), whatever else the store holds; the
part another artifact also links is reported as shared, the rest as new / unique.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from tensorstore_llm.store.store import Store
from tensorstore_llm.units import format_size

RATIO = re.compile(r"\(([\d.]+ \w+) on disk for ([\d.]+ \w+) of tensors, ([\d.]+)x smaller; (.*); delta depth 1\)")


def _inodes(path: str) -> dict[tuple, int]:
    """(dev, inode) -> size of every file under ``path``."""
    out = {}
    for directory, _, names in os.walk(path):
        for n in names:
            st = os.stat(os.path.join(directory, n))
            out[(st.st_dev, st.st_ino)] = st.st_size
    return out


def _diff_line(cli, root: str, ft: str) -> tuple[str, str, str, str]:
    code, out, err = cli("--store", root, "diff", ft, "--base", "base", "--name", "ft-diff")
    assert code == 0, err
    match = RATIO.search(out)
    assert match, out
    return match.groups()


def test_the_ratio_is_the_artifacts_own_whether_or_not_its_blocks_are_shared(tmp_path, cli, tiny_family):
    alone, shared = str(tmp_path / "alone"), str(tmp_path / "shared")
    for root in (alone, shared):
        assert cli("--store", root, "import", tiny_family["base"], "--name", "base")[0] == 0
    # the same fine-tune first stored as a delta checkpoint: the diff's coded blocks are the same bytes
    code, out, err = cli("--store", shared, "import", tiny_family["ft1"], "--delta-of", "base", "--name", "ft")
    assert code == 0, err
    # its carried files (config.json, ...) are the base's: linked, not copied (store/dedup.py)
    base_art, ft_art = Store(shared).get("base"), Store(shared).get("ft")
    carried = sum(os.path.getsize(os.path.join(ft_art.path, "files", n)) for n, c in ft_art.manifest.files.items()
                  if base_art.manifest.files.get(n) == c)
    assert carried > 0 and f"{format_size(carried)} already there (shared with other artifacts)" in out
    size_a, logical_a, ratio_a, added_a = _diff_line(cli, alone, tiny_family["ft1"])
    size_s, logical_s, ratio_s, added_s = _diff_line(cli, shared, tiny_family["ft1"])
    assert (size_a, logical_a, ratio_a) == (size_s, logical_s, ratio_s)
    alone_disk = sum(_inodes(Store(alone).get("ft-diff").path).values())
    assert added_a == (f"{format_size(alone_disk - carried)} new in the store, {format_size(carried)} already there "
                       f"(shared with other artifacts)")

    # against the files themselves
    d_alone, d_shared, ft = (Store(alone).get("ft-diff"), Store(shared).get("ft-diff"), Store(shared).get("ft"))
    files = _inodes(d_shared.path)
    disk = sum(files.values())
    assert disk == sum(_inodes(d_alone.path).values())
    assert size_s == format_size(disk)
    assert float(ratio_s) == pytest.approx(d_shared.manifest.nbytes / disk, abs=0.006)
    common = sum(size for key, size in files.items() if key in _inodes(ft.path))
    assert common > 0.5 * disk                           # the coded blocks are shared with ft
    assert added_s == (f"{format_size(disk - common)} new in the store, {format_size(common)} already there "
                       f"(shared with other artifacts)")

    # ls: STORED is each artifact's own size (ft is not halved), UNIQUE / shared_bytes the dedup
    rows = {r["tags"][0]: r for r in json.loads(cli("--store", shared, "ls", "--json")[1])}
    assert rows["ft-diff"]["stored_bytes"] == disk and rows["ft-diff"]["shared_bytes"] == common
    assert rows["ft-diff"]["unique_bytes"] == disk - common
    assert rows["ft"]["stored_bytes"] == sum(_inodes(ft.path).values())
    assert rows["ft"]["shared_bytes"] == common
    alone_rows = {r["tags"][0]: r for r in json.loads(cli("--store", alone, "ls", "--json")[1])}
    assert alone_rows["ft-diff"]["stored_bytes"] == disk and alone_rows["ft-diff"]["shared_bytes"] == carried
    code, table, _ = cli("--store", shared, "ls")
    assert code == 0 and "STORED" in table and "UNIQUE" in table
    every_file: dict = {}
    for a in Store(shared).list():
        every_file.update(_inodes(a.path))
    assert f"total on disk {format_size(sum(every_file.values()))} (each shared file once)" in table

    # show says the same, labelled
    out = cli("--store", shared, "show", "ft-diff")[1]
    assert (f"stored    {format_size(disk)} on disk, {ratio_s}x smaller than its tensors; {format_size(common)} of it "
            f"shared with other artifacts, {format_size(disk - common)} its own only") in out
    assert f"{format_size(carried)} of it shared with other artifacts" in cli("--store", alone, "show", "ft-diff")[1]


def _tiny_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer of 512 tokens (the tiny preset's vocabulary) saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["streams of tensors and held-out text about models " * 50], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)


def test_diff_eval_checks_the_corpus_before_opening_the_candidate_or_loading_a_model(tmp_path, cli, tiny_family):
    pytest.importorskip("transformers")
    import shutil

    ref = str(tmp_path / "ref")
    shutil.copytree(tiny_family["ft1"], ref)
    _tiny_tokenizer(ref)
    short = tmp_path / "short.txt"
    short.write_text("too short for sixteen windows")
    # the candidate does not exist: were it opened (or a model loaded) first, that would be the error
    code, out, err = cli("diff-eval", str(tmp_path / "no-such-model"), "--reference", ref, "--corpus", str(short))
    assert code == 7, (out, err)
    assert "fewer than the 16 asked for (--batches x --batch-size)" in err and str(short) in err
    # with enough text the check passes and the candidate is the next problem
    long_text = tmp_path / "long.txt"
    long_text.write_text("held-out text about streams and tensors. " * 4000)
    code, out, err = cli("diff-eval", str(tmp_path / "no-such-model"), "--reference", ref, "--corpus", str(long_text),
                         "--seq-len", "16")
    assert code != 0 and "no-such-model" in err and "windows" not in err


@pytest.mark.parametrize("corpus", ["literature.txt", "docstrings.jsonl"])
def test_quick_count_equals_the_transformers_tokenizers_count(corpus):
    """check_corpus_length counts exactly what eval_text tokenizes (real SmolLM2 tokenizer: BOS /
    post-processing and the EOS join included)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from tensorstore_llm.diff.evaluate import check_corpus_length
    from tensorstore_llm.errors import DatasetMismatch
    from tensorstore_llm.hf.corpus import read_corpus
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    folder = smollm2_checkpoint("bfloat16")
    files = {n: os.path.join(folder, n) for n in os.listdir(folder)}
    path = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", corpus)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    want = len(tokenizer(tokenizer.eos_token.join(read_corpus(path, tokenizer=tokenizer).documents))["input_ids"])
    windows = want // 64
    assert check_corpus_length(files, path, seq_len=64, batches=1, batch_size=windows) == want
    with pytest.raises(DatasetMismatch, match=f"{want} tokens make {windows} windows of 64, fewer than the "
                                              f"{windows + 1} asked for"):
        check_corpus_length(files, path, seq_len=64, batches=1, batch_size=windows + 1)
