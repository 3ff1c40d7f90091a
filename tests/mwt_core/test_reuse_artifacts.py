import json
from dataclasses import replace

import pytest
import torch

from mwt_core.artifacts import ArtifactError, load_artifact, read_manifest, save_artifact
from mwt_core.models import create_model
from mwt_core.modularize import modularize
from mwt_core.reuse import evaluate, extract_module, finetune_head, restrict, subtask


@pytest.fixture(scope="module")
def trained(digits32):
    from mwt_core.training import TrainConfig, train

    data = replace(digits32, train_x=digits32.train_x[:300], train_y=digits32.train_y[:300])
    cfg = TrainConfig(arch="rescnn", width=0.125, epochs=2, batch_size=64, device="cpu")
    model = train(cfg, data).model
    return model, modularize(model, data, device="cpu"), data


def test_module_logits_equal_masked_model_on_its_kernels(trained, digits32):
    from mwt_core.models.masking import set_keep

    model, mz, _ = trained
    module = extract_module(model, mz, [3, 5, 8])
    x = (digits32.test_x[:32].float() / 255 - 0.3) / 0.3
    set_keep(model.mask_units(), mz.union([3, 5, 8]))
    with torch.no_grad():
        ref = model(x)[:, [3, 5, 8]]
    set_keep(model.mask_units(), None)
    with torch.no_grad():
        assert torch.allclose(module(x), ref, atol=1e-5)
    assert module.krr == pytest.approx(mz.krr_of([3, 5, 8]))


def test_subtask_and_evaluate(trained, digits32):
    model, mz, _ = trained
    x, y = subtask(digits32, [8, 3])
    assert set(y.tolist()) == {0, 1}
    assert len(y) == int(((digits32.test_y == 8) | (digits32.test_y == 3)).sum())
    acc = evaluate(restrict(model, [3, 5, 8], 10), digits32, [3, 5, 8], device="cpu")
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="out of range"):
        extract_module(model, mz, [11])
    with pytest.raises(ValueError, match="repeat"):
        extract_module(model, mz, [1, 1])


def test_finetune_changes_only_the_head(trained, digits32):
    model, mz, data = trained
    module = extract_module(model, mz, [0, 1])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    finetune_head(module, data, epochs=1, device="cpu")
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("net.classifier") for k in changed)


def test_artifact_roundtrip_model_and_module(trained, tmp_path, digits32):
    model, mz, _ = trained
    module = extract_module(model, mz, [2, 7])
    x = (digits32.test_x[:16].float() / 255 - 0.3) / 0.3
    for net, sub in ((model, "model"), (module, "module")):
        manifest = save_artifact(tmp_path / sub, net, {"class_names": [str(i) for i in range(10)]})
        loaded, read = load_artifact(tmp_path / sub)
        assert read["sha256"] == manifest["sha256"] and read["kind"] == sub
        with torch.no_grad():
            # The trained net is channels_last, the loaded one contiguous: same maths,
            # another summation order.
            assert torch.allclose(loaded(x), net.eval()(x), atol=1e-5)
    assert read_manifest(tmp_path / "module")["config"]["classes"] == [2, 7]


def test_corrupt_artifacts_are_refused(trained, tmp_path):
    model, _, _ = trained
    save_artifact(tmp_path / "a", model)
    weights = tmp_path / "a" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(tmp_path / "a")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(tmp_path / "missing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path / "b")
    save_artifact(tmp_path / "c", create_model("simcnn", 10, width=0.125))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["config"]["arch"] = "vgg16"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_artifact(tmp_path / "c")


def test_same_weights_same_sha256(trained, tmp_path):
    # The checksum is the download ETag: identical weights must hash identically.
    model, _, _ = trained
    hashes = {save_artifact(tmp_path / str(i), model)["sha256"] for i in range(4)}
    assert len(hashes) == 1
