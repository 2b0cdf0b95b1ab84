"""push_to_hub / hf_lowbit.push against a local fake Hub (tests/hub_server.py): what arrives, and every failure."""

import io
import types

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load

from hf_lowbit import LowBitConfig, LowBitLinear
from hf_lowbit.hub import HubPushError, push, push_folder
from hf_lowbit.model_card import MARKER

from conftest import load_checked
from hub_server import HubServer

TOKEN = "hf_test_token"


def _set_default_endpoint(monkeypatch, url):
    """What HF_ENDPOINT=url does when set before huggingface_hub is imported."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub that requires TOKEN; huggingface_hub's default endpoint points at it for the test."""
    with HubServer(token=TOKEN) as server:
        _set_default_endpoint(monkeypatch, server.url)
        yield server


def _reload_from_hub(files, tmp_path):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return load_checked(tmp_path)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_push_to_hub_uploads_checkpoint_and_card(mode, hub, tiny_model_dir, tmp_path, input_ids):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig(mode=mode)).eval()
    info = model.push_to_hub("me/tiny-" + mode, token=TOKEN, commit_message="first", tags=["demo"])  # transformers API
    assert info.oid == hub.repos["me/tiny-" + mode]["sha"]
    files = hub.files("me/tiny-" + mode)
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "hf_lowbit_loader.py"} <= \
        set(files)
    state = load(files["model.safetensors"])
    expected = model.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    card = ModelCard(files["README.md"].decode())
    assert MARKER in card.content and f'from_pretrained("me/tiny-{mode}")' in card.content
    assert {"hf_lowbit", "demo"} <= set(card.data.tags) and hub.commits("me/tiny-" + mode)[0]["summary"] == "first"
    reloaded = _reload_from_hub(files, tmp_path).eval()
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, LowBitLinear)
    assert reloaded.config.quantization_config.mode == mode
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_push_function_with_endpoint_and_save_dir(hub, tiny_model_dir, tmp_path, monkeypatch):
    _set_default_endpoint(monkeypatch, "http://127.0.0.1:9")  # nothing listens there: only endpoint= can work
    model = load_checked(tiny_model_dir("qwen3_moe"), LowBitConfig(mode="infer"))
    push(model, "org/moe", save_dir=tmp_path / "keep", endpoint=hub.url, token=TOKEN, private=True)
    files = hub.files("org/moe")
    assert hub.repos["org/moe"]["private"]
    for name, data in files.items():  # what arrived is byte for byte the kept local copy
        assert (tmp_path / "keep" / name).read_bytes() == data
    assert "model.layers.0.mlp.experts.gate_up_proj_scale" in load(files["model.safetensors"])


def test_save_pretrained_push_to_hub_kwarg(hub, tiny_model_dir, tmp_path):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig(mode="infer"))
    model.save_pretrained(tmp_path / "ckpt", push_to_hub=True, repo_id="me/via-save", token=TOKEN)
    assert (tmp_path / "ckpt" / "README.md").read_bytes() == hub.files("me/via-save")["README.md"]


def test_user_readme_on_the_hub_is_kept(hub, tiny_model_dir):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("me/has-card")
    api.upload_file(path_or_fileobj=io.BytesIO(b"# written by a person\n"), path_in_repo="README.md",
                    repo_id="me/has-card")
    push(load_checked(tiny_model_dir("qwen3"), LowBitConfig()), "me/has-card", token=TOKEN)
    files = hub.files("me/has-card")
    assert files["README.md"] == b"# written by a person\n" and "model.safetensors" in files


def test_bad_repo_id_and_float_model(tiny_model_dir):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig())
    with pytest.raises(ValueError, match=r"repo_id='not a/valid id!' is not a valid Hub repo id; allowed: 'name' "):
        push(model, "not a/valid id!")
    with pytest.raises(ValueError, match=r"push: the model is not an hf_lowbit model .* allowed: a model loaded"):
        push(load_checked(tiny_model_dir("qwen3")), "me/x")


def test_auth_failure_keeps_local_copy(hub, tiny_model_dir, tmp_path):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig())
    with pytest.raises(HubPushError, match=r"create the repository: .*refused the credentials \(HTTP 401\).*"
                                           r"hf auth login") as err:
        push(model, "me/x", token="wrong", save_dir=tmp_path / "local")
    assert err.value.status == 401 and err.value.local_dir == tmp_path / "local"
    assert (tmp_path / "local" / "model.safetensors").is_file() and (tmp_path / "local" / "README.md").is_file()
    assert "me/x" not in hub.repos


def test_network_down_keeps_temporary_copy(tiny_model_dir):
    with HubServer() as dead:
        url = dead.url
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig(mode="infer"))
    with pytest.raises(HubPushError, match=r"cannot reach http://127\.0\.0\.1:\d+ \(ConnectError") as err:
        push(model, "me/x", endpoint=url, token=TOKEN)
    kept = err.value.local_dir
    assert str(kept) in str(err.value) and (kept / "model.safetensors").is_file()
    load_checked(kept)  # the kept copy is a complete checkpoint


def test_server_error_during_commit(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(hub_http, "time", types.SimpleNamespace(sleep=lambda s: None))  # retries without the waits
    with HubServer(token=TOKEN, fail={"commit": 500}) as hub:
        model = load_checked(tiny_model_dir("qwen3"), LowBitConfig())
        model.save_pretrained(tmp_path / "ckpt")
        before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
        with pytest.raises(HubPushError, match=r"upload the files and commit: .*HTTP 500.*nothing partial"):
            push_folder(tmp_path / "ckpt", "me/x", endpoint=hub.url, token=TOKEN)
        assert hub.files("me/x") == {}  # the repo was created, nothing was committed
        assert hub.requests.count(("POST", "/api/models/me/x/commit/main")) >= 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before


def test_push_folder_refuses_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"folder=.* is not a saved checkpoint \(no config.json\); allowed:"):
        push_folder(tmp_path, "me/x")
