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
    VIDEO_ONLY_PREFIXES,
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

from fixtures_sam2 import grid_mosaic

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


def test_base_checkpoint_in_other_layouts_loads_the_same_weights(tiny_sam2_checkpoint, tmp_path):
    """A bare state dict, a wrapper's prefixed keys, and an export without the video-only
    modules (the image predictor never runs them) are read as the official layout is."""
    config = MODELS[TINY].config
    official = torch.load(tiny_sam2_checkpoint, weights_only=True)["model"]
    image_only = {k: v for k, v in official.items() if not k.startswith(VIDEO_ONLY_PREFIXES)}
    assert len(image_only) < len(official)
    layouts = {
        "bare.pt": official,
        "prefixed.pt": {"module." + k: v for k, v in official.items()},
        "image_only.pt": {"model": image_only},
    }
    for name, data in layouts.items():
        torch.save(data, tmp_path / name)
        model = build_sam2_model(config, tmp_path / name, "cpu", image_size=256)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in image_only.items()), name


def test_base_checkpoint_missing_an_image_tensor_names_it(tiny_sam2_checkpoint, tmp_path):
    official = torch.load(tiny_sam2_checkpoint, weights_only=True)["model"]
    key = "sam_mask_decoder.iou_token.weight"
    torch.save({"model": {k: v for k, v in official.items() if k != key}}, tmp_path / "cut.pt")
    with pytest.raises(MosaicError, match=f"cut.pt.*missing 1 .*{key}"):
        build_sam2_model(MODELS[TINY].config, tmp_path / "cut.pt", "cpu", image_size=256)


def test_finetune_runs_on_a_base_without_video_modules(sam2_home, tuned, tiny_sam2_checkpoint, tmp_path):
    """A fine-tune made on the official checkpoint serves on an export of the same weights
    that leaves out the video-only modules: same clicks."""
    official = torch.load(tiny_sam2_checkpoint, weights_only=True)["model"]
    reduced = tmp_path / "image_only.pt"
    torch.save({"model": {k: v for k, v in official.items() if not k.startswith(VIDEO_ONLY_PREFIXES)}}, reduced)
    path = write_finetune(tmp_path / "tuned.pt", tuned[0])
    image, _ = grid_mosaic(4, 4)
    masks = []
    for base in (tiny_sam2_checkpoint, reduced):
        engine = Sam2Engine.from_spec(resolve_model(path, base=base), device="cpu")
        masks.append(engine.predict_points(image, [[40, 40]], [1])[0])
    assert masks[0].any() and (masks[0] == masks[1]).all()


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


# ------------------------------------------------------------------ finding a fine-tune's base again
def _other_weights(source: Path, dest: Path) -> Path:
    """A checkpoint of the same architecture with other weights (another base, same config)."""
    state = torch.load(source, map_location="cpu", weights_only=True)["model"]
    key = "image_encoder.trunk.patch_embed.proj.bias"
    state[key] = state[key] + 1.0
    torch.save({"model": state}, dest)
    return dest


