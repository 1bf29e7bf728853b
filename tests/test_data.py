"""The data package: split arithmetic, window coverage, resumable batches, caching, and every bad input."""

import gzip
import hashlib
import io
import multiprocessing
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import data
from data import Enwik8DataModule, SyntheticDataModule, TextDataModule, WikiText103DataModule
from data.cache import atomic_path
from conftest import require_shared
from fma.errors import ConfigurationError

SPLIT_BYTES = (900, 50, 50)  # enwik8's layout, 10^5 times smaller
WIKI_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


def write_enwik8(directory: Path, content: bytes, kind: str = "raw", member: str = "enwik8") -> Path:
    """`content` as a raw enwik8 file, an enwik8.zip holding `member`, or an enwik8.gz."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / {"raw": "enwik8", "zip": "enwik8.zip", "gz": "enwik8.gz"}[kind]
    if kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(member, content)
    else:
        path.write_bytes(gzip.compress(content) if kind == "gz" else content)
    return path


def counting_bytes(count: int = 1000) -> bytes:
    """Byte i is i % 256, so within any 256 consecutive bytes a token's value tells its position."""
    return bytes(i % 256 for i in range(count))


def small(tmp_path: Path, **settings) -> dict:
    """Constructor arguments for a tiny run caching under tmp_path/cache, with `settings` on top."""
    return {"seq_len": 8, "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **settings}


def enwik8_module(tmp_path: Path, **settings) -> Enwik8DataModule:
    """enwik8 over the 1000 counting bytes, split 900/50/50."""
    path = write_enwik8(tmp_path / "source", counting_bytes())
    return Enwik8DataModule(**small(tmp_path, path=str(path), split_bytes=SPLIT_BYTES, **settings))


def prepared(module, stage=None):
    module.prepare_data()
    module.setup(stage)
    return module


def take(loader, count: int) -> list[dict]:
    """The first `count` batches of an (unbounded) loader."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def same_batches(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["first_target"], b["first_target"])
        for a, b in zip(first, second)
    )


def first_difference(a, b) -> int | None:
    """Where two long sequences first differ (None if equal): a cheap, readable failure for big texts."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_no_complete_cache(directory: Path) -> None:
    assert not list(directory.rglob("meta.json")), "a failed build left a cache marked complete"
    assert not list(directory.rglob("*.tmp")), "a failed build left a temporary file"


def failure(module_class, tmp_path: Path, **settings) -> str:
    """The ConfigurationError of building, preparing and setting up a module; checks no cache is left."""
    with pytest.raises(ConfigurationError) as raised:
        prepared(module_class(**small(tmp_path, **settings)))
    assert_no_complete_cache(tmp_path)
    return str(raised.value)


def fake_trainer(global_step=0, accumulate_grad_batches=1, global_rank=0, world_size=1, device="cpu") -> SimpleNamespace:
    """The trainer attributes `train_dataloader` reads."""
    return SimpleNamespace(
        global_step=global_step,
        accumulate_grad_batches=accumulate_grad_batches,
        global_rank=global_rank,
        world_size=world_size,
        strategy=SimpleNamespace(root_device=torch.device(device)),
    )


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_batches_are_pinned_for_a_gpu(device, pinned):
    """A copy from pageable memory to the GPU waits for the GPU's queue: every loader pins for a GPU."""
    dm = SyntheticDataModule(seq_len=16, batch_size=2)
    dm.prepare_data()
    dm.trainer = fake_trainer(device=device)
    assert [loader.pin_memory for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())] == [pinned] * 3


# ---------------------------------------------------------------- enwik8 splits


def test_enwik8_raw_zip_and_gz_give_the_splits_of_the_bytes_written(tmp_path):
    content = np.random.default_rng(1).integers(256, size=1000, dtype=np.uint8).tobytes()
    expected = {"train": content[:900], "valid": content[900:950], "test": content[950:]}
    for kind in ("raw", "zip", "gz"):
        path = write_enwik8(tmp_path / kind, content, kind)
        module = prepared(Enwik8DataModule(**small(tmp_path, path=str(path), split_bytes=[900, 50, 50])))
        assert (module.vocab_size, module.metric) == (256, "bpc")
        assert module.meta["lengths"] == {"train": 900, "valid": 50, "test": 50}
        assert module.meta["dtype"] == "uint8"
        for split, piece in expected.items():
            assert (module.cache / f"{split}.bin").read_bytes() == piece, (kind, split)


