"""Building and loading SAM 2 models and fine-tune files (random-weight tiny, real sam2 code)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.sam.models import (
    FINETUNE_FORMAT,
    FINETUNE_PREFIXES,
    ModelSpec,
    build_sam2_model,
    load_finetune,
    load_model,
    pick_device,
    resolve_model,
    save_finetune,
    update_finetune_metadata,
)
from mosaic_toolkit.sam.weights import MODELS

TINY = "sam2.1-tiny"


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str | tuple) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


@pytest.fixture(scope="module")
def tuned(sam2_engine) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A copy of the tiny model with perturbed decoder weights (a stand-in for training)."""
    base = sam2_engine.model
    torch.manual_seed(1)
    model = build_sam2_model(MODELS[TINY].config, None, "cpu", image_size=base.image_size)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(FINETUNE_PREFIXES):
                p.add_(0.01 * torch.randn_like(p))
    return model, model.state_dict()


def write_finetune(path: Path, model, config: str = MODELS[TINY].config, name: str = TINY, **kw) -> Path:
    save_finetune(
        path, model,
        base={"name": name, "config": config, "image_size": 256},
        generator=kw.get("generator", {"pred_iou_thresh": 0.6, "min_area": 20}),
        training=kw.get("training", {"images": 3, "epochs": 1}),
    )
    return path


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device(None).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(MosaicError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(MosaicError, match="not a valid torch device"):
        pick_device("quantum")


def test_resolve_base_by_name_and_by_path(sam2_home, tiny_sam2_checkpoint, tmp_path):
    by_name = resolve_model(TINY)
    assert by_name.base_checkpoint == tiny_sam2_checkpoint
    assert by_name.config == MODELS[TINY].config and by_name.base_name == TINY
    assert by_name.finetune is None and by_name.generator == {}

    by_path = resolve_model(str(tiny_sam2_checkpoint))
    assert (by_path.base_checkpoint, by_path.config, by_path.base_name) == (
        tiny_sam2_checkpoint, MODELS[TINY].config, TINY)

    # A file name the registry does not know: the config is inferred from the weights.
    renamed = tmp_path / "my_checkpoint.pt"
    shutil.copyfile(tiny_sam2_checkpoint, renamed)
    inferred = resolve_model(renamed)
    assert inferred.config == MODELS[TINY].config and inferred.base_name is None


def test_name_not_installed_is_clear_error(sam2_home):
    with pytest.raises(MosaicError, match="sam2.1-large"):
        resolve_model("sam2.1-large")


def test_load_base_by_name_matches_checkpoint(sam2_home, tiny_sam2_checkpoint):
    engine = Sam2Engine.from_spec(TINY, device="cpu", image_size=256)
    assert engine.model_version == TINY and engine.model.image_size == 256
    saved = torch.load(tiny_sam2_checkpoint, map_location="cpu", weights_only=True)["model"]
    assert tensors_equal(engine.model.state_dict(), saved, "")


def test_finetune_round_trip(sam2_home, tuned, tiny_sam2_checkpoint, tmp_path):
    model, tuned_state = tuned
    path = write_finetune(tmp_path / "tuned.pt", model)
    data = load_finetune(path)
    assert data["format"] == FINETUNE_FORMAT and data["version"] == 1
    assert data["base"]["config"] == MODELS[TINY].config
    assert all(k.startswith(FINETUNE_PREFIXES) for k in data["state_dict"])
    assert set(data["state_dict"]) == {k for k in tuned_state if k.startswith(FINETUNE_PREFIXES)}
    assert path.stat().st_size < 40 * 2**20  # decoder only, not the 150 MB base

    spec = resolve_model(path)
    assert spec.finetune == path and spec.base_checkpoint == tiny_sam2_checkpoint
    assert spec.generator == {"pred_iou_thresh": 0.6, "min_area": 20}
    assert spec.metadata["training"] == {"images": 3, "epochs": 1}
    engine = Sam2Engine.from_spec(spec, device="cpu")
    loaded = engine.model.state_dict()
    base = torch.load(tiny_sam2_checkpoint, map_location="cpu", weights_only=True)["model"]
    assert tensors_equal(loaded, tuned_state, FINETUNE_PREFIXES), "decoder weights come from the fine-tune"
    assert not tensors_equal(loaded, base, "sam_mask_decoder."), "the fine-tune changed them"
    assert tensors_equal(loaded, base, "image_encoder."), "image encoder untouched"
    assert engine.params.pred_iou_thresh == 0.6 and engine.params.min_area == 20
    assert engine.model_version.startswith(f"{TINY}+ft-")
    assert engine.model.image_size == 256  # from the fine-tune's base metadata


def test_update_finetune_metadata(tuned, tmp_path):
    path = write_finetune(tmp_path / "tuned.pt", tuned[0])
    before = load_finetune(path)["state_dict"]
    update_finetune_metadata(path, generator={"pred_iou_thresh": 0.7, "erosion": 2})
    data = load_finetune(path)
    assert data["generator"] == {"pred_iou_thresh": 0.7, "erosion": 2}
    assert data["training"] == {"images": 3, "epochs": 1}, "section not given: unchanged"
    assert tensors_equal(data["state_dict"], before, "")
    with pytest.raises(MosaicError, match="unknown key.*colour"):
        update_finetune_metadata(path, generator={"colour": "red"})
    assert load_finetune(path)["generator"] == {"pred_iou_thresh": 0.7, "erosion": 2}


def test_corrupt_checkpoint_names_file(tmp_path, tiny_sam2_checkpoint):
    bad = tmp_path / "sam2.1_hiera_tiny.pt"
    bad.write_bytes(tiny_sam2_checkpoint.read_bytes()[:4096])  # truncated download
    with pytest.raises(MosaicError, match=str(bad)):
        build_sam2_model(MODELS[TINY].config, bad, "cpu")
    with pytest.raises(MosaicError, match=str(bad)):
        resolve_model(bad)
    not_sam = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, not_sam)
    with pytest.raises(MosaicError, match=f"{not_sam}.*not a SAM 2 checkpoint"):
        build_sam2_model(MODELS[TINY].config, not_sam, "cpu")


