"""Generator tuning (toolkit/tune.py, `mosaic-toolkit tune`) on CPU.

The model is the random-weight SAM 2.1 tiny of tests/fixtures_sam2.py at 128² input, with its
mask decoder's output layers scaled so that logits, stability scores and predicted IoUs spread
over the searched ranges (plain random weights give logits of ±0.3 and IoUs of 0.53–0.55, which
every searched threshold filters out alike). Masks are still meaningless; the tests check what
does not depend on their quality: a trial through the memo of decoded prompts equals
``Sam2Engine.segment``, a study persists, resumes and can be killed, and the best parameters
reach the model's metadata and the engine.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fixtures_sam2 import TINY_NAME
from mosaic_toolkit.cli import main
from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.sam.fast import tessera_prompts, tile_interior
from mosaic_toolkit.sam.params import GeneratorParams
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.sam.models import FINETUNE_PREFIXES, load_finetune, load_model, save_finetune
from mosaic_toolkit.training.tune import SEARCHED, CachedSegmenter, load_images, score_images, tune

optuna.logging.set_verbosity(optuna.logging.WARNING)
FEW_PROMPTS = {"points_per_side": 8, "points_per_batch": 16}  # at most 64 prompts per image
IMAGE_SIZE = 128  # tiny's features at 128² are 8x8: encoder and decoder are cheap on two cores


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dataset(tiny_dataset_factory) -> Path:
    return tiny_dataset_factory(("train", "val", "val"))


@pytest.fixture(scope="module")
def spread_model(tiny_sam2_spec):
    """The tiny model at IMAGE_SIZE with its decoder outputs scaled (see the module docstring)."""
    model = load_model(dataclasses.replace(tiny_sam2_spec, image_size=IMAGE_SIZE), "cpu")
    decoder = model.sam_mask_decoder
    with torch.no_grad():
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(25)
            mlp.layers[-1].bias.mul_(25)
        decoder.iou_prediction_head.layers[-1].weight.mul_(25)
        decoder.iou_prediction_head.layers[-1].bias.add_(-2.0)
    return model


def write_finetune(path: Path, model, config: str) -> Path:
    """A fine-tune file of ``model`` naming the tiny base (resolved through MOSAIC_SAM_HOME)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_finetune(
        path, model, base={"name": TINY_NAME, "config": config, "image_size": IMAGE_SIZE},
        generator=FEW_PROMPTS, training={"best_val_dice": 0.5},
    )
    return path


@pytest.fixture
def finetune_file(spread_model, tiny_sam2_spec, sam2_home, tmp_path) -> Path:
    return write_finetune(tmp_path / "model" / "ft.pt", spread_model, tiny_sam2_spec.config)


@pytest.fixture(scope="module")
def studied(spread_model, tiny_sam2_spec, tiny_sam2_home, tiny_dataset, tmp_path_factory):
    """A study with default storage and report folder: 3 trials through the library, then 2
    more through the command line. Returns what each run left behind."""
    finetune = write_finetune(tmp_path_factory.mktemp("tune_study") / "ft.pt", spread_model,
                              tiny_sam2_spec.config)
    url = f"sqlite:///{finetune.parent / 'ft.optuna.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOSAIC_SAM_HOME", str(tiny_sam2_home))
        first = tune(tiny_dataset, finetune, trials=3, seed=1, progress=False)
        first_trials = complete_trials(url, "ft-generator")
        first_files = sorted(p.name for p in first.out.iterdir())
        cli = CliRunner().invoke(main, ["tune", str(tiny_dataset), "--model", str(finetune),
                                        "--trials", "2", "--seed", "1"])
        yield {"finetune": finetune, "url": url, "first": first, "first_trials": first_trials,
               "first_files": first_files, "cli": cli, "trials": complete_trials(url, "ft-generator")}


def complete_trials(url: str, name: str) -> list:
    study = optuna.load_study(study_name=name, storage=url)
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def assert_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 400


# ------------------------------------------------------------------------------ the memo is faithful
def test_cached_guided_trials_equal_engine_segment(spread_model, tiny_dataset):
    """The guided method too: every trial equals engine.segment, later ones from the memo."""
    engine = Sam2Engine(spread_model, version="spread", cache_bytes=0)
    _, images = load_images(tiny_dataset, "val", None)
    base = GeneratorParams(**{**FEW_PROMPTS, "method": "guided"})
    trials = [base.replace(pred_iou_thresh=0.0, mask_threshold=0.3, erosion=0),
              base.replace(pred_iou_thresh=0.2, mask_threshold=-0.2, erosion=1, guided_max_area=1.5)]
    segmenter = CachedSegmenter(engine)
    for params in trials:
        for item in images:
            cached = segmenter.segment(item.image, params)
            np.testing.assert_array_equal(cached, engine.segment(item.image, params))
            assert cached.max() > 0
    assert segmenter.hits >= segmenter.misses > 0, "later trials reuse decoded windows"