def test_default_enwik8_split_is_90m_5m_5m(tmp_path):
    assert Enwik8DataModule(**small(tmp_path)).split_bytes == (90_000_000, 5_000_000, 5_000_000)


# ---------------------------------------------------------------- evaluation windows


@pytest.mark.parametrize(
    "seq_len, windows, last_first_target",
    [(8, 7, 8), (10, 5, 2), (7, 7, 0), (49, 1, 0)],  # 49 targets in a 50-token split: ceil(49 / seq_len)
)
def test_test_windows_score_every_token_once(tmp_path, seq_len, windows, last_first_target):
    module = prepared(enwik8_module(tmp_path, seq_len=seq_len, eval_batch_size=3), "test")
    batches = list(module.test_dataloader())
    tokens = torch.cat([batch["tokens"] for batch in batches])
    first_targets = torch.cat([batch["first_target"] for batch in batches]).tolist()
    assert tokens.shape == (windows, seq_len + 1)
    assert first_targets == [0] * (windows - 1) + [last_first_target]
    positions = (tokens - 950) % 256  # the test split is bytes 950 .. 999 of the file
    assert all(torch.equal(row, torch.arange(row[0], row[0] + seq_len + 1)) for row in positions)
    scored = [
        int(positions[window, p])
        for window, first in enumerate(first_targets)
        for p in range(max(1, first), seq_len + 1)
    ]
    assert sorted(scored) == list(range(1, 50))


def test_validation_uses_a_fixed_evenly_spaced_subset(tmp_path):
    module = prepared(enwik8_module(tmp_path, val_windows=3, eval_batch_size=4), "fit")  # 7 windows
    starts = [((batch["tokens"][:, 0] - 900) % 256).tolist() for batch in module.val_dataloader()]
    assert starts == [[0, 16, 32]]  # windows 0, 2, 4 = arange(3) * 7 // 3
    assert same_batches(list(module.val_dataloader()), list(module.val_dataloader()))
    every = prepared(enwik8_module(tmp_path, val_windows=None), "fit")
    assert sum(len(batch["tokens"]) for batch in every.val_dataloader()) == 7


# ---------------------------------------------------------------- training batches


def test_training_rows_are_contiguous_train_windows(tmp_path):
    module = prepared(enwik8_module(tmp_path, seq_len=16, batch_size=4), "fit")
    for batch in take(module.train_dataloader(), 5):
        assert batch["tokens"].shape == (4, 17) and batch["tokens"].dtype == torch.long
        assert batch["first_target"].tolist() == [0, 0, 0, 0]
        assert bool((batch["tokens"].diff(dim=1) % 256 == 1).all())  # consecutive bytes of the file
    assert len(module.train_dataloader()) == 2**40  # sized, and effectively unbounded


def test_training_batches_are_a_function_of_seed_and_step(tmp_path):
    module = prepared(enwik8_module(tmp_path, seq_len=16, batch_size=4), "fit")
    batches = take(module.train_dataloader(), 6)
    assert same_batches(batches, take(module.train_dataloader(), 6))
    assert not torch.equal(batches[0]["tokens"], batches[1]["tokens"])
    other_seed = prepared(enwik8_module(tmp_path, seq_len=16, batch_size=4, seed=1), "fit")
    assert not torch.equal(batches[0]["tokens"], take(other_seed.train_dataloader(), 1)[0]["tokens"])

    module.trainer = fake_trainer(global_step=3)
    assert same_batches(take(module.train_dataloader(), 3), batches[3:6])
    module.trainer = fake_trainer(global_step=2, accumulate_grad_batches=2)  # 2 optimizer steps = 4 batches
    assert same_batches(take(module.train_dataloader(), 2), batches[4:6])