def test_finetune_records_and_finds_its_base_outside_the_cache(tuned, tiny_sam2_checkpoint, tmp_path, monkeypatch):
    """A fine-tune of a base given by path (under the registry's file name, outside the model
    cache) records the path and sha256, and finds the base again without the cache."""
    import dataclasses

    from mosaic_toolkit.sam.models import base_record, file_sha256

    elsewhere = tmp_path / "weights" / MODELS[TINY].filename
    elsewhere.parent.mkdir()
    shutil.copyfile(tiny_sam2_checkpoint, elsewhere)
    empty = tmp_path / "empty_home"
    empty.mkdir()
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(empty))
    spec = dataclasses.replace(resolve_model(elsewhere), image_size=256)
    assert spec.base_name == TINY  # named by its file name
    finetune = tmp_path / "finetune.pt"
    save_finetune(finetune, tuned[0], base=base_record(spec), generator=None, training=None)
    recorded = load_finetune(finetune)["base"]
    assert recorded["name"] == TINY and recorded["checkpoint"] == str(elsewhere.resolve())
    assert recorded["sha256"] == file_sha256(elsewhere)

    # Not in the cache: the recorded path.
    assert resolve_model(finetune).base_checkpoint == elsewhere
    # In the cache too (same weights): the cache.
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(tiny_sam2_checkpoint.parent))
    assert resolve_model(finetune).base_checkpoint == tiny_sam2_checkpoint

    # Moved away and not in the cache: a clear error saying where it looked and what to do.
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(empty))
    moved = tmp_path / "moved.pt"
    elsewhere.rename(moved)
    with pytest.raises(MosaicError) as err:
        resolve_model(finetune)
    message = str(err.value)
    assert str(finetune) in message and str(elsewhere.resolve()) in message and str(empty) in message
    assert "--base" in message and f"weights fetch {TINY}" in message
    # An explicit base is accepted when its sha256 is the recorded one (any file name).
    given = resolve_model(finetune, base=moved)
    assert given.base_checkpoint == moved and given.finetune == finetune and given.image_size == 256
    engine = Sam2Engine.from_spec(finetune, base=moved, device="cpu")
    assert tensors_equal(engine.model.state_dict(), tuned[1], FINETUNE_PREFIXES)

    # Other weights of the same architecture: an error naming both files.
    other = _other_weights(moved, tmp_path / "other.pt")
    with pytest.raises(MosaicError) as err:
        resolve_model(finetune, base=other)
    message = str(err.value)
    assert str(finetune) in message and str(other) in message and str(elsewhere.resolve()) in message
    assert "sha256" in message and recorded["sha256"][:12] in message

    # A cache holding other weights under the registry's name is passed over for the recorded path...
    home = tmp_path / "home_with_other"
    home.mkdir()
    other.rename(home / MODELS[TINY].filename)
    moved.rename(elsewhere)
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(home))
    assert resolve_model(finetune).base_checkpoint == elsewhere
    # ... and when the recorded path is gone too, the mismatch is the error.
    elsewhere.unlink()
    with pytest.raises(MosaicError, match=f"{finetune}.*sha256.*{home / MODELS[TINY].filename}.*--base"):
        resolve_model(finetune)


def test_finetune_without_recorded_path_or_hash_resolves_by_name(sam2_home, tuned, tmp_path):
    """Files written before the base's path and sha256 were recorded still load (by name)."""
    path = write_finetune(tmp_path / "old.pt", tuned[0])
    data = torch.load(path, weights_only=True)
    del data["base"]["checkpoint"], data["base"]["sha256"]
    torch.save(data, path)
    spec = resolve_model(path)
    assert spec.base_name == TINY and spec.finetune == path
    assert resolve_model(path, base=spec.base_checkpoint).base_checkpoint == spec.base_checkpoint


def test_base_override_reaches_tune_eval_and_backend(tuned, tiny_sam2_checkpoint, tmp_path, monkeypatch):
    """--base (tune, eval --models) and MOSAIC_BACKEND_MODEL_BASE give a moved base; a wrong one
    is refused before any work, naming both files."""
    import dataclasses

    from click.testing import CliRunner

    from mosaic_backend.config import Settings
    from mosaic_backend.errors import BackendError
    from mosaic_backend.versions import load_base_engine
    from mosaic_toolkit.cli import main
    from mosaic_toolkit.evaluation.compare import _check_models
    from mosaic_toolkit.sam.models import base_record

    base = tmp_path / "w" / MODELS[TINY].filename
    base.parent.mkdir()
    shutil.copyfile(tiny_sam2_checkpoint, base)
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(tmp_path / "empty_home"))
    spec = dataclasses.replace(resolve_model(base), image_size=256)
    finetune = tmp_path / "ft.pt"
    save_finetune(finetune, tuned[0], base=base_record(spec), generator=None, training=None)
    moved = base.rename(tmp_path / "moved.pt")
    other = _other_weights(moved, tmp_path / "other.pt")
    dataset = tmp_path / "data"
    dataset.mkdir()

    result = CliRunner().invoke(main, ["tune", str(dataset), "--model", str(finetune)])
    assert result.exit_code == 1 and "not found" in result.output and "--base" in result.output
    result = CliRunner().invoke(main, ["tune", str(dataset), "--model", str(finetune), "--base", str(other)])
    assert result.exit_code == 1 and str(other) in result.output and "sha256" in result.output

    with pytest.raises(MosaicError, match=f"model 'ft'.*{other}"):
        _check_models([("ft", str(finetune)), ("classical", "classical")], base=other)
    _check_models([("ft", str(finetune)), ("classical", "classical")], base=moved)

    settings = Settings.from_env({}, engine="sam2", model=str(finetune), device="cpu")
    with pytest.raises(BackendError, match="not found"):
        load_base_engine(settings)
    engine = load_base_engine(dataclasses.replace(settings, model_base=str(moved)))
    assert engine.spec.base_checkpoint == moved and engine.spec.finetune == finetune
    assert tensors_equal(engine.model.state_dict(), tuned[1], FINETUNE_PREFIXES)