def test_cached_trials_equal_engine_segment(spread_model, tiny_dataset):
    """Every parameter set gives exactly engine.segment's map, later ones from the memo."""
    engine = Sam2Engine(spread_model, version="spread", cache_bytes=0)
    _, images = load_images(tiny_dataset, "val", None)
    base = GeneratorParams(**{**FEW_PROMPTS, "method": "fast"})
    trials = [
        base.replace(pred_iou_thresh=0.5, stability_score_thresh=0.6, mask_threshold=0.3, opening=0, erosion=0, min_area=0),
        base.replace(pred_iou_thresh=0.5, stability_score_thresh=0.65, mask_threshold=0.55, opening=2, min_area=20, erosion=2),
        base.replace(pred_iou_thresh=0.9, stability_score_thresh=0.9),
    ]
    segmenter = CachedSegmenter(engine)
    found = []
    for params in trials:
        for item in images:
            cached = segmenter.segment(item.image, params)
            np.testing.assert_array_equal(cached, engine.segment(item.image, params))
            found.append(int(cached.max()))
    assert max(found) >= 3, "the parameters select masks"
    assert min(found[: len(images)]) > 0 and found[-len(images):] == [0] * len(images)
    assert segmenter.hits > segmenter.misses > 0, "later trials reuse decoded prompts"
    first_round = sum(
        math.ceil(len(tessera_prompts(tile_interior(item.image), 64, 4)[0]) / 16) for item in images)
    assert segmenter.misses > first_round, "second-round batches were decoded (and compared) too"

    tight = CachedSegmenter(engine, memo_bytes=1)  # nothing fits: every batch decoded again
    item = images[0]
    np.testing.assert_array_equal(tight.segment(item.image, trials[0]), engine.segment(item.image, trials[0]))
    assert tight.hits == 0 and tight.memo_used == 0


# ------------------------------------------------------------------------------ studies
def test_study_persists_beside_the_model(studied):
    first, trials = studied["first"], studied["first_trials"]
    assert first.storage == studied["url"] and first.study == "ft-generator"
    assert [t.number for t in trials] == [0, 1, 2]
    space = optuna.load_study(study_name="ft-generator", storage=studied["url"]).user_attrs["mosaic_tune"]["space"]
    assert space["min_area"][0] == 0 and 0 < space["min_area"][1] < GeneratorParams().min_area
    start = GeneratorParams(**FEW_PROMPTS)
    own = {k: getattr(start, k) for k in SEARCHED} | {"min_area": space["min_area"][1]}  # clipped
    assert trials[0].params == own, "the first trial is the model's own parameters"
    assert all(set(t.params) == set(SEARCHED) and 0 <= t.value <= 1 for t in trials)
    assert all(0 <= t.user_attrs["tile_f"] <= 1 and t.user_attrs["seconds"] > 0 for t in trials)
    assert len({t.value for t in trials}) > 1, "the parameters change the score"
    out = studied["finetune"].parent / "ft-tune"
    assert first.out == out and first.written_to == studied["finetune"]
    assert studied["first_files"] == ["history.png", "importances.png", "trials.csv", "tune.json"]


def test_cli_resumes_the_study(studied):
    cli, trials = studied["cli"], studied["trials"]
    assert cli.exit_code == 0, cli.output
    assert "Study 'ft-generator'" in cli.stdout and "5 completed trials" in cli.stdout
    assert f"written into {studied['finetune']}" in cli.stdout
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert [(t.params, t.value) for t in trials[:3]] == [(t.params, t.value) for t in studied["first_trials"]]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5, "no repeated trial"
    out = studied["first"].out
    assert len((out / "trials.csv").read_text().splitlines()) == 6
    assert_png(out / "history.png")
    assert_png(out / "importances.png")


def test_best_parameters_reach_metadata_and_engine(studied, tiny_dataset, sam2_home):
    best = max(studied["trials"], key=lambda t: t.value)
    expected = GeneratorParams(**FEW_PROMPTS).replace(**best.params)
    finetune = studied["finetune"]
    meta = load_finetune(finetune)
    assert meta["generator"] == expected.to_dict()
    assert meta["training"]["best_val_dice"] == 0.5, "the training record is kept"
    assert meta["training"]["tuning"]["best_trial"] == best.number
    assert meta["training"]["tuning"]["trials_complete"] == 5
    engine = Sam2Engine.from_spec(finetune, device="cpu")
    assert engine.params == expected, "segment and the backend use the tuned parameters"
    # The recorded value is what the tuned engine scores on the same images.
    _, images = load_images(tiny_dataset, "val", None)
    assert score_images(engine.segment, images, engine.params)["dice"] == best.value