def test_ranks_read_disjoint_items_in_global_order(tmp_path):
    module = prepared(enwik8_module(tmp_path, seq_len=16), "fit")
    items = module.train_items()
    for rank in (0, 1):
        module.trainer = fake_trainer(global_step=1, global_rank=rank, world_size=2)
        for batch_index, batch in enumerate(take(module.train_dataloader(), 2), start=1):
            first = (batch_index * 2 + rank) * 2  # ((batch * world_size) + rank) * batch_size
            expected = torch.stack([items[first]["tokens"], items[first + 1]["tokens"]])
            assert torch.equal(batch["tokens"], expected)


def test_ranks_share_the_test_windows_without_repeats(tmp_path):
    """Across 3 ranks every test window is scored exactly once (uneven shards, no padding repeats)."""
    module = prepared(enwik8_module(tmp_path, seq_len=16), "test")
    everything = torch.cat([batch["tokens"] for batch in module.test_dataloader()])
    shards = []
    for rank in range(3):
        module.trainer = fake_trainer(global_rank=rank, world_size=3)
        shards.append(torch.cat([batch["tokens"] for batch in module.test_dataloader()]))
    assert sum(len(shard) for shard in shards) == len(everything)
    merged = torch.cat(shards)
    assert sorted(map(tuple, merged.tolist())) == sorted(map(tuple, everything.tolist()))


def test_workers_do_not_change_the_batches(tmp_path):
    serial = take(prepared(enwik8_module(tmp_path, seq_len=16), "fit").train_dataloader(), 4)
    parallel = take(prepared(enwik8_module(tmp_path, seq_len=16, num_workers=2), "fit").train_dataloader(), 4)
    assert same_batches(serial, parallel)


@pytest.mark.filterwarnings("error:.*dataloader is not resumable")
def test_lightning_resume_sees_the_uninterrupted_batches(tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen = []

        def training_step(self, batch, batch_index):
            self.seen.append(batch["tokens"].clone())
            return self.layer(batch["tokens"][:, :1].float()).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(max_steps, ckpt_path=None):
        trainer = L.Trainer(
            max_steps=max_steps,
            accumulate_grad_batches=2,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        model = Recorder()
        trainer.fit(model, SyntheticDataModule(seq_len=8, batch_size=2, seed=3), ckpt_path=ckpt_path)
        return trainer, model.seen

    _, uninterrupted = fit(max_steps=3)
    assert len(uninterrupted) == 6
    first_part, _ = fit(max_steps=1)
    first_part.save_checkpoint(tmp_path / "step1.ckpt")
    _, resumed = fit(max_steps=3, ckpt_path=tmp_path / "step1.ckpt")
    assert len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[2:]))


# ---------------------------------------------------------------- text files


def test_text_byte_split_is_contiguous_by_fractions(tmp_path):
    source = require_shared("tinyshakespeare.txt")
    content = source.read_bytes()
    module = prepared(TextDataModule(**small(tmp_path, path=str(source))))
    assert len(content) == 1_115_394  # cut at round(N * 0.9) and round(N * 0.95):
    assert module.meta["lengths"] == {"train": 1_003_855, "valid": 55_769, "test": 55_770}
    pieces = [content[:1_003_855], content[1_003_855:1_059_624], content[1_059_624:]]
    for split, piece in zip(("train", "valid", "test"), pieces):
        assert first_difference((module.cache / f"{split}.bin").read_bytes(), piece) is None, split
    assert (module.vocab_size, module.metric) == (256, "bpc")


def test_text_bpe_round_trips_every_split(tmp_path):
    text = require_shared("tinyshakespeare.txt").read_text()[:200_000] + "naïve café — ünïcödé\r\n"
    source = tmp_path / "small.txt"
    source.write_bytes(text.encode())
    module = prepared(TextDataModule(**small(tmp_path, path=str(source), tokenizer="bpe", vocab_size=400)))
    tokenizer = Tokenizer.from_file(str(module.cache / "tokenizer.json"))
    assert (module.vocab_size, module.metric, module.meta["dtype"]) == (400, "ppl", "uint16")
    assert module.vocab_size == tokenizer.get_vocab_size()
    splits = [np.fromfile(module.cache / f"{split}.bin", np.uint16) for split in ("train", "valid", "test")]
    assert first_difference("".join(tokenizer.decode(ids.tolist()) for ids in splits), text) is None


# ---------------------------------------------------------------- WikiText-103 (made of WikiText-2 text)


