"""Loading every real checkpoint layout, checked against Hugging Face's independent LeViT."""
import hashlib
import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import trained_like_hf, trained_like_reference
from layouts_ref import fuse_official, hf_logits, hf_model, hf_state_dict, to_official, to_timm, write_layout
from levit_deploy import checkpoints
from levit_deploy.checkpoints import CheckpointError, WeightsUnavailable, load
from levit_deploy.families.levit import FAMILY as LEVIT_FAMILY
from levit_deploy.parity import compare
from variants import LEVIT


CASES = [("official", "pth"), ("official_fused", "pth"), ("timm", "safetensors"), ("timm", "bin"),
         ("timm_conv", "safetensors"), ("timm_conv", "bin"), ("hf", "safetensors"), ("hf", "bin")]


@pytest.mark.parametrize("variant", LEVIT)
def test_every_variant_and_layout_reproduces_hf_logits(tmp_path, variant):
    """Trained-like checkpoints (BatchNorm statistics from real activations) in every layout and format."""
    ref_model = trained_like_hf(variant)
    sd = hf_state_dict(ref_model)
    reference = trained_like_reference(variant)
    pixels = torch.from_numpy(reference.inputs[:4])
    expected = hf_logits(ref_model, pixels)
    for layout, fmt in CASES:
        target = write_layout(tmp_path / f"{layout}-{fmt}", sd, layout, fmt)
        model = load(target)
        info = model.load_info
        assert info.variant == variant and info.family == "levit"
        assert info.layout == layout.replace("timm_conv", "timm")
        assert info.details["mode"] == ("conv" if layout == "timm_conv" else "linear")
        assert info.num_classes == 1000 and info.details["distilled"]
        if layout == "official_fused":
            continue  # judged below: folding BatchNorm changes rounding, not the function
        with torch.no_grad():
            ours = model(pixels)
        # unfused layouts copy tensors one to one: bit-identical to Hugging Face's implementation
        assert torch.equal(ours, expected), f"{layout}/{fmt}: expected bit-identical logits"
    fused = load(tmp_path / "official_fused-pth" / "official_fused.pth")
    report = compare(reference, fused, "fp32", stage="official fused checkpoint")
    assert report.passed, report.summary()


def test_key_counts_match_the_real_files(hf_128s):
    _, sd = hf_128s
    assert len(sd) == 325  # HF / timm, 128S
    assert len(to_timm(sd)) == 325
    official = to_official(sd)
    assert len(official) == 336
    assert sum(k.endswith("attention_bias_idxs") for k in official) == 11
    assert len(fuse_official(official)) == 126


def test_hf_legacy_file_with_bias_idxs_and_named_variant(tmp_path, hf_128s, pixels):
    model, sd = hf_128s
    legacy = dict(sd)
    official = to_official(sd)
    # the 2022 HF modeling code saved attention_bias_idxs as persistent buffers
    for k in sd:
        if k.endswith("attention_biases"):
            legacy[k.replace("attention_biases", "attention_bias_idxs")] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="index table differs"):
        checkpoints.build_from_state_dict(legacy, "legacy.bin")
    idxs = [v for k, v in official.items() if k.endswith("attention_bias_idxs")]
    keys = [k.replace("attention_biases", "attention_bias_idxs") for k in sd if k.endswith("attention_biases")]
    legacy.update(dict(zip(keys, idxs)))
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    loaded = load("levit_128s", weights=tmp_path / "pytorch_model.bin")
    assert len(loaded.load_info.ignored_keys) == 11
    with torch.no_grad():
        assert torch.equal(loaded(pixels), hf_logits(model, pixels))


def test_non_distilled_and_other_class_counts(tmp_path, pixels):
    model = hf_model("levit_128s", seed=3, num_classes=10, distilled=False)
    save_file(to_timm(hf_state_dict(model)), str(tmp_path / "m.safetensors"))
    ours = load(tmp_path / "m.safetensors")
    assert (ours.load_info.num_classes, ours.load_info.details["distilled"]) == (10, False)
    with torch.no_grad():
        assert torch.equal(ours(pixels), hf_logits(model, pixels))
    with pytest.raises(CheckpointError, match="10 classes, you asked for 1000"):
        load("levit_128s", weights=tmp_path / "m.safetensors", num_classes=1000)


