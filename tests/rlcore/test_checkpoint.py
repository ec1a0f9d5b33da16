"""Atomic checkpoints, retention, resume state, and the self-checking export."""

import json

import pytest
import torch

from rlcore.actor import build_optimizer
from rlcore.checkpoint import checkpoint_dirs, export_hf, load_checkpoint, load_checkpoint_model, save_checkpoint
from rlcore.config import RLConfig
from rlcore.models import char_tokenizer, tiny_model


@pytest.fixture()
def parts():
    tok = char_tokenizer()
    model = tiny_model(len(tok), hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    opt, sched = build_optimizer(model, RLConfig())
    return model, tok, opt, sched


def save(run, step, parts, keep_last=2):
    model, tok, opt, sched = parts
    return save_checkpoint(run, step, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                           data_state={"epoch": 1, "position": step}, config_yaml="x: 1\n", keep_last=keep_last)


def test_keep_last_and_partial_folders_ignored(tmp_path, parts):
    for step in (1, 2, 3):
        save(tmp_path, step, parts)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000002", "step_000003"]
    # What a kill during a save leaves behind: a temporary folder, and (older layout) a step folder
    # without state.json. Neither is ever taken as the latest checkpoint.
    (tmp_path / "checkpoints" / ".tmp_step_000004_123" / "model").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000005").mkdir()
    assert checkpoint_dirs(tmp_path)[-1].name == "step_000003"
    save(tmp_path, 6, parts)  # a later save cleans the stray temporary folder
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_rng(tmp_path, parts):
    model, tok, opt, sched = parts
    model(input_ids=torch.tensor([[2, 3, 4]]), labels=torch.tensor([[2, 3, 4]])).loss.backward()
    opt.step()
    sched.step()
    torch.manual_seed(123)
    folder = save(tmp_path, 7, parts)
    expected_draw = torch.rand(3)
    fresh = tiny_model(len(tok), hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
                       seed=5)
    opt2, sched2 = build_optimizer(fresh, RLConfig())
    torch.manual_seed(0)
    state = load_checkpoint(folder, model=fresh, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 7, "data": {"epoch": 1, "position": 7}, "world_size": 1}
    torch.testing.assert_close(torch.rand(3), expected_draw)  # RNG restored
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    for s1, s2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
        assert float(s1["step"]) == float(s2["step"])
    assert sched2.last_epoch == sched.last_epoch


def test_export_from_a_checkpoint_equals_the_model(tmp_path, parts):
    model, tok, _, _ = parts
    folder = save(tmp_path, 3, parts)
    restored = load_checkpoint_model(folder)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_loads_and_refuses_to_overwrite(tmp_path, parts):
    model, tok, _, _ = parts
    out = tmp_path / "hf"
    diff = export_hf(model, tok, out)
    assert diff <= 1e-5
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(model, tok, out)