@pytest.fixture(scope="module")
def wiki_dir(tmp_path_factory) -> Path:
    """wiki.*.tokens: ~300 KB train and ~60 KB valid from WikiText-2's valid, ~60 KB test from its test."""
    directory = tmp_path_factory.mktemp("wikitext")
    valid_lines = (require_shared("wikitext-2", "valid.txt")).read_text().splitlines(keepends=True)
    test_lines = (require_shared("wikitext-2", "test.txt")).read_text().splitlines(keepends=True)
    for name, lines in zip(WIKI_FILES, (valid_lines[:1200], valid_lines[1200:1450], test_lines[:250])):
        (directory / name).write_text("".join(lines))
    return directory


@pytest.fixture(scope="module")
def wiki_module(wiki_dir, tmp_path_factory) -> WikiText103DataModule:
    return prepared(
        WikiText103DataModule(**small(tmp_path_factory.mktemp("wiki"), path=str(wiki_dir), vocab_size=512))
    )


def test_wikitext_bpe_round_trips_held_out_text(wiki_module, wiki_dir):
    tokenizer = Tokenizer.from_file(str(wiki_module.cache / "tokenizer.json"))
    assert (wiki_module.vocab_size, wiki_module.metric) == (tokenizer.get_vocab_size(), "ppl")
    assert 256 < wiki_module.vocab_size <= 512
    held_out = (wiki_dir / "wiki.test.tokens").read_text()  # not seen in training
    assert first_difference(tokenizer.decode(tokenizer.encode(held_out).ids), held_out) is None
    stored = np.fromfile(wiki_module.cache / "test.bin", np.uint16)
    assert len(stored) == wiki_module.meta["lengths"]["test"]
    assert first_difference(tokenizer.decode(stored.tolist()), held_out) is None
    batch = next(iter(wiki_module.train_dataloader()))
    assert batch["tokens"].shape == (2, 9) and int(batch["tokens"].max()) < wiki_module.vocab_size


def test_wikitext_cache_is_reused_and_a_changed_source_is_rebuilt(wiki_module, wiki_dir, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(data.bpe, "train_bpe", no_training)
    stamps = {name: (wiki_module.cache / name).stat().st_mtime_ns for name in ("tokenizer.json", "train.bin")}
    settings = dict(vocab_size=512, seq_len=8, batch_size=2, cache_dir=str(wiki_module.cache_dir))
    again = prepared(WikiText103DataModule(path=str(wiki_dir), **settings))
    assert again.cache == wiki_module.cache
    assert {name: (again.cache / name).stat().st_mtime_ns for name in stamps} == stamps

    changed = tmp_path / "changed"
    changed.mkdir()
    for name in WIKI_FILES:
        (changed / name).write_bytes((wiki_dir / name).read_bytes())
    with open(changed / "wiki.test.tokens", "a") as test_file:
        test_file.write(" = New article = \n")
    with pytest.raises(AssertionError, match="trained again"):  # a new fingerprint: the old cache is not used
        WikiText103DataModule(path=str(changed), **settings).prepare_data()


def test_wikitext_reads_raw_files_and_the_hub_export(tmp_path, monkeypatch):
    lines = (require_shared("wikitext-2", "valid.txt")).read_text().splitlines(keepends=True)
    texts = {"train": lines[:300], "valid": lines[300:360], "test": lines[360:420]}
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, split_lines in texts.items():
        (raw / f"wiki.{split}.raw").write_text("".join(split_lines))
    from_files = prepared(WikiText103DataModule(**small(tmp_path / "a", path=str(raw), vocab_size=300)))

    hub = {"train": texts["train"], "validation": texts["valid"], "test": texts["test"]}
    hub = {split: {"text": split_lines} for split, split_lines in hub.items()}  # rows keep their "\n"
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=lambda *args: hub))
    from_hub = prepared(WikiText103DataModule(**small(tmp_path / "b", vocab_size=300)))
    exported = tmp_path / "b" / "cache" / "wikitext103" / "hub" / "wiki.valid.raw"
    assert exported.read_text() == "".join(texts["valid"])
    for split in ("train", "valid", "test"):
        hub_ids, file_ids = ((m.cache / f"{split}.bin").read_bytes() for m in (from_hub, from_files))
        assert first_difference(hub_ids, file_ids) is None, split


