import itertools

import numpy as np

from onnxprune.gkp.partition import partition_input_channels


def _score(weight, labels, kept, groups):
    energy = np.stack([np.sum(weight[labels == g] ** 2, axis=(0, 2, 3)) for g in range(groups)])
    energy /= energy.sum(axis=1, keepdims=True)
    return sum(energy[g, c] for g in range(groups) for c in kept[g])


def test_partition_is_balanced_and_covers_every_channel():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 64, 3, 3))
    labels = np.repeat(np.arange(4), 8)
    kept = partition_input_channels(weight, labels, 4)
    assert [len(k) for k in kept] == [16] * 4
    assert sorted(c for k in kept for c in k) == list(range(64))


def test_partition_is_optimal_on_small_cases():
    rng = np.random.default_rng(1)
    for _ in range(10):
        weight = rng.standard_normal((4, 6, 1, 1))
        labels = np.array([0, 1, 0, 1])
        kept = partition_input_channels(weight, labels, 2)
        best = max(_score(weight, labels, [list(a), [c for c in range(6) if c not in a]], 2)
                   for a in itertools.combinations(range(6), 3))
        assert abs(_score(weight, labels, kept, 2) - best) < 1e-12


def test_disjoint_layer_config_plans_a_partition_and_removes_the_gather():
    from graphs import vgg
    from onnxprune.pipeline import PruneConfig, prune

    model = vgg().model()
    config = PruneConfig(groups=2, rate=0.5, layer_configs={"conv3": {"groups": 2, "n_keep": 16, "disjoint": True}})
    pruned, report = prune(model, config)
    layer = report.plan.by_node()["conv3"]
    assert sorted(layer.kept_in_channels[0] + layer.kept_in_channels[1]) == list(range(32))
    assert layer.scores["kernel_selection"] == "disjoint-energy"
    producers = {o: n for n in pruned.graph.node for o in n.output}
    conv3 = next(n for n in pruned.graph.node if n.name == "conv3")
    assert producers[conv3.input[0]].op_type != "Gather"
    assert report["verify"]["passed"]