def test_wrong_variant_is_named(tmp_path, hf_128s):
    save_file(to_timm(hf_128s[1]), str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"asked for levit_192 but the checkpoint is a levit_128s \(timm"):
        load("levit_192", weights=tmp_path / "m.safetensors")


def test_shape_mismatch_names_layout_closest_variant_and_keys(tmp_path, hf_128s):
    sd = to_timm(hf_128s[1])
    sd["stages.0.blocks.1.attn.qkv.linear.weight"] = torch.zeros(256, 100)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "bad.safetensors" in msg and "timm layout" in msg and "closest is levit_128s" in msg
    assert "stages.0.blocks.1.attn.qkv.linear.weight: found (256, 100), expected (256, 128)" in msg


def test_missing_key_is_named(tmp_path, hf_128s):
    sd = to_official(hf_128s[1])
    del sd["blocks.3.m.2.bn.running_var"]
    torch.save({"model": sd}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"official layout .*missing blocks\.3\.m\.2\.bn\.running_var"):
        load(tmp_path / "x.pth")


def test_unknown_layout(tmp_path):
    torch.save({"model": {"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}}, tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match=r"r\.pth: no model family recognises these keys \(first keys: conv1\.weight.*timm: stem\.conv1\.linear\.weight"):
        load(tmp_path / "r.pth")


def test_backbone_only_hf_model_is_refused(tmp_path, hf_128s):
    sd = {k[len("levit."):]: v for k, v in hf_128s[1].items() if k.startswith("levit.")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="without a classification head"):
        load(tmp_path / "model.safetensors")


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"hello, this is text\n", "not a checkpoint"),
])
def test_empty_and_non_checkpoint_files(tmp_path, content, match):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load(tmp_path / "x.pth")


def test_truncated_files(tmp_path, hf_128s):
    sd = to_timm(hf_128s[1])
    torch.save(sd, tmp_path / "full.bin")
    save_file(sd, str(tmp_path / "full.safetensors"))
    for name in ("full.bin", "full.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=r"cut-full\.\w+: corrupt or truncated"):
            load(tmp_path / f"cut-{name}")


def test_missing_path_and_unknown_name():
    with pytest.raises(CheckpointError, match="no such file or folder, and not a variant name"):
        load("/nonexistent/levit.pth")
    with pytest.raises(CheckpointError, match="not a variant name"):
        load("levit_999")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"patch_embed.0.c.weight": _Exploit(marker)}}
    if writer == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"(refused to unpickle|none of which was run).*|.*posix\.system") as e:
        load(path)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert not marker.exists(), "the payload ran"
    if writer == "plain_pickle":
        with open(path, "rb") as f:
            pickle.load(f)  # noqa: S301 - proves the payload is live
        assert marker.exists()


class FakeConfig(dict):
    """Stands in for a yacs CfgNode: a dict subclass the loader has never heard of."""


def test_training_checkpoint_with_pickled_objects_loads_without_running_them(tmp_path, hf_128s, monkeypatch):
    marker = tmp_path / "pwned"
    config = FakeConfig(MODEL={"TYPE": "levit"}, EPOCHS=300)
    path = tmp_path / "train.pth"
    torch.save({"model": to_official(hf_128s[1]), "config": config, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 299, "hook": _Exploit(marker)}, path)
    monkeypatch.delattr(sys.modules[__name__], "FakeConfig")  # the loader could not import it even if it tried
    model = load(path)
    assert not marker.exists(), "the payload ran"
    info = model.load_info
    assert info.entry == "model" and info.variant == "levit_128s"
    assert info.entries["epoch"] == "299" and info.entries["model"] == "state dict (336 tensors)"
    assert info.entries["config"].startswith("test_checkpoints.FakeConfig (read as data: MODEL=")
    assert "posix.system" in info.entries["hook"] or "os.system" in info.entries["hook"]
    assert any("read as data, not run" in n for n in info.notes)