# ---------------------------------------------------------------- atomic cache


def test_interrupted_build_is_rebuilt_not_trusted(tmp_path):
    cache = prepared(enwik8_module(tmp_path)).cache
    (cache / "meta.json").unlink()  # killed before the completion marker was written,
    (cache / "train.bin").write_bytes(b"\0" * 900)  # with (say) a file left wrong
    (cache / "valid.bin.4242.deadbeef.tmp").write_bytes(b"half")  # and the dead builder's temp file
    rebuilt = prepared(enwik8_module(tmp_path))
    assert rebuilt.cache == cache and (cache / "meta.json").exists()
    assert (cache / "train.bin").read_bytes() == counting_bytes()[:900]


def test_split_file_changed_after_completion_is_rebuilt(tmp_path):
    cache = prepared(enwik8_module(tmp_path)).cache
    (cache / "valid.bin").write_bytes(b"short")
    assert (prepared(enwik8_module(tmp_path)).cache / "valid.bin").read_bytes() == counting_bytes()[900:950]


def test_crash_before_meta_leaves_no_complete_cache(tmp_path, monkeypatch):
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.base, "write_meta", killed)
    with pytest.raises(KeyboardInterrupt):
        enwik8_module(tmp_path).prepare_data()
    assert_no_complete_cache(tmp_path)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"partial")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"] and target.read_bytes() == b"whole"


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_temporary_files_of_dead_writers_are_removed_when_the_cache_is_next_used(tmp_path):
    """A SIGKILLed builder leaves its temporary file; the next prepare_data removes it, in any cache of
    the dataset (an abandoned build too), but never one of a live process or of another host."""
    host, dead, alive = socket.gethostname(), dead_pid(), os.getpid()
    abandoned = tmp_path / "cache" / "enwik8" / "0123456789abcdef"
    abandoned.mkdir(parents=True)
    names = {
        f"train.bin.{dead}@{host}.0badcafe.tmp": False,
        f"valid.bin.{dead}.deadbeef.tmp": False,  # the format before hosts were recorded
        f"train.bin.{alive}@{host}.0badcafe.tmp": True,
        f"valid.bin.{alive}.deadbeef.tmp": True,
        f"train.bin.{dead}@another-{host}.0badcafe.tmp": True,
        "notes.tmp": True,  # not a name atomic_path writes
    }
    for name in names:
        (abandoned / name).write_bytes(b"partial")
    prepared(enwik8_module(tmp_path))
    assert {name: (abandoned / name).exists() for name in names} == names


def test_writing_into_a_folder_removes_dead_writers_temporary_files(tmp_path):
    stale, live = tmp_path / f"meta.json.{dead_pid()}.deadbeef.tmp", tmp_path / f"x.{os.getpid()}.deadbeef.tmp"
    for path in (stale, live):
        path.write_bytes(b"partial")
    with atomic_path(tmp_path / "file.bin") as temporary:
        assert f".{os.getpid()}@{socket.gethostname()}." in temporary.name
        temporary.write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file.bin", live.name])


def build_enwik8_cache(tmp_path):
    prepared(enwik8_module(tmp_path))


def test_concurrent_builders_agree(tmp_path):
    children = [
        multiprocessing.get_context("fork").Process(target=build_enwik8_cache, args=(tmp_path,)) for _ in range(3)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0, 0]
    module = prepared(enwik8_module(tmp_path))
    assert (module.cache / "test.bin").read_bytes() == counting_bytes()[950:]
    assert not list(module.cache.glob("*.tmp"))


# ---------------------------------------------------------------- bad inputs


def test_enwik8_missing_file(tmp_path):
    assert "data.path=" in failure(Enwik8DataModule, tmp_path, path=str(tmp_path / "nope"))


@pytest.mark.parametrize("kind", ["raw", "zip", "gz"])
def test_enwik8_truncated_file(tmp_path, kind):
    path = write_enwik8(tmp_path / "source", counting_bytes(999), kind)
    message = failure(Enwik8DataModule, tmp_path, path=str(path), split_bytes=SPLIT_BYTES)
    assert "999 bytes" in message and "needs 1,000" in message and "data.path=" in message


