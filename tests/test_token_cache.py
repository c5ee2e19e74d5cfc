"""The token id cache of MAGE training (paper section 3.3: the crops are fixed per image, so are the ids).

The tokenizer stage's pass writes ids.parquet (both views); `TokenCache` reads it back by key and
flip flag, refuses another tokenizer's file, and checks a batch against the tokenizer; training
(`TokenIds` in the loop's data) feeds the same ids, hence the same loss, as tokenizing every batch,
and falls back to that when the crops are random or the file does not fit. On the tiny shards with
a `vq_tiny` of random weights (no training needed for exactness).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rcg import config
from rcg.data.loader import make_loader
from rcg.generators.tokens import IDS_FILE, TokenCache, TokenCodec, fixed_crop_reason, write_token_ids
from rcg.generators.training import Conditions, Inputs, TokenIds, _data, token_setup
from rcg.io import PipelineError
from rcg.stages.tokenizer import encode_train_ids
from rcg.tokenizers import build_vqgan, save_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = "models/tokenizer"


def _cfg(*sets: str) -> config.Config:
    sets = ("train_generator.arch=mage_tiny", f"train_generator.tokenizer={TOK}", *sets)
    return config.load("params.yaml", config.parse_set(list(sets)))


@pytest.fixture
def codec(in_workspace: Path) -> TokenCodec:
    """A vq_tiny tokenizer folder (random weights) and its train ids, both views, as the stage writes them."""
    torch.manual_seed(0)
    save_tokenizer(build_vqgan("vq_tiny", in_channels=1, image_size=28), TOK, "vq_tiny", {"source": "test"})
    codec = TokenCodec(TOK)
    keys, views, ids = encode_train_ids(codec, _cfg().data, ("orig", "flip"), batch_size=100, progress=False)
    write_token_ids(Path(TOK) / IDS_FILE, keys, views, ids, codec.digest, codec.codebook_size)
    return codec


def _crops(data_cfg: config.DataConfig, flipped: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    batch = next(iter(make_loader(data_cfg, "train", "once", len(flipped), num_workers=0)))
    return batch["key"], torch.where(flipped[:, None, None, None], batch["image"].flip(-1), batch["image"])


def test_ids_file_round_trip_both_views(codec: TokenCodec) -> None:
    path = Path(TOK) / IDS_FILE
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"rcg"])
    assert meta == {"tokenizer_digest": codec.digest, "num_tokens": 49, "codebook_size": 32, "views": ["orig", "flip"]}
    assert table.num_rows == 2 * 256 and table.schema.field("ids").type.value_type == pa.int16()
    cache = TokenCache(path, codec.digest)
    assert len(cache) == 512 and cache.views == ("orig", "flip")
    flipped = torch.tensor([False, True] * 8)
    keys, x = _crops(_cfg().data, flipped)
    ids = cache.lookup(keys, flipped)
    assert ids.dtype == torch.long and torch.equal(ids, codec.encode(x))  # each view's own ids
    assert not torch.equal(ids, cache.lookup(keys, ~flipped))
    assert cache.verify(ids, codec, x) == 0
    with pytest.raises(PipelineError, match=r"ids.parquet: no cached token ids for sample 'nope' \(view flip"):
        cache.lookup(["nope"], torch.tensor([True]))
    with pytest.raises(PipelineError, match="repeats a sample key"):
        write_token_ids(Path("dup.parquet"), ["a", "a"], ["orig", "orig"], ids[:2], codec.digest, 32)


def test_ids_of_another_tokenizer_are_refused(codec: TokenCodec) -> None:
    with pytest.raises(PipelineError, match=r"models/tokenizer/ids.parquet: token ids of another tokenizer"):
        TokenCache(Path(TOK) / IDS_FILE, "0" * 64)
    # Retrained weights in the folder: training refuses the stale file rather than reading wrong ids.
    torch.manual_seed(1)
    save_tokenizer(build_vqgan("vq_tiny", in_channels=1, image_size=28), TOK, "vq_tiny", {"source": "test"})
    with pytest.raises(PipelineError, match="token ids of another tokenizer"):
        TokenIds(TokenCodec(TOK), "cache", True, verify=True)


def test_first_batch_verification_reports_mismatches(codec: TokenCodec, caplog: pytest.LogCaptureFixture) -> None:
    cache = TokenCache(Path(TOK) / IDS_FILE, codec.digest)
    flipped = torch.tensor([True, False] * 8)
    keys, x = _crops(_cfg().data, flipped)
    ids = cache.lookup(keys, flipped)
    wrong = ids.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % 32  # one id of 784: past the near-tie allowance
    with pytest.raises(PipelineError, match=r"ids.parquet: 1 of the first batch's 784 cached token ids differ"):
        cache.verify(wrong, codec, x)
    # Through training's data path: a file whose ids are off fails on the first batch, once.
    table = pq.read_table(Path(TOK) / IDS_FILE)
    keys_all, views_all = table["key"].to_pylist(), table["view"].to_pylist()
    stored = torch.as_tensor(table["ids"].combine_chunks().values.to_numpy().copy()).view(len(table), 49)
    stale = (stored.long() + 1) % 32
    write_token_ids(Path(TOK) / IDS_FILE, keys_all, views_all, stale, codec.digest, 32)
    ids_of = TokenIds(codec, "cache", True, verify=True)
    batch = {"key": keys}
    with pytest.raises(PipelineError, match="differ from the tokenizer's; the file is stale"):
        ids_of(batch, x, flipped)
    # The correct file passes and says so; the check runs once.
    write_token_ids(Path(TOK) / IDS_FILE, keys_all, views_all, (stale - 1) % 32, codec.digest, 32)
    ids_of = TokenIds(codec, "cache", True, verify=True)
    with caplog.at_level(logging.INFO, logger="rcg.generators.training"):
        assert torch.equal(ids_of(batch, x, flipped), codec.encode(x))
    assert "match the tokenizer on the first batch (0 of 784 differ)" in caplog.text and not ids_of.verify


def test_cached_training_computes_the_per_step_loss(codec: TokenCodec) -> None:
    """The loop's data on cached ids and on per-step tokenizing: the same batches, the same ids, the
    same MAGE loss."""
    gcfg, data_cfg = _cfg().train_generator, _cfg().data
    inputs = Inputs("data/features/train.parquet", "models/encoder", [], 256)
    device = torch.device("cpu")
    torch.manual_seed(0)
    s = token_setup(gcfg, data_cfg, inputs, "none", device)
    s.model.eval()
    conditions = Conditions(gcfg, inputs, "none", device, verify=False)
    losses, ids = [], []
    for source in ("cache", "encoder"):  # rep_source encoder: random crops declared, so per step
        ids_of = TokenIds(s.codec, source, gcfg.hflip, verify=True)
        assert ids_of.source == ("cache" if source == "cache" else "tokenizer")
        torch.manual_seed(1)  # the flips
        batch_ids, cond = next(_data(gcfg, data_cfg, s, conditions, device, ids_of)(0))
        ids.append(batch_ids)
        losses.append(s.model.loss(batch_ids, **cond, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(ids[0], ids[1]) and ids[0].shape == (gcfg.batch_size, 49)
    assert torch.equal(losses[0], losses[1]) and float(losses[0].detach()) > 0


def test_per_step_fallbacks_say_why(codec: TokenCodec, caplog: pytest.LogCaptureFixture) -> None:
    assert fixed_crop_reason("cache") is None and "random" in fixed_crop_reason("encoder")
    with caplog.at_level(logging.INFO, logger="rcg.generators.training"):
        assert TokenIds(codec, "encoder", True, verify=True).cache is None
        assert "rep_source is 'encoder': the training crops are random" in caplog.text
        keys, views, ids = encode_train_ids(codec, _cfg().data, ("orig",), batch_size=100, progress=False)
        write_token_ids(Path(TOK) / IDS_FILE, keys, views, ids, codec.digest, 32)
        assert TokenIds(codec, "cache", False, verify=True).cache is not None  # no flip: the orig view suffices
        assert TokenIds(codec, "cache", True, verify=True).cache is None
        assert "holds no flipped views" in caplog.text
        (Path(TOK) / IDS_FILE).unlink()
        assert TokenIds(codec, "cache", True, verify=True).source == "tokenizer"
        assert "ids.parquet: tokenizer.cache_ids was off" in caplog.text