def test_resuming_with_other_images_or_method_is_refused(studied, tiny_dataset, sam2_home):
    finetune = studied["finetune"]
    with pytest.raises(MosaicError, match=r"study 'ft-generator' .* other images"):
        tune(tiny_dataset, finetune, trials=1, max_images=1, progress=False)
    with pytest.raises(MosaicError, match="other (search space and )?fixed parameters"):
        tune(tiny_dataset, finetune, trials=1, method="stock", progress=False)
    assert len(complete_trials(studied["url"], "ft-generator")) == 5


def test_base_checkpoint_gets_tuned_file(spread_model, tiny_sam2_spec, tiny_dataset, sam2_home, tmp_path):
    checkpoint = tmp_path / "base" / "spread.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": spread_model.state_dict()}, checkpoint)
    spec = dataclasses.replace(tiny_sam2_spec, base_checkpoint=checkpoint, base_name=None,
                               generator=dict(FEW_PROMPTS), image_size=IMAGE_SIZE)
    result = tune(tiny_dataset, spec, trials=2, max_images=1, out=tmp_path / "report",
                  storage=str(tmp_path / "studies.db"), study_name="base", progress=False)
    assert result.written_to == tmp_path / "report" / "tuned.pt"
    assert len(complete_trials(f"sqlite:///{tmp_path / 'studies.db'}", "base")) == 2
    assert "importances.png" in {p.name for p in (tmp_path / "report").iterdir()}
    meta = load_finetune(result.written_to)
    assert meta["base"]["name"] == str(checkpoint.resolve()) and meta["base"]["image_size"] == IMAGE_SIZE
    assert meta["generator"] == result.best_params.to_dict()
    state = spread_model.state_dict()
    assert set(meta["state_dict"]) == {k for k in state if k.startswith(FINETUNE_PREFIXES)}
    assert all(torch.equal(v, state[k]) for k, v in meta["state_dict"].items()), "the base's own decoder"
    assert Sam2Engine.from_spec(result.written_to, device="cpu").params == result.best_params


def _tune_in_child(kwargs: dict) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    tune(**kwargs)


def test_killed_run_keeps_completed_trials(finetune_file, tiny_dataset, tmp_path):
    """SIGKILL in the middle of a study: completed trials stay, the next run continues.

    The process is forked from this one (imports already done); the kill is a real SIGKILL.
    """
    storage = tmp_path / "killed.db"
    kwargs = dict(dataset=tiny_dataset, model=finetune_file, trials=500, storage=str(storage),
                  out=tmp_path / "r", progress=False)
    child = multiprocessing.get_context("fork").Process(target=_tune_in_child, args=(kwargs,))
    child.start()
    try:
        deadline = time.monotonic() + 120
        done = 0
        while done < 2 and time.monotonic() < deadline and child.is_alive():
            time.sleep(0.2)
            if storage.is_file():
                with sqlite3.connect(storage) as db:
                    try:
                        done = db.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
                    except sqlite3.OperationalError:  # tables not created yet
                        pass
        assert child.is_alive() and done >= 2, "the study made progress and was still running"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    url = f"sqlite:///{storage}"
    before = complete_trials(url, "ft-generator")
    assert not (tmp_path / "r").exists(), "no report from a killed run"
    result = tune(tiny_dataset, finetune_file, trials=1, storage=str(storage), out=tmp_path / "r", progress=False)
    after = complete_trials(url, "ft-generator")
    assert len(after) == len(before) + 1 == result.trials_complete
    assert [(t.number, t.params) for t in after[:-1]] == [(t.number, t.params) for t in before]


# ------------------------------------------------------------------------------ command line
def test_cli_errors_are_one_line(finetune_file, tiny_dataset, tmp_path):
    runner = CliRunner()
    base = ["tune", str(tiny_dataset), "--model", str(finetune_file), "--trials", "1"]
    result = runner.invoke(main, base + ["--split", "test", "--storage", str(tmp_path / "x.db")])
    assert result.exit_code == 1 and "no samples in split 'test'" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, base + ["--storage", "nosuchdialect://host/db"])
    assert result.exit_code == 1 and "storage nosuchdialect://host/db: cannot open" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    result = runner.invoke(main, base + ["--out", str(tmp_path / "taken"), "--storage", str(tmp_path / "x.db")])
    assert result.exit_code == 1 and "is not an earlier tune output" in result.output
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"


def test_min_area_search_stops_at_the_speck_floor():
    """Segmentation caps min_area at SPECK_FRACTION of the squared tessera size on every
    method, so the search ends there (a larger value could not be served as tuned)."""
    from mosaic_toolkit.sam.guided import SPECK_FRACTION
    from mosaic_toolkit.training.tune import TuningImage, search_space

    gt = np.zeros((60, 60), np.int32)
    gt[5:15, 5:15], gt[20:30, 20:30], gt[40:50, 40:50] = 1, 2, 3  # median area 100 px
    images = [TuningImage("a", np.zeros((60, 60, 3), np.uint8), gt > 0, gt, 60, 0)]
    assert search_space(images)["min_area"] == [0, round(SPECK_FRACTION * 4 / math.pi * 100)]