def test_enwik8_zip_without_the_member(tmp_path):
    path = write_enwik8(tmp_path / "source", counting_bytes(), "zip", member="enwik9")
    message = failure(Enwik8DataModule, tmp_path, path=str(path), split_bytes=SPLIT_BYTES)
    assert "no member named 'enwik8'" in message and "data.path=" in message


def test_enwik8_without_path_or_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert "data.path=/path/to/enwik8" in failure(Enwik8DataModule, tmp_path)
    assert not list(tmp_path.rglob("enwik8.zip"))


def test_enwik8_corrupt_download_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO(b"<html>oops</html>"))
    message = failure(Enwik8DataModule, tmp_path)
    assert "SHA-256" in message and "data.path=" in message
    assert not list(tmp_path.rglob("enwik8.zip"))


def test_enwik8_download_is_checked_and_kept(tmp_path, monkeypatch):
    archive = write_enwik8(tmp_path / "server", counting_bytes(), "zip").read_bytes()
    monkeypatch.setattr(data.enwik8, "ENWIK8_ZIP_BYTES", len(archive))
    monkeypatch.setattr(data.enwik8, "ENWIK8_ZIP_SHA256", hashlib.sha256(archive).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO(archive))
    module = prepared(Enwik8DataModule(**small(tmp_path, split_bytes=SPLIT_BYTES)))
    assert (module.cache / "valid.bin").read_bytes() == counting_bytes()[900:950]
    monkeypatch.setattr(urllib.request, "urlopen", None)  # a second prepare must not download again
    assert prepared(Enwik8DataModule(**small(tmp_path, split_bytes=SPLIT_BYTES))).cache == module.cache


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.9, 0.1, 0.0), (0.8, 0.1, 0.2), (1.1, -0.05, -0.05)])
def test_text_bad_fractions(tmp_path, fractions):
    source = str(require_shared("tinyshakespeare.txt"))
    assert "data.split_fractions=" in failure(TextDataModule, tmp_path, path=source, split_fractions=fractions)


def test_text_missing_file_and_unknown_tokenizer(tmp_path):
    assert "data.path=" in failure(TextDataModule, tmp_path, path=str(tmp_path / "nope.txt"))
    source = str(require_shared("tinyshakespeare.txt"))
    assert "data.tokenizer=" in failure(TextDataModule, tmp_path, path=source, tokenizer="wordpiece")


def test_seq_len_longer_than_a_split(tmp_path):
    module = enwik8_module(tmp_path, seq_len=50)  # valid and test hold 50 tokens; a window needs 51
    with pytest.raises(ConfigurationError, match="valid split of enwik8 has 50 tokens") as raised:
        module.prepare_data()
    assert "data.seq_len=" in str(raised.value) and "at most 49" in str(raised.value)
    assert "data.split_bytes=" in str(raised.value)
    prepared(enwik8_module(tmp_path, seq_len=49))  # the largest seq_len that fits every split


def test_a_short_test_split_is_refused_before_training(tmp_path):
    """prepare_data, which train.py calls before it builds anything, checks the test split too."""
    source = tmp_path / "small.txt"
    source.write_bytes(counting_bytes())  # split 900 / 70 / 30
    module = TextDataModule(**small(tmp_path, path=str(source), split_fractions=[0.9, 0.07, 0.03], seq_len=40))
    with pytest.raises(ConfigurationError, match="test split of text has 30 tokens") as raised:
        module.prepare_data()
    assert "at most 29" in str(raised.value) and "data.split_fractions=" in str(raised.value)
    assert list(tmp_path.rglob("meta.json")), "the cache itself is fine and kept for the next run"


@pytest.mark.parametrize("fractions, split, holds", [([0.5, 0.495, 0.005], "test", "is empty"),
                                                     ([0.5, 0.49, 0.01], "test", "has 1 token")])
def test_a_split_too_small_for_any_seq_len_says_so(tmp_path, fractions, split, holds):
    source = tmp_path / "small.txt"
    source.write_bytes(counting_bytes(100))
    with pytest.raises(ConfigurationError) as raised:
        TextDataModule(**small(tmp_path, path=str(source), split_fractions=fractions)).prepare_data()
    message = str(raised.value)
    assert f"The {split} split of text {holds}" in message and "at any data.seq_len" in message
    assert "at most" not in message and "data.split_fractions=" in message


