"""A fourth model, defined in this file and registered through rayanom.specs alone, fitted and scored end to end on a
local Ray: nothing else in the library knows it (its spec travels to the actors with their arguments)."""

import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayanom import specs, workflows
from rayanom.artifact import Artifact
from rayanom.columns import SCORE_COL
from rayanom.config import RunConfig, UserError
from rayanom.decode import decode_image
from rayanom.features import FeatureExtractor
from rayanom.index import describe_index, read_index, training_rows, with_row_index

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True, kw_only=True)
class MeanConfig:
    """The toy model: global-average-pooled resnet18 features, scored by the squared distance to their mean."""

    backbone: str = "resnet18"
    layers: tuple[str, ...] = ("layer4",)
    image_size: tuple[int, int] = (64, 64)
    max_training_points: int = 40_000
    seed: int = 0
    model: str = field(default="toy-mean", init=False)
    min_training_rows = 1


class MeanDistanceHead:
    ARRAYS = {"mean": 1}

    def fit(self, x):
        self.mean = np.asarray(x, np.float64).mean(axis=0)
        return self

    def score_samples(self, x, exact=False, device="cpu"):
        x = x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)
        return -((x.astype(np.float64) - self.mean) ** 2).sum(axis=1)

    def to_arrays(self):
        return {"mean": self.mean}

    def load_arrays(self, state):
        self.mean = state["mean"]
        return self


TOY = specs.ModelSpec(name="toy-mean", config=MeanConfig, head=lambda config: MeanDistanceHead(),
                       extractor=specs.backbone_extractor, weights=specs.timm_weights,
                       load_weights=specs.load_timm_weights, outputs=specs.score_outputs, columns=lambda config: ())


@pytest.fixture
def toy():
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    specs.register(TOY)
    yield TOY
    del specs.SPECS[TOY.name]
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.ray
def test_a_fourth_model_registered_in_one_place_fits_and_scores(ray_local, demo_set, toy, tmp_path):
    config = MeanConfig()
    state, source = toy.weights(config, {}, False)  # seeded random weights, as the demo
    run = RunConfig(batch_size=8, num_actors=2)
    result = workflows.fit(describe_index(demo_set["index"]), config, source, run)
    result.artifact.save(str(tmp_path / "model"))
    artifact = Artifact.load(str(tmp_path / "model"))  # found by its name, registered
    assert isinstance(artifact.config, MeanConfig) and isinstance(artifact.head, MeanDistanceHead)
    summary = workflows.score(describe_index(demo_set["test"]), artifact, str(tmp_path / "scores"), run)
    assert summary["rows"] == 12 and summary["failed"] == 0

    # The independent reference: the same features in this process, the distance to the training mean by hand.
    def feats(paths):
        images = np.stack([decode_image(open(p, "rb").read(), config.image_size) for p in paths])
        return FeatureExtractor(config, state)(images).astype(np.float64)

    train = training_rows(with_row_index(read_index(demo_set["index"])))
    mean = feats(train.column("path").to_pylist()).mean(axis=0)
    scores = pq.read_table(str(tmp_path / "scores")).sort_by("row_index")
    expected = ((feats(scores.column("path").to_pylist()) - mean) ** 2).sum(axis=1)
    np.testing.assert_allclose(scores.column(SCORE_COL).to_numpy(), expected, rtol=1e-4)
    assert result.artifact.provenance["n_bank_rows"] == train.num_rows
    assert "anomaly_probability" not in scores.column_names  # its outputs are its own: the score alone


def test_a_registered_name_is_refused_and_an_unknown_model_is_named():
    with pytest.raises(UserError, match="invalid model='dfkde'"):
        specs.register(specs.SPECS["dfkde"])
    with pytest.raises(UserError, match=r"invalid model='toy-mean': expected one of \['dfkde', 'dfm', 'rkde'\]"):
        specs.spec("toy-mean")
