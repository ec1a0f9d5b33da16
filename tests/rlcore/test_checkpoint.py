"""Atomic checkpoints, retention, resume state, and the self-checking export."""

import json
import re

import pytest
import torch

from rlcore.actor import build_optimizer
from rlcore.checkpoint import checkpoint_dirs, load_checkpoint, load_checkpoint_model, save_checkpoint
from rlcore.export import export_hf
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
    assert state == {"step": 7, "data": {"epoch": 1, "position": 7}, "world_size": 1, "format": 2}
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


# ---- never written with non-finite weights ---------------------------------------------------------

def test_checkpoint_and_export_refuse_nonfinite_weights(tmp_path, parts):
    from rlcore.guard import NonFiniteError

    model = parts[0]
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"checkpoint step 4.*model\.layers\.0\.mlp\.up_proj\.weight"):
        save(tmp_path, 4, parts)
    assert checkpoint_dirs(tmp_path) == [] and not (tmp_path / "checkpoints").exists()
    with pytest.raises(NonFiniteError, match="up_proj"):
        export_hf(model, parts[1], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---- manifests: a checkpoint is complete when its manifest verifies -------------------------------

def test_manifest_lists_every_file_with_size_and_sha256(tmp_path, parts):
    import hashlib

    folder = save(tmp_path, 1, parts)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk and {"dcp/.metadata", "dcp/__0_0.distcp", "state.json", "trainer.pt"} <= on_disk
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "dcp" / "__0_0.distcp").write_bytes((f / "dcp" / "__0_0.distcp").read_bytes()[:1000]),
     r"__0_0\.distcp is 1000 bytes, the manifest says \d+"),
    (lambda f: (f / "dcp" / ".metadata").unlink(), r"dcp/\.metadata is missing"),
    (lambda f: (f / "trainer.pt").write_bytes(b"x" * (f / "trainer.pt").stat().st_size),
     r"trainer\.pt does not match its SHA-256"),
    (lambda f: (f / "manifest.json").unlink(), r"manifest\.json is missing"),
])
def test_resume_walks_back_past_a_damaged_checkpoint_and_says_why(tmp_path, parts, damage, reason):
    from rlcore.checkpoint import newest_verified
    from rlcore.manifest import DamagedCheckpoint

    for step in (1, 2):
        save(tmp_path, step, parts)
    newest = checkpoint_dirs(tmp_path)[-1]
    damage(newest)
    found, notes = newest_verified(tmp_path)
    assert found.name == "step_000001"
    assert len(notes) == 1 and notes[0].startswith("skipped step_000002:") and re.search(reason, notes[0])
    with pytest.raises(DamagedCheckpoint, match=reason):  # export of that checkpoint names the file
        load_checkpoint_model(newest)


def test_checkpoint_without_manifest_from_before_is_loaded_unverified(tmp_path, parts):
    """A checkpoint written before manifests (state.json without "format") still resumes, with a note;
    one missing a required file does not."""
    from rlcore.checkpoint import newest_verified

    folder = save(tmp_path, 3, parts)
    (folder / "manifest.json").unlink()
    state = json.loads((folder / "state.json").read_text())
    del state["format"]
    (folder / "state.json").write_text(json.dumps(state))
    found, notes = newest_verified(tmp_path)
    assert found == folder and "no manifest" in notes[0] and "unverified" in notes[0]
    load_checkpoint_model(folder)
    (folder / "dcp" / ".metadata").unlink()
    found, notes = newest_verified(tmp_path)
    assert found is None and "dcp/.metadata is missing" in notes[0]


# ---- the export's tokenizer behaves as the trainer's ------------------------------------------------

TEXTS = ["1 + 2 =", "a b\nc", "  two  spaces\tand\n\n", "12+34="]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_char_tokenizer_reloads_through_autotokenizer_with_the_same_ids(tmp_path, family):
    """AutoTokenizer swaps in Qwen2Tokenizer for every qwen2 folder; the saved char tokenizer must come
    back with the same ids (whitespace included), the same decoding and the same chat template."""
    from transformers import AutoTokenizer

    tok = char_tokenizer()
    tiny_model(len(tok), family=family, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
               intermediate_size=64).config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tok)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert reloaded(text)["input_ids"] == ids and len(ids) == len(text), text  # one token per character
        assert reloaded.decode(ids) == text
    chat = [{"role": "user", "content": "1 + 2 =\n"}]
    assert reloaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "user: 1 + 2 =\n\nassistant: "


def legacy_char_tokenizer():
    """The char tokenizer as saved before (WordLevel over raw characters): same ids in training, but
    AutoTokenizer reloads a qwen2 folder of it without whitespace."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlcore.models import CHAR_ALPHABET, CHAR_CHAT_TEMPLATE

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHAR_ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    hf.chat_template = CHAR_CHAT_TEMPLATE
    return hf


def test_export_check_fails_when_the_reloaded_tokenizer_differs(tmp_path, parts):
    model = parts[0]
    with pytest.raises(RuntimeError, match=r"export check failed: AutoTokenizer\.from_pretrained loads Qwen2Tokenizer, "
                                           r"which encodes '1 \+ 2 =' as \[3, 74, 4, 82\] where training used"):
        export_hf(model, legacy_char_tokenizer(), tmp_path / "hf", probe_texts=["1 + 2 ="])
    assert not (tmp_path / "hf").exists()
    export_hf(model, char_tokenizer(), tmp_path / "hf", probe_texts=TEXTS)  # today's tokenizer passes


def test_a_legacy_char_tokenizer_in_a_checkpoint_is_loaded_in_the_form_that_round_trips(tmp_path):
    from rlcore.models import load_tokenizer

    legacy_char_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path), trust_remote_code=False)
    assert tok.backend_tokenizer.to_str() == char_tokenizer().backend_tokenizer.to_str()