def test_a_directory_or_an_empty_file_given_as_the_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    for module_class in (TextDataModule, Enwik8DataModule):
        message = failure(module_class, tmp_path, path=str(tmp_path))
        assert f"data.path={tmp_path} is a directory, not a file" in message and "Pass data.path=/path/to/" in message
        message = failure(module_class, tmp_path, path=str(tmp_path / "empty.txt"))
        assert "empty.txt is empty" in message and "Pass data.path=/path/to/" in message
    message = failure(WikiText103DataModule, tmp_path, path=str(tmp_path / "empty.txt"))
    assert "is a file, not a directory" in message and "data.path=/dir/with/wiki.train.tokens" in message


def test_text_without_a_path(tmp_path):
    assert "data.path=/path/to/file.txt" in failure(TextDataModule, tmp_path)


def test_not_utf8_names_the_offset_in_the_file_for_text_and_wikitext(wiki_dir, tmp_path):
    """WikiText streams its files, so a decoder's position is inside a chunk; the message gives the file's."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in WIKI_FILES:
        (bad / name).write_bytes((wiki_dir / name).read_bytes())
    valid = bytearray((bad / "wiki.valid.tokens").read_bytes())
    offset = len(valid) - 1000  # well past the first chunk a decoder reads
    valid[offset] = 0xFF
    (bad / "wiki.valid.tokens").write_bytes(bytes(valid))
    message = failure(WikiText103DataModule, tmp_path, path=str(bad), vocab_size=300)
    assert f"wiki.valid.tokens is not UTF-8 text (byte 0xff at offset {offset:,}: invalid start byte)" in message
    assert "data.path=/dir/with/wiki.train.tokens" in message
    message = failure(TextDataModule, tmp_path, path=str(bad / "wiki.valid.tokens"), tokenizer="bpe")
    assert f"wiki.valid.tokens is not UTF-8 text (byte 0xff at offset {offset:,}: invalid start byte)" in message
    assert "data.tokenizer=byte" in message


@pytest.mark.parametrize("content, offset, reason", [
    ("aé€".encode() + b"\xe2\x82" + "€b".encode(), 6, "invalid continuation byte"),  # a character cut short
    ("ab€".encode() + b"\x80", 5, "invalid start byte"),
    ("€€".encode() + b"\xe2\x82", 6, "unexpected end of data"),  # the file ends inside a character
])
def test_not_utf8_offsets_across_chunk_boundaries(tmp_path, content, offset, reason):
    path = tmp_path / "file.txt"
    path.write_bytes(content)
    for chunk_bytes in (1, 2, 3, 4, 1 << 22):
        message = str(data.bpe.not_utf8(path, "Fix it.", chunk_bytes=chunk_bytes))
        assert f"(byte 0x{content[offset]:02x} at offset {offset}: {reason})" in message, chunk_bytes


def test_bad_common_arguments(tmp_path):
    assert "data.seq_len=" in failure(SyntheticDataModule, tmp_path, seq_len=0)
    assert "data.batch_size=" in failure(SyntheticDataModule, tmp_path, batch_size=-1)
    assert "data.val_windows=" in failure(SyntheticDataModule, tmp_path, val_windows=0)
    assert "data.seed=" in failure(SyntheticDataModule, tmp_path, seed=-1)


def test_wikitext_directory_missing_a_file(wiki_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in WIKI_FILES[:2]:
        (partial / name).write_bytes((wiki_dir / name).read_bytes())
    message = failure(WikiText103DataModule, tmp_path, path=str(partial))
    assert "wiki.test.tokens" in message and "data.path=/dir/with/wiki.train.tokens" in message
    assert "data.path=" in failure(WikiText103DataModule, tmp_path, path=str(tmp_path / "nope"))


def test_wikitext_without_path_or_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=offline))
    assert "data.path=/dir/with/wiki.train.tokens" in failure(WikiText103DataModule, tmp_path)
    assert not list(tmp_path.rglob("wiki.*"))


def test_hydra_instantiates_with_list_configs(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = str(write_enwik8(tmp_path / "source", counting_bytes()))
    enwik8 = {"_target_": "data.Enwik8DataModule", "path": path, "split_bytes": [900, 50, 50]}
    text = {"_target_": "data.TextDataModule", "path": path, "split_fractions": [0.8, 0.1, 0.1]}
    for config, lengths in [(enwik8, [900, 50, 50]), (text, [800, 100, 100])]:
        module = prepared(instantiate(OmegaConf.create(small(tmp_path, val_windows=None, **config))))
        assert list(module.meta["lengths"].values()) == lengths


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize("seq_len, k", [(9, 4), (8, 4), (2, 1)])  # k = seq_len // 2 symbols to copy
def test_synthetic_copy_rows(seq_len, k):
    module = SyntheticDataModule(seq_len=seq_len, batch_size=3, vocab_size=16)
    assert (module.vocab_size, module.metric) == (16, "ppl")
    batch = next(iter(module.train_dataloader()))
    tokens = batch["tokens"]
    assert tokens.shape == (3, seq_len + 1)
    assert batch["first_target"].tolist() == [k + 1] * 3
    assert bool((tokens[:, :k] < 15).all()) and bool((tokens[:, k] == 15).all())  # symbols, separator 15
    copied = tokens[:, k + 1 :]
    assert torch.equal(copied[:, :k], tokens[:, :k])
    assert torch.equal(copied, tokens[:, :k].repeat(1, 2)[:, : copied.shape[1]])  # cycled to fill


@pytest.mark.parametrize("seq_len, pairs", [(40, 4), (12, 3), (4, 1)])  # pairs = min(4 keys, (seq_len) // 4)
def test_synthetic_recall_rows(seq_len, pairs):
    """Vocabulary 11: keys 0-3, values 4-8, filler 9, separator 10. The pairs open the row; the
    queries after the separator ask keys 0..P-1 in order, each answered by its pair's value."""
    module = SyntheticDataModule(task="recall", seq_len=seq_len, batch_size=4, vocab_size=11)
    batch = next(iter(module.train_dataloader()))
    length = seq_len + 1
    assert batch["first_target"].tolist() == [length - 2 * pairs] * 4
    for tokens in batch["tokens"].tolist():
        value_of = dict(zip(tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2]))
        assert sorted(value_of) == list(range(pairs)) and all(4 <= v <= 8 for v in value_of.values())
        assert tokens[2 * pairs : length - 2 * pairs - 1] == [9] * (length - 4 * pairs - 1)
        assert tokens[length - 2 * pairs - 1] == 10
        queries = tokens[length - 2 * pairs :]
        assert queries[0::2] == list(range(pairs)) and queries[1::2] == [value_of[k] for k in range(pairs)]