def test_checkpoint_for_other_config_is_error(tiny_sam2_checkpoint):
    with pytest.raises(MosaicError, match=f"{tiny_sam2_checkpoint}.*sam2.1_hiera_s.yaml"):
        build_sam2_model(MODELS["sam2.1-small"].config, tiny_sam2_checkpoint, "cpu", image_size=256)


def test_finetune_for_other_base_names_both(sam2_home, tuned, tiny_sam2_checkpoint, tmp_path):
    path = write_finetune(tmp_path / "for_small.pt", tuned[0], MODELS["sam2.1-small"].config, "sam2.1-small")
    with pytest.raises(MosaicError) as err:
        resolve_model(path, base=TINY)
    message = str(err.value)
    assert str(path) in message and str(tiny_sam2_checkpoint) in message
    assert "sam2.1_hiera_s.yaml" in message and "sam2.1_hiera_t.yaml" in message
    with pytest.raises(MosaicError, match="sam2.1-small"):
        resolve_model(path)  # its own base is not installed


def test_finetune_shape_mismatch_names_both(sam2_home, tuned, tiny_sam2_checkpoint, tmp_path):
    path = write_finetune(tmp_path / "tuned.pt", tuned[0])
    data = torch.load(path, weights_only=True)
    key = "sam_mask_decoder.iou_prediction_head.layers.0.weight"
    data["state_dict"][key] = data["state_dict"][key][:, :-1].clone()
    torch.save(data, path)
    with pytest.raises(MosaicError) as err:
        resolve_model(path)
    assert str(path) in str(err.value) and str(tiny_sam2_checkpoint) in str(err.value)
    assert key in str(err.value)
    spec = ModelSpec(tiny_sam2_checkpoint, MODELS[TINY].config, TINY, finetune=path, image_size=256)
    with pytest.raises(MosaicError, match="shape mismatch"):
        load_model(spec, "cpu")


def test_not_a_finetune_file(tmp_path, tiny_sam2_checkpoint):
    with pytest.raises(MosaicError, match="not a fine-tune file"):
        load_finetune(tiny_sam2_checkpoint)
    with pytest.raises(MosaicError, match="base model only applies"):
        resolve_model(tiny_sam2_checkpoint, base=TINY)


def test_model_spec_json_round_trip(tiny_sam2_spec, tmp_path):
    import dataclasses
    import json

    from mosaic_toolkit.sam.models import ModelSpec

    spec = dataclasses.replace(tiny_sam2_spec, finetune=tmp_path / "ft.pt", generator={"method": "stock"})
    data = json.loads(json.dumps(spec.to_json()))
    again = ModelSpec.from_json(data)
    assert again.base_checkpoint == spec.base_checkpoint and again.finetune == spec.finetune
    assert (again.config, again.base_name, again.generator, again.image_size) == (
        spec.config, spec.base_name, spec.generator, spec.image_size)