def test_ema_entry_and_wrapped_model_prefixes(tmp_path, hf_128s, pixels):
    official = to_official(hf_128s[1])
    ema = {f"module.module.{k}": v * 1.0 for k, v in official.items()}  # EMA of a DDP-wrapped model
    torch.save({"epoch": 3, "model": official, "ema_model": ema, "optimizer": {}}, tmp_path / "ck.pth")
    plain, averaged = load(tmp_path / "ck.pth"), load(tmp_path / "ck.pth", entry="ema_model")
    assert (plain.load_info.entry, averaged.load_info.entry) == ("model", "ema_model")
    assert any("module.module." in n for n in averaged.load_info.notes)
    with torch.no_grad():
        assert torch.equal(plain(pixels), averaged(pixels))
    torch.save({"epoch": 3, "model": official, "ema_model": None}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="'ema_model' is None .*no EMA"):
        load(tmp_path / "no_ema.pth", entry="ema_model")


def _fake_release(tmp_path, hf_sd, bad_hash=False):
    src = tmp_path / "release" / "tmp.pth"
    src.parent.mkdir()
    torch.save({"model": to_official(hf_sd)}, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:8]
    named = src.with_name(f"LeViT-128S-{'00000000' if bad_hash else digest}.pth")
    src.rename(named)
    return named


def test_pretrained_download_verifies_and_caches(tmp_path, fresh_cache, hf_128s, monkeypatch, pixels):
    release = _fake_release(tmp_path, hf_128s[1])
    monkeypatch.setitem(LEVIT_FAMILY.pretrained_urls, "levit_128s", release.as_uri())
    model = load("levit_128s")
    cached = fresh_cache / "weights" / release.name
    assert cached.is_file() and model.load_info.layout == "official"
    release.unlink()  # the second load must come from the cache
    again = load("levit_128s")
    with torch.no_grad():
        assert torch.equal(again(pixels), hf_logits(hf_128s[0], pixels))


def test_pretrained_download_with_wrong_hash_is_refused(tmp_path, fresh_cache, hf_128s, monkeypatch):
    release = _fake_release(tmp_path, hf_128s[1], bad_hash=True)
    monkeypatch.setitem(LEVIT_FAMILY.pretrained_urls, "levit_128s", release.as_uri())
    with pytest.raises(WeightsUnavailable, match="expected a prefix 00000000; refusing"):
        load("levit_128s")
    assert not list((fresh_cache / "weights").iterdir())


def test_offline_download_says_what_to_do(fresh_cache, monkeypatch):
    monkeypatch.setitem(LEVIT_FAMILY.pretrained_urls, "levit_128s", "http://127.0.0.1:9/LeViT-128S-96703c44.pth")
    with pytest.raises(WeightsUnavailable, match="Pass --weights PATH"):
        load("levit_128s")


def test_argparse_namespace_in_training_checkpoint_is_allowed(tmp_path, hf_128s):
    import argparse
    torch.save({"model": to_official(hf_128s[1]), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "c.pth")
    assert load(tmp_path / "c.pth").load_info.variant == "levit_128s"


def test_conversion_round_trip(hf_128s, tmp_path, pixels):
    from levit_deploy.families.levit.layouts import from_canonical
    model = load("levit_128s", init="random", seed=5)
    for layout in ("official", "timm", "hf"):
        sd = from_canonical(model.state_dict(), layout, model.config)
        back = checkpoints.build_from_state_dict(sd, layout)
        with torch.no_grad():
            assert torch.equal(back(pixels), model(pixels))


@pytest.mark.parametrize("variant, family", [("lightvit_tiny", "LightViT"), ("litv2_s", "LITv2")])
def test_headless_checkpoints_of_every_family_are_refused(tmp_path, variant, family):
    sd = {k: v for k, v in load(variant, init="random").state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "backbone.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=f"{family} checkpoint without a classification head"):
        load(path)