def test_synthetic_rows_are_deterministic_and_splits_differ():
    def first_rows(seed, split):
        module = SyntheticDataModule(seq_len=32, batch_size=4, num_val=8, num_test=8, seed=seed)
        loaders = {"train": module.train_dataloader, "valid": module.val_dataloader, "test": module.test_dataloader}
        return next(iter(loaders[split]()))["tokens"]

    assert torch.equal(first_rows(0, "train"), first_rows(0, "train"))
    assert torch.equal(first_rows(0, "valid"), first_rows(0, "valid"))
    assert not torch.equal(first_rows(0, "train"), first_rows(1, "train"))
    assert not torch.equal(first_rows(0, "train"), first_rows(0, "valid"))
    assert not torch.equal(first_rows(0, "valid"), first_rows(0, "test"))


def test_synthetic_eval_sizes_and_bad_settings(tmp_path):
    module = SyntheticDataModule(seq_len=8, batch_size=4, eval_batch_size=5, num_val=12, num_test=7, val_windows=3)
    assert [len(batch["tokens"]) for batch in module.val_dataloader()] == [3]
    assert [len(batch["tokens"]) for batch in module.test_dataloader()] == [5, 2]
    assert "data.task=" in failure(SyntheticDataModule, tmp_path, task="sort")
    assert "data.vocab_size=" in failure(SyntheticDataModule, tmp_path, vocab_size=2)
    assert "data.seq_len=" in failure(SyntheticDataModule, tmp_path, task="recall", seq_len=3)
    assert "data.vocab_size=" in failure(SyntheticDataModule, tmp_path, task="recall", vocab_size=5)
